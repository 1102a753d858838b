"""Schedules, sampling, config round trips, checkpoints and the teacher cache."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from protorkd.config import (
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    add_config_arguments,
    config_from_namespace,
    read_params,
    write_params,
)
from protorkd.data.sampling import EpisodeSampler, episode_indices
from protorkd.errors import UsageError
from protorkd.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from protorkd.train.optim import lr_at, param_groups
from protorkd.train.teacher_cache import build_teacher_cache


def test_learning_rate_schedule_values():
    kwargs = dict(base_lr=1.0, warmup_steps=4, total_steps=14)
    assert [lr_at(s, **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kwargs) == 1.0
    assert lr_at(9, **kwargs) == pytest.approx(0.5)
    assert lr_at(14, **kwargs) == pytest.approx(0.0)
    assert lr_at(7, **kwargs) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_weight_decay_skips_biases_norms_and_temperatures():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    module.logit_scale = torch.nn.Parameter(torch.zeros(()))
    decay, no_decay = param_groups([module], 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


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


def test_params_round_trip_keeps_types_and_odd_strings(tmp_path):
    cfg = Config(
        data=DataConfig(csv_separator="\t", dataset_size=None, episode_size=7),
        model=ModelConfig(lock_image_model=True, adapter="lora", text_model="a: b"),
        log=LogConfig(name="x y", report_to=""),
    )
    write_params(cfg, tmp_path / "params.txt", extra={"world_size": 2})
    assert read_params(tmp_path / "params.txt") == cfg
    assert "world_size: 2" in (tmp_path / "params.txt").read_text()


def test_every_flag_has_help_and_parses_back():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and "default:" in action.help, action.dest
    cfg = config_from_namespace(parser.parse_args(["--no-lock-text-model", "--dataset-size", "None", "--lr", "3"]))
    assert (
        cfg.data.dataset_size is None
        and cfg.optim.lr == 3.0
        and cfg == config_from_namespace(parser.parse_args(["--lr", "3"]))
    )


def test_checkpoint_is_atomic_plain_and_restores_rng(tmp_path):
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(2))
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1, "rng": state, "state_dict": {"w": torch.ones(2)}})
    assert not (tmp_path / "c.pt.tmp").exists()
    loaded = load_checkpoint(path)
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    with pytest.raises(UsageError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def _encode_counting(calls):
    def encode(texts):
        calls.append(len(texts))
        return torch.tensor([[len(t), t.count("a")] for t in texts], dtype=torch.float32)

    return encode


def test_teacher_cache_dedupes_reuses_and_resumes(tmp_path, monkeypatch):
    import protorkd.train.teacher_cache as tc

    keys = ["a cat", "a dog", "a cat", "banana", "x"]
    spec = {"model": "toy"}
    calls: list[int] = []
    cache = build_teacher_cache(
        tmp_path / "c", modality="text", keys=keys, spec=spec, encode=_encode_counting(calls), progress=False
    )
    assert sum(calls) == 4  # the duplicate caption is encoded once
    assert cache.lookup(torch.tensor([2, 3])).tolist() == [[5.0, 2.0], [6.0, 3.0]]
    calls.clear()
    build_teacher_cache(
        tmp_path / "c", modality="text", keys=keys, spec=spec, encode=_encode_counting(calls), progress=False
    )
    assert calls == []  # complete cache reused

    # interrupted after the first chunk: resumes at the recorded position
    monkeypatch.setattr(tc, "CHUNK", 2)
    failing_calls: list[int] = []

    def failing(texts):
        if failing_calls:
            raise KeyboardInterrupt
        return _encode_counting(failing_calls)(texts)

    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(tmp_path / "d", modality="text", keys=keys, spec=spec, encode=failing, progress=False)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["done"] == 2
    calls.clear()
    resumed = build_teacher_cache(
        tmp_path / "d", modality="text", keys=keys, spec=spec, encode=_encode_counting(calls), progress=False
    )
    assert sum(calls) == 2
    assert torch.equal(resumed.lookup(torch.arange(5)), cache.lookup(torch.arange(5)))


def test_teacher_cache_for_another_teacher_is_refused(tmp_path):
    build_teacher_cache(
        tmp_path, modality="text", keys=["a"], spec={"model": "one"}, encode=_encode_counting([]), progress=False
    )
    with pytest.raises(UsageError, match="does not match this run.*teacher"):
        build_teacher_cache(
            tmp_path, modality="text", keys=["a"], spec={"model": "two"}, encode=_encode_counting([]), progress=False
        )


def test_demo_corpus_is_deterministic(tmp_path):
    from protorkd.data.demo import write_demo_corpus

    a = write_demo_corpus(tmp_path / "a", size=20, seed=5, eval_per_class=1, progress=False)
    b = write_demo_corpus(tmp_path / "b", size=20, seed=5, eval_per_class=1, progress=False)
    assert (a / "train.tsv").read_text() == (b / "train.tsv").read_text()
    assert (a / "images/000/000007.jpg").read_bytes() == (b / "images/000/000007.jpg").read_bytes()
    header, *rows = (a / "train.tsv").read_text().splitlines()
    assert header == "filepath\ttitle" and len(rows) == 20 and len({r.split("\t")[1] for r in rows}) > 10
    assert (
        sorted(p.name for p in (a / "eval" / "shapes" / "test").iterdir())
        == json.loads((a / "eval" / "zeroshot_metadata.json").read_text())["shapes"]["classes"]
    )
