from __future__ import annotations

import pytest
import torch

from protorkd.errors import UsageError
from protorkd.eval.linear_probe import fit_logistic_regression, linear_probe


def _blobs(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int):
    """Gaussian blobs around class centres that depend only on (n_classes, dim); `seed` draws the noise."""
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(n_classes * 1000 + dim)) * 4
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_linearly_separable_classes_reach_100():
    x, y = _blobs(40, 5, 16, 0.5, 0)
    x_test, y_test = _blobs(20, 5, 16, 0.5, 1)
    metrics = linear_probe(x, y, x_test, y_test, device="cpu")
    assert metrics["top1"] == 100.0 and metrics["val_top1"] == 100.0


def test_random_labels_give_chance_accuracy():
    generator = torch.Generator().manual_seed(1)
    x, x_test = torch.randn(600, 8, generator=generator), torch.randn(2000, 8, generator=generator)
    y, y_test = torch.randint(0, 4, (600,), generator=generator), torch.randint(0, 4, (2000,), generator=generator)
    assert abs(linear_probe(x, y, x_test, y_test, device="cpu")["top1"] - 25.0) < 4.0


def test_the_l2_strength_never_depends_on_the_test_set():
    x, y = _blobs(30, 4, 8, 3.0, 2)
    x_test, y_test = _blobs(30, 4, 8, 3.0, 3)
    chosen = linear_probe(x, y, x_test, y_test, device="cpu")["l2"]
    shuffled = linear_probe(x, y, x_test, y_test[torch.randperm(len(y_test))], device="cpu")["l2"]
    assert chosen == shuffled


def test_lbfgs_reaches_the_regularised_optimum():
    x, y = _blobs(30, 3, 5, 2.0, 4)
    weight, bias = fit_logistic_regression(x, y, 3, l2=0.1, tolerance=1e-6)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.05 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4  # float32 rounding: ~2e-5


def test_torch_solver_matches_sklearn_within_half_a_point():
    x, y = _blobs(100, 6, 24, 6.0, 5)
    x_test, y_test = _blobs(200, 6, 24, 6.0, 7)
    torch_metrics = linear_probe(x, y, x_test, y_test, solver="torch", device="cpu")
    sklearn_metrics = linear_probe(x, y, x_test, y_test, solver="sklearn")
    assert abs(torch_metrics["top1"] - sklearn_metrics["top1"]) <= 0.5


def test_an_unknown_solver_is_a_usage_error():
    x, y = _blobs(5, 2, 3, 1.0, 6)
    with pytest.raises(UsageError, match="valid: torch, sklearn"):
        linear_probe(x, y, x, y, solver="svm")
