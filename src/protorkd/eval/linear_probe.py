"""Linear probe: multinomial logistic regression on frozen features, L2 strength chosen on a validation split.

The CLIP paper's protocol: carve a validation split out of train, pick the L2 strength there, refit on
all of train and score once on test. Hyperparameters never see the test set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float, *, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on mean cross-entropy + l2/2 * ||W||^2. Returns (weight [C, D], bias [C])."""
    weight = torch.zeros(n_classes, features.shape[1], dtype=features.dtype, device=features.device,
                         requires_grad=True)
    bias = torch.zeros(n_classes, dtype=features.dtype, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    mean, std = train.mean(dim=0), train.std(dim=0).clamp(min=1e-6)
    return tuple((x - mean) / std for x in (train, *others))


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, float]:
    """Test top-1 (%) with the L2 strength that scored best on a validation split of train."""
    train_features, test_features = standardize(train_features.double(), test_features.double())
    n_classes = int(max(train_labels.max(), test_labels.max()) + 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_labels), generator=generator)
    n_val = max(1, int(len(order) * val_fraction))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    best_l2, best_acc = l2_grid[0], -1.0
    for l2 in l2_grid:
        weight, bias = fit_logistic_regression(train_features[fit_idx], train_labels[fit_idx], n_classes, l2)
        accuracy = ((train_features[val_idx] @ weight.T + bias).argmax(1) == train_labels[val_idx]).double().mean()
        if accuracy > best_acc:
            best_l2, best_acc = l2, float(accuracy)
    weight, bias = fit_logistic_regression(train_features, train_labels, n_classes, best_l2)
    test_accuracy = ((test_features @ weight.T + bias).argmax(1) == test_labels).double().mean().item()
    return {"top1": 100.0 * test_accuracy, "val_top1": 100.0 * best_acc, "l2": best_l2}
