"""The evaluation suite on the demo's held-out data root: tasks with data run, the rest are skipped."""

from __future__ import annotations

import torch

from protorkd.eval.features import FeatureCache
from protorkd.eval.suite import EvalOptions, run_suite
from protorkd.models.build import build_dual_encoder
from tests.conftest import TINY_TOWERS

TINY = TINY_TOWERS


def test_suite_runs_every_task_with_data_and_skips_the_rest(tiny_model, tiny_corpus, tmp_path):
    root = tiny_corpus / "eval"
    cache = FeatureCache(tmp_path / "cache")
    options = EvalOptions(batch_size=64, cache=cache)
    result = run_suite(tiny_model, root, options=options)
    metrics = result.metrics
    assert {
        "zeroshot/shapes/top1",
        "linear/shapes/top1",
        "retrieval/shapes/mean_recall",
        "analysis/shapes/modality_gap",
    } <= set(metrics)
    assert set(result.skipped) == {"sts"} and "sts" in result.skipped["sts"]
    assert 0.0 <= metrics["zeroshot/shapes/top1"] <= 100.0
    # a second run reuses the cached classifier and linear-probe features and gives the same numbers
    misses = cache.misses
    again = run_suite(tiny_model, root, tasks=["zeroshot", "linear"], options=options).metrics
    assert cache.misses == misses
    assert all(again[k] == metrics[k] for k in again)


def test_a_cached_entry_is_never_served_for_other_weights(tiny_corpus, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    torch.manual_seed(1)
    first = build_dual_encoder(TINY).eval()
    run_suite(first, tiny_corpus / "eval", tasks=["linear"], options=EvalOptions(cache=cache))
    torch.manual_seed(2)
    second = build_dual_encoder(TINY).eval()
    misses = cache.misses
    run_suite(second, tiny_corpus / "eval", tasks=["linear"], options=EvalOptions(cache=cache))
    assert cache.misses == misses + 2  # train and test features recomputed


def test_the_suite_runs_only_the_tasks_it_is_given(tiny_model, tiny_corpus):
    """As training calls it: the tasks due this epoch, and a cache the run keeps across epochs."""
    cache = FeatureCache()
    options = EvalOptions(device=torch.device("cpu"), batch_size=64, cache=cache)
    odd = run_suite(tiny_model, tiny_corpus / "eval", tasks=["retrieval", "sts"], options=options).metrics
    assert any(k.startswith("retrieval/") for k in odd) and not any(k.startswith("zeroshot/") for k in odd)
    last = run_suite(tiny_model, tiny_corpus / "eval", tasks=["zeroshot", "retrieval", "sts"], options=options)
    assert any(k.startswith("zeroshot/") for k in last.metrics)
