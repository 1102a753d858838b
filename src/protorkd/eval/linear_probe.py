"""The `cv` linear probe: logistic regression on frozen image features, its L2 strength by k-fold validation.

One of the two linear-probe protocols (`--linear-protocol`; the other, CLIP_benchmark's own, is in
`linear_clip_benchmark.py`). It is the CLIP paper's protocol (appendix A.3: L-BFGS logistic regression, the
L2 strength searched on training data only) with CLIP_benchmark's coarse-to-fine search over 97
log-spaced values (`L2Grid`, `sweep_l2`); the chosen value is refitted on all of train and scored once on
test. Its records are named `linear_cv_*` (`lp_cv_*` in CLIP_benchmark files), never CLIP_benchmark's.

Each L2 value is scored by its stratified 5-fold cross-validated log-likelihood (the held-out
cross-entropy, glmnet's default criterion for logistic regression, `cv.glmnet(type.measure = "deviance")`),
and an exact tie goes to the stronger regularisation. Validation accuracy is a step function of the L2
strength: neighbouring values differ by a single image, values decades apart tie, and which one wins flips
with rounding-level changes of the features (a 1-ulp change moved a collapsed model's probe by 5 points,
tests/eval/test_linear_probe.py). The held-out log-likelihood is smooth, so a small change of the data moves
the choice to a neighbouring value at most.

Features are standardised with train statistics (`logistic.Standardizer`) and fitted by
`logistic.solver_fit` ("torch": whitened L-BFGS on `device`; "sklearn": the reference). Memory: one
standardised copy of the training features, in fold order, so that each fold's training rows are two
views of it; nothing else scales with the number of images (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from protorkd.errors import UsageError
from protorkd.eval.logistic import SOLVERS, Fit, Params, Standardizer, cpu_threads_for, solver_fit
from protorkd.eval.ranking import accuracy_metrics, topk_hits

DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class L2Grid:
    """`points` log-spaced L2 strengths in [10^low, 10^high], searched coarse to fine.

    First the `coarse` evenly spaced values (grid indices 0, 16, ..., 96 for 97 points and 7 coarse
    ones), then the best one and its neighbours at distances step/2, step/4, ..., 1 grid points (8, 4, 2, 1):
    the schedule of CLIP_benchmark's `find_peak` loop and the ELEVATER toolkit's `hyperparameter_sweep`. At most
    coarse + 2 * len(spans) values are fitted (15 of 97).
    """

    low: float = -6.0
    high: float = 2.0
    points: int = 97
    coarse: int = 7

    @property
    def values(self) -> list[float]:
        return np.logspace(self.low, self.high, num=self.points).tolist()

    def coarse_indices(self) -> list[int]:
        step = (self.points - 1) // (self.coarse - 1)
        return [i * step for i in range(self.coarse)]

    def spans(self) -> list[int]:
        spans, span = [], (self.points - 1) // (self.coarse - 1) // 2
        while span > 0:
            spans.append(span)
            span //= 2
        return spans


CLIP_BENCHMARK_GRID = L2Grid(-6.0, 2.0)  # CLIP_benchmark's weight-decay range, np.logspace(-6, 2, num=97)


@dataclass
class L2Choice:
    """The outcome of a sweep: the chosen grid index and L2 strength, its score (-inf when no value scored),
    and the score of every value tried {grid index: score}."""

    index: int
    l2: float
    score: float
    scores: dict[int, float] = field(default_factory=dict)


def sweep_l2(score: Callable[[float], float], grid: L2Grid) -> L2Choice:
    """The L2 strength with the best `score` (higher is better) by `grid`'s coarse-to-fine search.

    Each value is scored once. A NaN score counts as -inf; among equal scores the stronger L2 (the
    larger value) wins.
    """
    values = grid.values
    scores: dict[int, float] = {}

    def best(indices: list[int]) -> int:
        for index in indices:
            if index not in scores:
                value = score(values[index])
                scores[index] = value if not math.isnan(value) else -math.inf
        return max(indices, key=lambda index: (scores[index], index))

    peak = best(grid.coarse_indices())
    for span in grid.spans():
        peak = best(sorted({max(peak - span, 0), peak, min(peak + span, grid.points - 1)}))
    return L2Choice(peak, values[peak], scores[peak], scores)


class WarmStarts:
    """The fits of one training set, each warm-started from the fit at the nearest L2 (in log scale) done
    before; `done` keeps them {l2: params}."""

    def __init__(self, fit: Fit) -> None:
        self.fit = fit
        self.done: dict[float, Params] = {}

    def __call__(self, l2: float) -> Params:
        if l2 not in self.done:
            nearest = min(self.done, key=lambda v: abs(math.log(v / l2)), default=None)
            self.done[l2] = self.fit(l2, self.done[nearest] if nearest is not None else None)
        return self.done[l2]


def stratified_folds(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """[N] fold index in 0..folds-1: each class's images in a seeded random order, dealt round-robin (the
    deal continues from one class to the next, so folds differ in size by at most one)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class = order[torch.argsort(labels.cpu()[order], stable=True)]
    fold = torch.empty(len(labels), dtype=torch.long)
    fold[by_class] = torch.arange(len(labels)) % folds
    return fold


@dataclass
class ProbeResult:
    """A linear probe's metrics (accuracies in %, plus what the protocol chose), its test logits [M, C], and
    the protocol's fixed settings its records carry (CLIP_benchmark's `epochs`, `seed`, `fewshot_k`)."""

    metrics: dict[str, float]
    test_logits: torch.Tensor
    settings: dict[str, int] = field(default_factory=dict)


def cv_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    solver: str = "torch",
    grid: L2Grid = CLIP_BENCHMARK_GRID,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """The L2 strength of best stratified `folds`-fold cross-validated log-likelihood, refitted on all of train.

    train_features [N, D], test_features [M, D]. Metrics: `ranking.accuracy_metrics` of the test logits
    (top1, top5 with >= 5 classes, mean_per_class_recall), `cv_top1` (the cross-validated accuracy of the
    chosen value, %) and `l2`. The torch solver runs on `device`, sklearn always on the CPU.
    """
    if solver not in SOLVERS:
        raise UsageError(f"unknown linear-probe solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if len(train_labels) < 2:
        raise UsageError("the linear probe needs at least 2 training images")
    if solver == "sklearn":
        device = "cpu"
    train_labels, test_labels = train_labels.long(), test_labels.long()
    n_classes = int(max(int(train_labels.max()), int(test_labels.max())) + 1)
    fold_of = stratified_folds(train_labels, min(folds, len(train_labels)), seed)
    order = torch.argsort(fold_of, stable=True)  # fold by fold: each fold's training rows are two views
    ends = torch.cumsum(torch.bincount(fold_of), 0).tolist()
    starts = [0, *ends[:-1]]
    scaler = Standardizer.fit(train_features.float())
    x_train = scaler(train_features.float().to(device), order.to(device))  # [N, D] standardised, fold order
    y_train = train_labels[order].to(device)
    with cpu_threads_for(x_train):
        splits = []
        for start, end in zip(starts, ends):
            kept = [(x_train[a:b], y_train[a:b]) for a, b in ((0, start), (end, len(y_train))) if b > a]
            fit = solver_fit(solver, [x for x, _ in kept], [y for _, y in kept], n_classes)
            splits.append((WarmStarts(fit), x_train[start:end], y_train[start:end]))

        def cv_log_likelihood(l2: float) -> float:
            total = 0.0
            for fits, x_val, y_val in splits:
                weight, bias = fits(l2)
                logits = (x_val @ weight.T + bias).double()
                total -= F.cross_entropy(logits, y_val, reduction="sum").item()
            return total / len(y_train)

        choice = sweep_l2(cv_log_likelihood, grid)
        weight, bias = solver_fit(solver, x_train, y_train, n_classes)(choice.l2, splits[0][0].done[choice.l2])
        correct = 0.0
        for fits, x_val, y_val in splits:
            fold_weight, fold_bias = fits(choice.l2)
            correct += topk_hits((x_val @ fold_weight.T + fold_bias).cpu(), y_val.cpu(), (1,))[1].sum().item()
        test_logits = (scaler(test_features.float().to(device)) @ weight.T + bias).cpu()
    metrics = accuracy_metrics(test_logits, test_labels)
    settings = {"folds": len(splits), "seed": seed, "fewshot_k": -1}
    return ProbeResult({**metrics, "cv_top1": 100.0 * correct / len(y_train), "l2": choice.l2}, test_logits, settings)
