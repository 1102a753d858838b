"""Logistic regression on fixed features: the solvers behind the cv linear probe and ELEVATER's probe.

Every solver minimises mean cross-entropy + l2/2 * ||W||^2 (bias not penalised) on standardised features:
- `LogisticRegressionProblem` (solver "torch", the default): full-batch L-BFGS in float32 on any device, in a
  whitened basis computed once per training set;
- `fit_sklearn` (solver "sklearn"): `LogisticRegression(C=1 / (l2 * n))` on the CPU, the reference;
- the same problem with `multilabel=True`: one sigmoid classifier per class (the sum of the classes' binary
  cross-entropies), for multi-label targets (ELEVATER's voc2007).

Every torch fit says whether it converged (`LogisticRegressionProblem.converged`): L-BFGS stopped on its
gradient or change tolerance, not on its iteration or evaluation budget.

`Standardizer` is sklearn's `StandardScaler` with one deviation: a dimension whose spread is only float
rounding keeps scale 1 (see its docstring).

Memory: a problem holds no copy of its features. Its training rows are given as row blocks (views, e.g. all
cross-validation folds but one of one fold-ordered tensor), and every pass over them goes block by block,
so the temporaries are O(block rows x classes) whatever the number of images (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SOLVERS = ("torch", "sklearn")
SINGLE_THREAD_ELEMENTS = 1 << 24  # CPU feature matrices up to this size are solved on one thread
EIGENVALUE_FLOOR = 1e-6  # the whitening floor, relative to the largest eigenvalue of the feature covariance
CONSTANT_TOLERANCE = 4.0  # a dimension is constant when its std <= this many float eps of its magnitude
ROW_BLOCK = 1 << 13  # rows per block when statistics are accumulated in float64 (16 MB at D = 256)
BLOCK_ELEMENTS = 1 << 24  # rows x classes of one block of logits (64 MB in float32)
Params = tuple[torch.Tensor, torch.Tensor]  # (weight [C, D], bias [C])
Fit = Callable[[float, Params | None], Params]  # (l2, warm start) -> parameters
Rows = torch.Tensor | Sequence[torch.Tensor]  # one [N, D] tensor, or its row blocks


def _parts(rows: Rows) -> list[torch.Tensor]:
    return [rows] if isinstance(rows, torch.Tensor) else list(rows)


def _blocks(features: torch.Tensor, rows: int = ROW_BLOCK) -> Iterator[torch.Tensor]:
    """Row blocks of `features` in float64 (never the whole matrix in float64 at once)."""
    for start in range(0, features.shape[0], rows):
        yield features[start : start + rows].double()


@dataclass(frozen=True)
class Standardizer:
    """Zero mean and unit variance per dimension with train statistics (float64), as sklearn's StandardScaler:
    the population std (ddof 0), and a dimension whose std is at most 4 float eps of its largest magnitude
    keeps scale 1.

    The last rule is a deviation from StandardScaler, whose `_handle_zeros_in_scale` keeps scale 1 only for
    a std below 10 eps *absolute*: a dimension of features near 4.0 that varies by an ulp or two (4.8e-7)
    has a std far above that, and StandardScaler would blow this rounding noise up to unit variance, as
    large as any real feature. Here it is centred but not scaled, which is what keeps the probe of a
    collapsed model stable under rounding-level changes (tests/eval/test_linear_probe.py).
    """

    mean: torch.Tensor  # [D] float64
    scale: torch.Tensor  # [D] float64

    @classmethod
    def fit(cls, train: torch.Tensor) -> Standardizer:
        n = train.shape[0]
        mean = sum(block.sum(dim=0) for block in _blocks(train)) / n
        variance = sum((block - mean).pow(2).sum(dim=0) for block in _blocks(train)) / n
        magnitude = torch.stack([block.abs().amax(dim=0) for block in _blocks(train)]).amax(dim=0)
        std = variance.sqrt()
        constant = std <= CONSTANT_TOLERANCE * torch.finfo(train.dtype).eps * magnitude
        return cls(mean, torch.where(constant, torch.ones_like(std), std))

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(x[rows] - mean) / scale in the dtype of `x`, written block by block into one new tensor."""
        count = x.shape[0] if rows is None else len(rows)
        out = torch.empty((count, x.shape[1]), dtype=x.dtype, device=x.device)
        for start in range(0, count, ROW_BLOCK):
            block = x[start : start + ROW_BLOCK] if rows is None else x[rows[start : start + ROW_BLOCK]]
            out[start : start + ROW_BLOCK] = (block.double() - self.mean) / self.scale
        return out


def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`train` and `others` standardised with the statistics of `train` (`Standardizer`)."""
    scaler = Standardizer.fit(train)
    return tuple(scaler(x) for x in (train, *others))


class LogisticRegressionProblem:
    """Mean cross-entropy + l2/2 * ||W||^2 on fixed features [N, D], solved by L-BFGS in a whitened basis.

    Why: features of a network are strongly correlated, so plain L-BFGS needs ~1000 iterations at weak L2
    (sklearn's lbfgs stops there unconverged). Written as W = (V / sqrt(s)) U^T, with U the eigenvectors
    of the feature covariance (accumulated and decomposed in float64) and s = eigenvalues + floor, the data
    term's Hessian in V is close to the identity and L-BFGS converges in 10-30 iterations. The penalty
    becomes l2/2 * sum(V^2 / s): the objective and its minimiser are exactly those of the original
    problem. The floor, max(10 * l2, 1e-6 * the largest eigenvalue), is relative, so directions that hold
    only rounding noise are never stretched to the scale of real ones.

    `features` is one [N, D] tensor or its row blocks (labels [N] or blocks alike); nothing is copied: the
    gradient in V is the plain gradient in W mapped through U, computed block by block. With
    `multilabel=True` the targets are multi-hot [N, C] and the data term is the per-image sum of C binary
    cross-entropies (C independent sigmoid classifiers, the ELEVATER toolkit's BCE loss).
    """

    def __init__(self, features: Rows, labels: Rows, n_classes: int, *, multilabel: bool = False) -> None:
        self.parts = _parts(features)
        self.label_parts = _parts(labels)
        self.multilabel = multilabel
        self.converged: dict[float, bool] = {}  # l2 -> whether its last fit converged
        self.n = sum(part.shape[0] for part in self.parts)
        gram = sum(block.T @ block for part in self.parts for block in _blocks(part)) / self.n  # [D, D] float64
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        eigenvalues = eigenvalues.clamp(min=0)
        dtype = self.parts[0].dtype
        self.largest_eigenvalue = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
        self.eigenvalues = eigenvalues.to(dtype)  # [D]
        self.basis = eigenvectors.to(dtype)  # [D, D], columns U
        self.n_classes = n_classes
        self.block_rows = max(1024, BLOCK_ELEMENTS // max(n_classes, 1))

    def floor(self, l2: float) -> float:
        return max(10.0 * l2, EIGENVALUE_FLOOR * self.largest_eigenvalue, torch.finfo(torch.float32).tiny)

    def _data_term(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(sum of cross-entropies, its gradient in W [C, D], in b [C]) over every training row, block by block."""
        total = torch.zeros((), dtype=torch.float64, device=weight.device)
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        for part, labels in zip(self.parts, self.label_parts):
            for start in range(0, part.shape[0], self.block_rows):
                x, y = part[start : start + self.block_rows], labels[start : start + self.block_rows]
                logits = torch.addmm(bias, x, weight.T)  # [B, C]
                if self.multilabel:  # sigmoid - target: the gradient of the binary cross-entropies in the logits
                    total += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").double()
                    residual = logits.sigmoid_().sub_(y)
                else:  # softmax - one hot: the gradient of the cross-entropy in the logits
                    rows = torch.arange(len(y), device=x.device)
                    log_probs = torch.log_softmax(logits, dim=1)
                    total -= log_probs[rows, y].sum(dtype=torch.float64)
                    residual = log_probs.exp_()
                    residual[rows, y] -= 1.0
                grad_weight.addmm_(residual.T, x)
                grad_bias += residual.sum(dim=0)
        return float(total), grad_weight, grad_bias

    def fit(self, l2: float, init: Params | None = None, *, max_iter: int = 1000, tolerance: float = 1e-4) -> Params:
        """(weight [C, D], bias [C]) at the optimum; stops like sklearn's lbfgs (iterations, max |gradient|)."""
        dtype, device = self.basis.dtype, self.basis.device
        scale = self.eigenvalues + self.floor(l2)  # [D]
        inverse_sqrt = scale.rsqrt()
        if init is None:
            v = torch.zeros(self.n_classes, len(scale), dtype=dtype, device=device)
            bias = torch.zeros(self.n_classes, dtype=dtype, device=device)
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

        def closure() -> torch.Tensor:
            v_scaled = v / scale
            total, grad_weight, grad_bias = self._data_term((v * inverse_sqrt) @ self.basis.T, bias)
            v.grad = ((grad_weight / self.n) @ self.basis) * inverse_sqrt + l2 * v_scaled
            bias.grad = grad_bias / self.n
            return torch.tensor(total / self.n + 0.5 * l2 * float((v_scaled * v).sum()), dtype=dtype)

        with torch.no_grad():
            optimizer.step(closure)
        state = optimizer.state[v]
        self.converged[l2] = state["n_iter"] < max_iter and state["func_evals"] < optimizer.defaults["max_eval"]
        return (v * inverse_sqrt) @ self.basis.T, bias


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


def solver_fit(solver: str, features: Rows, labels: Rows, n_classes: int) -> Fit:
    """The `Fit` (l2, warm start) -> params of `solver` on one training set (sklearn ignores warm starts and
    needs the rows in one matrix: it concatenates row blocks)."""
    if solver == "sklearn":
        x, y = torch.cat(_parts(features)), torch.cat(_parts(labels))
        return lambda l2, init=None: fit_sklearn(x, y, n_classes, l2)
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
