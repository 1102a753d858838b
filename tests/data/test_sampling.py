"""Episodes: which rows each rank sees per epoch, a pure function of (seed, epoch)."""

from __future__ import annotations

import torch

from protorkd.data.sampling import EXTRACTION_STREAM, EpisodeSampler, episode_indices


def test_episodes_are_a_function_of_seed_and_epoch():
    assert torch.equal(episode_indices(100, 0, 1, 2), episode_indices(100, 0, 1, 2))
    assert not torch.equal(episode_indices(100, 0, 1, 2), episode_indices(100, 0, 1, 3))
    assert sorted(episode_indices(100, 0, 1, 2).tolist()) == list(range(100))
    with_replacement = episode_indices(100, 500, 1, 0)
    assert len(with_replacement) == 500 and with_replacement.max() < 100


def test_ranks_split_an_epoch_without_overlap():
    samplers = [EpisodeSampler(10, 0, seed=0, rank=r, world_size=3) for r in range(3)]
    parts = [list(s) for s in samplers]
    assert [len(p) for p in parts] == [4, 4, 4]
    positions = sorted(position for part in parts for _, position, _ in part)
    assert positions == [0, 0, 1, 1, *range(2, 10)]  # padding repeats positions 0 and 1, as DistributedSampler
    rows = [row for part in parts for _, _, row in part]
    assert set(rows) == set(range(10))


def test_positions_address_the_episode_so_a_row_drawn_twice_has_two():
    sampler = EpisodeSampler(5, 12, seed=3, world_size=1)
    sampler.set_epoch(2)
    keys = list(sampler)
    episode = episode_indices(5, 12, 3, 2).tolist()
    assert [position for _, position, _ in keys] == list(range(12))
    assert [row for _, _, row in keys] == episode  # position j holds the j-th draw
    assert all(type(row) is int for _, _, row in keys)  # Python ints, read one at a time from the episode array
    assert len(set(episode)) < len(episode)  # 12 draws from 5 rows repeat some


def test_the_extraction_pass_sees_the_same_episode_with_its_own_augmentation_stream():
    sampler = EpisodeSampler(10, 6, seed=0, rank=1, world_size=2)
    extraction = sampler.extraction_pass()
    sampler.set_epoch(4)
    training, extracted = list(sampler), list(extraction)
    assert [key[1:] for key in extracted] == [key[1:] for key in training]
    assert {key[0] for key in training} == {4} and {key[0] for key in extracted} == {4 + EXTRACTION_STREAM}
