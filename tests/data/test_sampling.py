"""Episodes: which rows each rank sees per epoch, a pure function of (seed, epoch)."""

from __future__ import annotations

import torch

from protorkd.data.sampling import EpisodeSampler, episode_indices


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
    assert positions == list(range(12))
    rows = [row for part in parts for _, _, row in part]
    assert set(rows) == set(range(10))
