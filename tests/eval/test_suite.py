"""The evaluation suite on the demo's held-out data root: tasks with data run, the rest are skipped."""

from __future__ import annotations

import math
from math import comb

import pytest
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
    assert {key.split("/")[0] for key in metrics} == {
        "zeroshot",
        "linear_clip_benchmark_joint",
        "retrieval",
        "analysis",
        "diagnostics",
    }
    assert result.precision == "fp32"  # auto on the CPU
    assert set(result.skipped) == {"sts"} and "sts" in result.skipped["sts"]
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


def test_caption_features_are_encoded_once_while_the_text_side_is_unchanged(tiny_model, tiny_corpus):
    """Retrieval re-encodes the images at every evaluation, but a locked text teacher's caption features once."""
    import copy

    from protorkd.eval.catalog import RetrievalSpec, select
    from protorkd.eval.features import text_features

    root = tiny_corpus / "eval"
    cache = FeatureCache()
    options = EvalOptions(batch_size=64, cache=cache)
    first = run_suite(tiny_model, root, tasks=["retrieval"], options=options).metrics
    misses = cache.misses
    assert misses == 3  # shapes, shapes_skewed and shapes_unseen
    again = run_suite(tiny_model, root, tasks=["retrieval"], options=options).metrics
    assert cache.misses == misses and again == first
    spec = next(s for s in select(root, ["shapes"]) if isinstance(s, RetrievalSpec))
    captions = spec.load(root, None).captions
    expected = text_features(tiny_model, captions, device="cpu", batch_size=64)
    assert any(torch.equal(value["features"], expected) for value in cache.memory.values())
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():  # the text side changes: its captions are encoded again
        next(changed.text_tower.parameters()).add_(0.01)
    run_suite(changed, root, tasks=["retrieval"], options=options)
    assert cache.misses == misses + 3


def test_the_suite_runs_only_the_tasks_it_is_given(tiny_model, tiny_corpus):
    """As training calls it: the tasks due this epoch, and a cache the run keeps across epochs."""
    cache = FeatureCache()
    options = EvalOptions(device=torch.device("cpu"), batch_size=64, cache=cache)
    odd = run_suite(tiny_model, tiny_corpus / "eval", tasks=["retrieval", "sts"], options=options).metrics
    assert any(k.startswith("retrieval/") for k in odd) and not any(k.startswith("zeroshot/") for k in odd)
    last = run_suite(tiny_model, tiny_corpus / "eval", tasks=["zeroshot", "retrieval", "sts"], options=options)
    assert any(k.startswith("zeroshot/") for k in last.metrics)


def _degenerate(model):
    """A copy of `model` whose every image and every text embeds to the same vector."""
    import copy

    model = copy.deepcopy(model)
    direction = torch.linspace(-1, 1, 64)
    with torch.no_grad():
        model.image_head.weight.zero_()
        model.image_head.bias.copy_(direction)
        last = model.text_tower.model.mlp[-1]
        last.weight.zero_()
        last.bias.copy_(direction)
    return model


def test_a_model_that_embeds_everything_alike_scores_exactly_chance_on_every_task(tiny_model, tiny_corpus):
    # the demo root: 8 balanced classes (10 train, 10 test images each), 80 test images with 2 captions each
    model = _degenerate(tiny_model)
    metrics = run_suite(model, tiny_corpus / "eval", options=EvalOptions(batch_size=64)).metrics
    cv = run_suite(model, tiny_corpus / "eval", tasks=["linear"], options=EvalOptions(linear_protocol="cv")).metrics
    metrics.update(cv)
    for task in ("zeroshot", "linear_clip_benchmark_joint", "linear_cv_joint"):
        assert metrics[f"{task}/shapes/top1"] == pytest.approx(100 / 8)
        assert metrics[f"{task}/shapes/mean_per_class_recall"] == pytest.approx(100 / 8)
    assert metrics["zeroshot/shapes/top5"] == pytest.approx(500 / 8)
    assert metrics["linear_cv_joint/shapes/cv_top1"] == pytest.approx(100 / 8)
    for k in (1, 5, 10):
        assert metrics[f"retrieval/shapes/text_to_image_R@{k}"] == pytest.approx(100 * k / 80)
        chance = 1 - comb(160 - 2, k) / comb(160, k)
        assert metrics[f"retrieval/shapes/image_to_text_R@{k}"] == pytest.approx(100 * chance)
    assert metrics["analysis/shapes/modality_gap"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["analysis/shapes/image_avg_self_similarity"] == pytest.approx(1.0)
    # every logit tied: the predictions spread evenly in expectation; every feature one point: rank 1
    assert metrics["zeroshot/shapes/top_class_share"] == pytest.approx(100 / 8)
    assert metrics["zeroshot/shapes/prediction_entropy"] == pytest.approx(math.log(8))
    for side in ("image", "text"):
        assert metrics[f"diagnostics/shapes/{side}_effective_rank"] == pytest.approx(1.0)
        assert metrics[f"diagnostics/shapes/{side}_uniformity"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["diagnostics/shapes/alignment"] == pytest.approx(0.0, abs=1e-9)


def test_backbone_features_are_probed_on_request_and_named_in_the_keys(tiny_model, tiny_corpus):
    from protorkd.data.transforms import eval_transform
    from protorkd.eval.datasets import ImageFolderDataset
    from protorkd.eval.features import image_features
    from protorkd.eval.linear_clip_benchmark import clip_benchmark_linear_probe

    model = _degenerate(tiny_model)  # its head is constant, its tower is not
    options = EvalOptions(batch_size=64, linear_features="backbone", diagnostics_sample=0)
    metrics = run_suite(model, tiny_corpus / "eval", tasks=["linear"], options=options).metrics
    transform = eval_transform(model.image_preprocess)
    train, test = (
        image_features(model, ImageFolderDataset(tiny_corpus / "eval" / "shapes" / split, transform), device="cpu",
                       normalize=False)
        for split in ("train", "test")
    )  # fmt: skip
    expected = clip_benchmark_linear_probe(*train, *test).metrics
    assert metrics == {f"linear_clip_benchmark_backbone/shapes/{name}": value for name, value in expected.items()}
    assert metrics["linear_clip_benchmark_backbone/shapes/top1"] != 100 / 8  # not the constant joint features
