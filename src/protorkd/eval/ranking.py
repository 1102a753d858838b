"""Top-k hits with ties resolved in expectation: the one rule behind top-k accuracy and retrieval recall@K.

A query ranks candidates by score; it scores a hit at k when one of its positives is among the first k.
Scores can tie exactly (a collapsed model gives every candidate the same score; duplicate captions give
duplicate embeddings). CLIP_benchmark breaks such ties by the order `torch.topk` happens to return, which
depends on the device and the input size; counting a tie for the query (as a `>` rank does) scores a
degenerate model 100. Here a tie counts as the expected hit over a uniformly random order of the tied
candidates: without ties this is exactly the 0/1 hit `topk` gives, and a model whose embeddings are all
equal scores exactly chance.
"""

from __future__ import annotations

import torch


def hit_probability(
    better: torch.Tensor, tied_negatives: torch.Tensor, tied_positives: torch.Tensor | int, k: int
) -> torch.Tensor:
    """P(a positive is in the top k) per query [Q] (float64), the tied candidates in random order.

    better [Q]: candidates scoring strictly above the query's best positive (all negatives);
    tied_negatives [Q]: negatives scoring exactly the best positive's score; tied_positives [Q] (>= 1):
    positives scoring it. With j = k - better places left, the first positive of the tied group falls
    outside them with probability C(n, j) / C(n + m, j) (n tied negatives, m tied positives).
    """
    slots = (k - better).double()
    n = tied_negatives.double()
    m = torch.as_tensor(tied_positives, dtype=torch.float64).expand_as(n)
    j = torch.minimum(slots.clamp(min=0), n)  # clamped so the log-gamma terms stay finite where unused
    log_miss = torch.lgamma(n + 1) + torch.lgamma(n + m - j + 1) - torch.lgamma(n - j + 1) - torch.lgamma(n + m + 1)
    hit = torch.where(m == 1, j / (n + 1), 1.0 - torch.exp(log_miss))  # one positive: exactly j / (n + 1)
    hit = torch.where(slots > n, torch.ones_like(hit), hit)
    return torch.where(slots <= 0, torch.zeros_like(hit), hit)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """{k: [N] expected top-k hit} for scores [N, C] with one correct class per row (labels [N])."""
    correct = scores.gather(1, labels[:, None])
    better = (scores > correct).sum(dim=1)
    tied = (scores == correct).sum(dim=1) - 1
    return {k: hit_probability(better, tied, 1, k) for k in ks}


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's classification metrics (%) of logits [N, C] for labels [N].

    top1; top5 only with at least 5 classes (CLIP_benchmark reports NaN below, here it is left out); and
    mean_per_class_recall, the mean over the classes present in `labels` of their top-1 recall (sklearn's
    `balanced_accuracy_score`, which CLIP_benchmark calls).
    """
    ks = (1, 5) if logits.shape[1] >= 5 else (1,)
    hits = topk_hits(logits, labels, ks)
    metrics = {f"top{k}": 100.0 * hits[k].mean().item() for k in ks}
    present, position = labels.unique(return_inverse=True)
    per_class_hits = torch.zeros(len(present), dtype=torch.float64).index_add_(0, position, hits[1])
    per_class_count = torch.bincount(position, minlength=len(present)).double()
    metrics["mean_per_class_recall"] = 100.0 * (per_class_hits / per_class_count).mean().item()
    return metrics
