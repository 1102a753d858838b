"""95 % intervals for the numbers a result file reports, and the per-class breakdown of a classification.

- accuracies (top-1, top-5, of zero-shot and linear probes): the Wilson score interval of a binomial
  proportion (Wilson 1927), the interval the test images alone allow: it says nothing about the variance of
  training or of a probe's random initialisation;
- retrieval recall@K and their mean: a percentile bootstrap over images (each resampled image brings its
  captions, so text->image resamples whole caption groups), 1,000 resamples, seeded.

Fractional hits (an exact tie counts as its expected hit, `eval.ranking`) enter both as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from protorkd.eval.ranking import topk_hits

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal
BOOTSTRAP_RESAMPLES = 1000


def wilson_interval(successes: float, total: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) in % of the Wilson score interval of `successes` out of `total` trials."""
    if total <= 0:
        return (math.nan, math.nan)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def bootstrap_recall_intervals(
    image_hits: dict[str, torch.Tensor],
    text_hits: dict[str, torch.Tensor],
    text_to_image: torch.Tensor,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """{metric: (low, high) in %} of every recall and of `mean_recall`, resampling images with replacement.

    image_hits {metric: [I]} (NaN for an image left out, e.g. without captions), text_hits {metric: [T]},
    text_to_image [T]. Each resample weighs every image by how often it was drawn, and every caption by
    its image's weight.
    """
    n_images = len(next(iter(image_hits.values())))
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_images, (resamples, n_images), generator=generator)
    weights = torch.zeros(resamples, n_images, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n_images, dtype=torch.float64)
    )  # [R, I]
    caption_weights = weights[:, text_to_image.long()]  # [R, T]
    samples: dict[str, torch.Tensor] = {}
    for name, hits in image_hits.items():
        kept = ~hits.isnan()
        samples[name] = (weights[:, kept] @ hits[kept]) / weights[:, kept].sum(dim=1)
    for name, hits in text_hits.items():
        samples[name] = (caption_weights @ hits) / caption_weights.sum(dim=1)
    samples["mean_recall"] = torch.stack(list(samples.values())).mean(dim=0)
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
    out = {}
    for name, values in samples.items():
        low, high = torch.nanquantile(values, quantiles).tolist()
        out[name] = (100.0 * low, 100.0 * high)
    return out


@dataclass
class ClassBreakdown:
    """Per class: its test images and its expected top-1 (and top-5) hits."""

    images: list[int]
    top1_hits: list[float]
    top5_hits: list[float] | None


def classification_extras(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, tuple[float, float]], ClassBreakdown]:
    """The Wilson intervals {"top1": (low, high), ["top5": ...]} (%) of logits [N, C] for labels [N], with the
    same top-k rule as `ranking.accuracy_metrics` (top5 from 5 classes), and the per-class breakdown."""
    n_classes = logits.shape[1]
    hits = topk_hits(logits, labels.long(), (1, 5) if n_classes >= 5 else (1,))
    intervals = {f"top{k}": wilson_interval(float(h.sum()), len(h)) for k, h in hits.items()}
    labels = labels.long()

    def per_class(values: torch.Tensor) -> list[float]:
        return torch.zeros(n_classes, dtype=torch.float64).index_add_(0, labels, values.double()).tolist()

    counts = torch.bincount(labels, minlength=n_classes).tolist()
    return intervals, ClassBreakdown(counts, per_class(hits[1]), per_class(hits[5]) if 5 in hits else None)
