"""Linear probe: logistic regression on frozen image features, its L2 strength chosen by k-fold validation.

The protocol of the CLIP paper (appendix A.3) as CLIP_benchmark runs it: the L2 strength is searched on
training data only, with CLIP_benchmark's coarse-to-fine search over 97 log-spaced values (`L2Grid`,
`sweep_l2`); the chosen value is refitted on all of train and scored once on test.

Where CLIP_benchmark scores each value by accuracy on one validation split, here each value is scored by
its stratified 5-fold cross-validated log-likelihood (the held-out cross-entropy, glmnet's default
criterion for logistic regression, `cv.glmnet(type.measure = "deviance")`), and an exact tie goes to the
stronger regularisation. Validation accuracy is a step function of the L2 strength: neighbouring values
differ by a single image, values decades apart tie, and which one wins flips with rounding-level changes of
the features (a 1-ulp change moved a collapsed model's probe by 5 points, tests/eval/test_linear_probe.py).
The held-out log-likelihood is smooth, so a small change of the data moves the choice to a neighbouring
value at most. `sweep_l2` also serves ELEVATER's probe (`eval.elevater.probe_scores`: the toolkit's grid,
its validation split and the dataset's own metric).

Features are standardised with train statistics (`logistic.standardize`, sklearn's StandardScaler) and
fitted by `logistic.solver_fit` ("torch": whitened L-BFGS on `device`; "sklearn": the reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from protorkd.errors import UsageError
from protorkd.eval.logistic import SOLVERS, Fit, Params, cpu_threads_for, solver_fit, standardize
from protorkd.eval.ranking import accuracy_metrics, topk_hits

DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class L2Grid:
    """`points` log-spaced L2 strengths in [10^low, 10^high], searched coarse to fine.

    First the `coarse` evenly spaced values (grid indices 0, 16, ..., 96 for 97 points and 7 coarse
    ones), then the best one and its neighbours at distances step/2, step/4, ..., 1 grid points (8, 4, 2, 1):
    CLIP_benchmark's `find_peak` loop and the ELEVATER toolkit's `hyperparameter_sweep`. At most
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
ELEVATER_GRID = L2Grid(-6.0, 6.0)  # the toolkit's SEARCH_WD_LOG_LOWER / _UPPER defaults


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


def linear_probe(
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
) -> dict[str, float]:
    """Test metrics (%) with the L2 strength of best stratified `folds`-fold cross-validated log-likelihood.

    train_features [N, D], test_features [M, D]. Returns `accuracy_metrics` of the refitted classifier on
    test (top1, top5 with >= 5 classes, mean_per_class_recall), `cv_top1` (the cross-validated accuracy of
    the chosen value, %) and `l2`. The torch solver runs on `device`, sklearn always on the CPU. Memory: the
    training features are held about `folds` times (one rotated copy per fold).
    """
    if solver not in SOLVERS:
        raise UsageError(f"unknown linear-probe solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if len(train_labels) < 2:
        raise UsageError("the linear probe needs at least 2 training images")
    if solver == "sklearn":
        device = "cpu"
    x_train, x_test = standardize(train_features.float().to(device), test_features.float().to(device))
    y_train, y_test = train_labels.long().to(device), test_labels.long().to(device)
    n_classes = int(max(int(y_train.max()), int(y_test.max())) + 1)
    fold_of = stratified_folds(y_train, min(folds, len(y_train)), seed).to(device)
    with cpu_threads_for(x_train):
        splits = []
        for fold in fold_of.unique().tolist():
            held_out = fold_of == fold
            fits = WarmStarts(solver_fit(solver, x_train[~held_out], y_train[~held_out], n_classes))
            splits.append((fits, x_train[held_out], y_train[held_out]))

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
    metrics = accuracy_metrics((x_test @ weight.T + bias).cpu(), y_test.cpu())
    return {**metrics, "cv_top1": 100.0 * correct / len(y_train), "l2": choice.l2}
