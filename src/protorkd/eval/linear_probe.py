"""Linear probe: logistic regression on frozen image features, L2 strength chosen on validation.

The CLIP paper's protocol: carve a validation split out of train, pick the L2 strength there, refit on
all of train and score once on test. Hyperparameters never see the test set. `sweep_l2` walks the L2 grid;
it serves this module's `linear_probe` (random 20% validation split, validation accuracy) and ELEVATER's
probe (`eval.elevater.probe_scores`: class-balanced split, the dataset's own metric).

Two solvers minimise the same objective, mean cross-entropy + l2/2 * ||W||^2 (bias not penalised):
- "torch" (default): full-batch L-BFGS in float32 on the given device, in a whitened basis (see
  `LogisticRegressionProblem`), each fit warm-started from the previous one.
- "sklearn": `LogisticRegression(C=1 / (l2 * n))` on the CPU, the reference (benchmarks/bench_eval.py
  compares them).
Multi-label targets (ELEVATER's voc2007) use `fit_one_vs_rest`: one sigmoid classifier per class.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protorkd.errors import UsageError
from protorkd.eval.zeroshot import accuracy_metrics

DEFAULT_L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
SOLVERS = ("torch", "sklearn")
SINGLE_THREAD_ELEMENTS = 1 << 24  # CPU feature matrices up to this size are solved on one thread
Params = tuple[torch.Tensor, torch.Tensor]  # (weight [C, D], bias [C])
Fit = Callable[[float, Params | None], Params]  # (l2, warm start) -> parameters


class LogisticRegressionProblem:
    """Mean cross-entropy + l2/2 * ||W||^2 on fixed features [N, D], solved by L-BFGS in a whitened basis.

    Why: features of a network are strongly correlated, so plain L-BFGS needs ~1000 iterations at weak L2
    (sklearn's lbfgs stops there unconverged). Written as W = (V / sqrt(s)) U^T, with U the eigenvectors
    of the feature covariance and s = eigenvalues + 10 * l2, the data term's Hessian in V is close to the
    identity and L-BFGS converges in 10-30 iterations. The penalty becomes l2/2 * sum(V^2 / s): the
    objective and its minimiser are exactly those of the original problem. The rotation is computed once.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> None:
        n = features.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh((features.T @ features).double() / n)
        self.eigenvalues = eigenvalues.clamp(min=0).to(features.dtype)  # [D]
        self.basis = eigenvectors.to(features.dtype)  # [D, D], columns U
        self.rotated = features @ self.basis  # [N, D]
        self.labels = labels
        self.n_classes = n_classes
        self.columns = torch.arange(n, device=features.device)

    def fit(self, l2: float, init: Params | None = None, *, max_iter: int = 1000, tolerance: float = 1e-4) -> Params:
        """(weight [C, D], bias [C]) at the optimum; stops like sklearn's lbfgs (iterations, max |gradient|)."""
        n, dim = self.rotated.shape
        scale = self.eigenvalues + max(10.0 * l2, 1e-6)  # [D]
        features = self.rotated * scale.rsqrt()  # [N, D] whitened
        features_t = features.T.contiguous()  # [D, N]: logits as [C, N], softmax over the outer dimension
        if init is None:
            v = torch.zeros(self.n_classes, dim, dtype=features.dtype, device=features.device)
            bias = torch.zeros(self.n_classes, dtype=features.dtype, device=features.device)
        else:
            v = (init[0] @ self.basis) * scale.sqrt()
            bias = init[1].clone()
        optimizer = torch.optim.LBFGS(
            [v, bias],
            lr=1.0,
            max_iter=max_iter,
            max_eval=max_iter * 5 // 4,
            history_size=10,
            tolerance_grad=tolerance,
            tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )
        labels, columns = self.labels, self.columns

        def closure() -> torch.Tensor:
            log_probs = torch.log_softmax(torch.addmm(bias[:, None], v, features_t), dim=0)  # [C, N]
            v_scaled = v / scale
            loss = -log_probs[labels, columns].mean() + 0.5 * l2 * (v_scaled * v).sum()
            residual = log_probs.exp_()  # (softmax - one hot) / N: the gradient of the mean cross-entropy
            residual[labels, columns] -= 1.0
            residual /= n
            v.grad = torch.addmm(v_scaled, residual, features, beta=l2)
            bias.grad = residual.sum(dim=1)
            return loss

        with torch.no_grad():
            optimizer.step(closure)
        return (v * scale.rsqrt()) @ self.basis.T, bias


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    l2: float,
    *,
    init: Params | None = None,
    max_iter: int = 1000,
    tolerance: float = 1e-4,
) -> Params:
    """One fit of mean cross-entropy + l2/2 * ||W||^2: features [N, D] -> (weight [C, D], bias [C])."""
    problem = LogisticRegressionProblem(features, labels, n_classes)
    return problem.fit(l2, init, max_iter=max_iter, tolerance=tolerance)


def fit_one_vs_rest(
    features: torch.Tensor,
    targets: torch.Tensor,
    l2: float,
    *,
    init: Params | None = None,
    max_iter: int = 150,
) -> Params:
    """C independent sigmoid classifiers in one L-BFGS run: features [N, D], multi-hot targets [N, C] ->
    (weight [C, D], bias [C]) minimising the per-image sum of binary cross-entropies + l2/2 * ||W||^2."""
    if init is None:
        weight = torch.zeros(targets.shape[1], features.shape[1], dtype=features.dtype, device=features.device)
        bias = torch.zeros(targets.shape[1], dtype=features.dtype, device=features.device)
    else:
        weight, bias = (t.detach().clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.addmm(bias, features, weight.T)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(features)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _fit_sklearn(features: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float) -> Params:
    from sklearn.linear_model import LogisticRegression

    x, y = features.cpu().numpy(), labels.cpu().numpy()
    classifier = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=1000)
    classifier.fit(x, y)
    weight = torch.zeros(n_classes, x.shape[1], dtype=features.dtype)
    bias = torch.full((n_classes,), -1e4, dtype=features.dtype)  # a class absent from training never wins
    classes = torch.as_tensor(classifier.classes_)
    if len(classes) == 2:  # sklearn's binary model holds one row: class 1 vs class 0
        coef = torch.as_tensor(classifier.coef_, dtype=features.dtype)[0] / 2
        intercept = float(classifier.intercept_[0]) / 2
        weight[classes[1]], bias[classes[1]] = coef, intercept
        weight[classes[0]], bias[classes[0]] = -coef, -intercept
    else:
        weight[classes] = torch.as_tensor(classifier.coef_, dtype=features.dtype)
        bias[classes] = torch.as_tensor(classifier.intercept_, dtype=features.dtype)
    return weight.to(features.device), bias.to(features.device)


@contextlib.contextmanager
def _cpu_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads. Small solves are faster on one: each of their ~1000
    tiny matmuls would otherwise pay a thread-pool synchronisation, which costs milliseconds on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero mean, unit variance per dimension, with statistics of `train` only."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp(min=1e-6)
    return tuple((x - mean) / std for x in (train, *others))


def _accuracy(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    return ((features @ weight.T + bias).argmax(1) == labels).float().mean().item()


@dataclass
class L2Choice:
    """The outcome of an L2 sweep: the chosen strength, the fit that scored (None when no value scored, e.g.
    every validation score was NaN) and its validation score (-inf when none)."""

    l2: float
    params: Params | None
    score: float


def sweep_l2(
    fit: Fit, score: Callable[[Params], float], l2_grid: tuple[float, ...], *, refine: bool = False
) -> L2Choice:
    """The L2 strength whose fit (on the fit split) has the best validation `score`.

    The grid is walked from strong to weak, each fit warm-started from the previous one (a good start for
    the next). Ties, and NaN scores, keep the stronger regularisation. `refine` then tries the half-decade
    neighbours of the best value, warm-started from its fit.
    """
    best = L2Choice(max(l2_grid), None, -math.inf)
    params = None
    for l2 in sorted(l2_grid, reverse=True):
        params = fit(l2, params)
        value = score(params)
        if value > best.score:
            best = L2Choice(l2, params, value)
    if refine and best.params is not None:
        start = best
        up = [start.l2 * math.sqrt(10)] if start.l2 < max(l2_grid) else []
        down = [start.l2 / math.sqrt(10)] if start.l2 > min(l2_grid) else []
        for l2 in up + down:
            params = fit(l2, start.params)
            value = score(params)
            if value > best.score:
                best = L2Choice(l2, params, value)
    return best


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    solver: str = "torch",
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
    refine: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    mean_per_class: bool = False,
) -> dict[str, float]:
    """Test metrics (%) with the L2 strength that scored best on a validation split of train.

    train_features [N, D], test_features [M, D], standardised with train statistics. Every grid value is
    fitted on the other 80% of train (`sweep_l2`, by validation accuracy; `refine` adds the half-decade
    neighbours of the best). The chosen value is refitted on all of train. The torch solver runs on
    `device`; sklearn always on the CPU. Returns top1, top5 [, mean_per_class_recall], val_top1 and l2.
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
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed)).to(device)
    n_val = max(1, int(len(order) * val_fraction))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    x_val, y_val = x_train[val_idx], y_train[val_idx]

    def solve(x: torch.Tensor, y: torch.Tensor) -> Fit:
        if solver == "sklearn":
            return lambda l2, init=None: _fit_sklearn(x, y, n_classes, l2)
        return LogisticRegressionProblem(x, y, n_classes).fit

    small = x_train.device.type == "cpu" and x_train.numel() <= SINGLE_THREAD_ELEMENTS
    with _cpu_threads(1) if small else contextlib.nullcontext():
        choice = sweep_l2(
            solve(x_train[fit_idx], y_train[fit_idx]),
            lambda params: _accuracy(x_val, y_val, *params),
            l2_grid,
            refine=refine,
        )
        weight, bias = solve(x_train, y_train)(choice.l2, choice.params)
    metrics = accuracy_metrics((x_test @ weight.T + bias).cpu(), y_test.cpu(), mean_per_class=mean_per_class)
    return {**metrics, "val_top1": 100.0 * choice.score, "l2": choice.l2}
