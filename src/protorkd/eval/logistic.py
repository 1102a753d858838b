"""Logistic regression on fixed features: the solvers behind the linear probe and ELEVATER's probe.

Every solver minimises mean cross-entropy + l2/2 * ||W||^2 (bias not penalised) on standardised features:
- `LogisticRegressionProblem` (solver "torch", the default): full-batch L-BFGS in float32 on any device, in a
  whitened basis computed once per training set;
- `fit_sklearn` (solver "sklearn"): `LogisticRegression(C=1 / (l2 * n))` on the CPU, the reference;
- `fit_one_vs_rest`: one sigmoid classifier per class, for multi-label targets (ELEVATER's voc2007).

`standardize` is sklearn's `StandardScaler`, including its rule for near-constant features: their scale
is 1, so float32 rounding noise in a dimension that does not vary is never blown up to unit variance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

SOLVERS = ("torch", "sklearn")
SINGLE_THREAD_ELEMENTS = 1 << 24  # CPU feature matrices up to this size are solved on one thread
EIGENVALUE_FLOOR = 1e-6  # the whitening floor, relative to the largest eigenvalue of the feature covariance
CONSTANT_TOLERANCE = 4.0  # a dimension is constant when its std <= this many float eps of its magnitude
ROW_BLOCK = 1 << 16  # rows per block when statistics are accumulated in float64
Params = tuple[torch.Tensor, torch.Tensor]  # (weight [C, D], bias [C])
Fit = Callable[[float, Params | None], Params]  # (l2, warm start) -> parameters


def _blocks(features: torch.Tensor) -> Iterator[torch.Tensor]:
    """Row blocks of `features` in float64 (never the whole matrix in float64 at once)."""
    for start in range(0, features.shape[0], ROW_BLOCK):
        yield features[start : start + ROW_BLOCK].double()


def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero mean and unit variance per dimension with train statistics (float64), as sklearn's StandardScaler.

    The std is the population std (ddof 0). A dimension whose std is at most 4 float eps (of the
    features. dtype) of its largest magnitude holds nothing but rounding, and keeps scale 1, as
    sklearn's `_handle_zeros_in_scale` keeps a near-zero scale at 1; dividing by such a std would turn
    rounding noise into a unit-variance feature. Returns the tensors in the dtype of `train`.
    """
    n = train.shape[0]
    mean = sum(block.sum(dim=0) for block in _blocks(train)) / n
    variance = sum((block - mean).pow(2).sum(dim=0) for block in _blocks(train)) / n
    magnitude = train.abs().amax(dim=0).double()
    std = variance.sqrt()
    constant = std <= CONSTANT_TOLERANCE * torch.finfo(train.dtype).eps * magnitude
    scale = torch.where(constant, torch.ones_like(std), std)

    def transform(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=train.dtype, device=x.device)
        for start, block in zip(range(0, x.shape[0], ROW_BLOCK), _blocks(x)):
            out[start : start + ROW_BLOCK] = (block - mean) / scale
        return out

    return tuple(transform(x) for x in (train, *others))


class LogisticRegressionProblem:
    """Mean cross-entropy + l2/2 * ||W||^2 on fixed features [N, D], solved by L-BFGS in a whitened basis.

    Why: features of a network are strongly correlated, so plain L-BFGS needs ~1000 iterations at weak L2
    (sklearn's lbfgs stops there unconverged). Written as W = (V / sqrt(s)) U^T, with U the eigenvectors
    of the feature covariance (accumulated and decomposed in float64) and s = eigenvalues + floor, the data
    term's Hessian in V is close to the identity and L-BFGS converges in 10-30 iterations. The penalty
    becomes l2/2 * sum(V^2 / s): the objective and its minimiser are exactly those of the original
    problem. The floor, max(10 * l2, 1e-6 * the largest eigenvalue), is relative, so directions that hold
    only rounding noise are never stretched to the scale of real ones.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> None:
        n = features.shape[0]
        gram = sum(block.T @ block for block in _blocks(features)) / n  # [D, D] float64
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        eigenvalues = eigenvalues.clamp(min=0)
        self.largest_eigenvalue = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
        self.eigenvalues = eigenvalues.to(features.dtype)  # [D]
        self.basis = eigenvectors.to(features.dtype)  # [D, D], columns U
        self.rotated = features @ self.basis  # [N, D]
        self.labels = labels
        self.n_classes = n_classes
        self.columns = torch.arange(n, device=features.device)

    def floor(self, l2: float) -> float:
        return max(10.0 * l2, EIGENVALUE_FLOOR * self.largest_eigenvalue, torch.finfo(torch.float32).tiny)

    def fit(self, l2: float, init: Params | None = None, *, max_iter: int = 1000, tolerance: float = 1e-4) -> Params:
        """(weight [C, D], bias [C]) at the optimum; stops like sklearn's lbfgs (iterations, max |gradient|)."""
        n, dim = self.rotated.shape
        scale = self.eigenvalues + self.floor(l2)  # [D]
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


def fit_sklearn(features: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float) -> Params:
    """sklearn's lbfgs `LogisticRegression(C=1 / (l2 * n), max_iter=1000)` on the CPU, as (weight, bias)."""
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


def solver_fit(solver: str, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> Fit:
    """The `Fit` (l2, warm start) -> params of `solver` on one training set (sklearn ignores warm starts)."""
    if solver == "sklearn":
        return lambda l2, init=None: fit_sklearn(features, labels, n_classes, l2)
    return LogisticRegressionProblem(features, labels, n_classes).fit


@contextlib.contextmanager
def cpu_threads_for(features: torch.Tensor) -> Iterator[None]:
    """Solve small CPU problems on one intra-op thread: each of their ~1000 tiny matmuls would otherwise pay a
    thread-pool synchronisation, which costs milliseconds on a busy machine."""
    if features.device.type != "cpu" or features.numel() > SINGLE_THREAD_ELEMENTS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
