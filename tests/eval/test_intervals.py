"""95 % intervals: Wilson's against scipy's, the retrieval bootstrap against its definition written as a loop, and
the evaluation precision's resolution."""

from __future__ import annotations

import pytest
import torch

from protorkd.eval.features import resolve_eval_precision
from protorkd.eval.intervals import bootstrap_recall_intervals, classification_extras, wilson_interval
from protorkd.eval.retrieval import recall_metrics, retrieval_hits
from protorkd.precision import Precision


@pytest.mark.parametrize(("successes", "total"), [(8, 10), (0, 10), (10, 10), (377, 1000), (1, 3)])
def test_the_wilson_interval_is_scipys(successes, total):
    from scipy.stats import binomtest

    reference = binomtest(successes, total).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(successes, total)
    assert (low, high) == pytest.approx((100 * reference.low, 100 * reference.high), abs=1e-9)


def test_classification_intervals_count_the_expected_hits_of_ties():
    # 4 images of 2 classes; image 3's two logits tie: it counts half a hit (`ranking`), so 2.5 of 4
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 3.0], [5.0, 5.0]])
    intervals, breakdown = classification_extras(logits, torch.tensor([0, 1, 0, 1]))
    assert intervals["top1"] == pytest.approx(wilson_interval(2.5, 4)) and "top5" not in intervals
    assert breakdown.images == [2, 2] and breakdown.top1_hits == [1.0, 1.5]


def test_the_retrieval_bootstrap_resamples_images_with_their_captions():
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(12, 6, generator=generator), dim=1)
    owners = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10])  # image 11 has no caption
    texts = torch.nn.functional.normalize(images[owners] + 0.9 * torch.randn(15, 6, generator=generator), dim=1)
    image_hits, text_hits = retrieval_hits(images, texts, owners, ks=(1, 5))
    ours = bootstrap_recall_intervals(image_hits, text_hits, owners, resamples=200, seed=3)
    # the definition, one resample at a time: draw 12 images with replacement (the same draws), recall over
    # the drawn images that have captions, and over the captions of the drawn images
    draws = torch.randint(12, (200, 12), generator=torch.Generator().manual_seed(3))
    samples = {name: [] for name in ours}
    for drawn in draws.tolist():
        i2t = {n: [float(h[i]) for i in drawn if i != 11] for n, h in image_hits.items()}
        t2i = {n: [float(h[t]) for i in drawn for t in range(15) if owners[t] == i] for n, h in text_hits.items()}
        means = {n: sum(v) / len(v) for n, v in {**i2t, **t2i}.items()}
        for name, value in means.items():
            samples[name].append(value)
        samples["mean_recall"].append(sum(means.values()) / len(means))
    for name, values in samples.items():
        low, high = torch.quantile(
            torch.tensor(values, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64)
        )
        assert ours[name] == pytest.approx((100 * float(low), 100 * float(high)), abs=1e-9), name
    metrics = recall_metrics(image_hits, text_hits)
    assert all(ours[name][0] <= metrics[name] <= ours[name][1] for name in ours)


def test_the_evaluation_precision_is_chosen_once_and_names_what_ran():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_eval_precision("auto", cpu) is Precision.FP32
    assert resolve_eval_precision("auto", cuda) is Precision.AMP  # CLIP_benchmark's default: fp16 autocast
    assert resolve_eval_precision("amp", cpu) is Precision.FP32  # no fp16 autocast on the CPU: fp32 ran
    assert resolve_eval_precision("amp_bf16", cpu) is Precision.AMP_BF16
    assert resolve_eval_precision(Precision.FP32, cuda) is Precision.FP32
    with pytest.raises(Exception, match="valid: auto, fp32, amp, amp_bf16"):
        resolve_eval_precision("bf16", cpu)
