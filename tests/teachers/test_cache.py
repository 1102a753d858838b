"""The teacher feature cache: deduplicated, reused, resumed, refused for another teacher."""

from __future__ import annotations

import json

import pytest
import torch

from protorkd.errors import UsageError
from protorkd.teachers.cache import build_teacher_cache


def _encode_counting(calls):
    def encode(texts):
        calls.append(len(texts))
        return torch.tensor([[len(t), t.count("a")] for t in texts], dtype=torch.float32)

    return encode


def test_teacher_cache_dedupes_reuses_and_resumes(tmp_path, monkeypatch):
    import protorkd.teachers.cache as tc

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
