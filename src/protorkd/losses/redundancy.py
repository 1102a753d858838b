"""Redundancy-reduction objectives between the two towers: VICReg and Barlow Twins.

Both use statistics over the *global* batch (gathered features), as the originals do with
FullGatherLayer (VICReg) and SyncBatchNorm plus an all-reduced correlation matrix (Barlow Twins).
The teacher tower's terms are constants (detached) unless both towers train (`teacher="none"`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protorkd.losses.base import LossInputs, LossModule
from protorkd.losses.common import both_towers, off_diagonal


def vicreg_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unweighted (invariance, variance, covariance) of VICReg (Bardes et al., ICLR 2022) for [N, D] a, b.

    invariance = mean (a - b)^2; variance = 1/2 sum_{x in a,b} mean_j relu(1 - sqrt(Var(x_j) + 1e-4));
    covariance = sum_{x in a,b} sum_{i != j} Cov(x)_ij^2 / D (unbiased variance / covariance).
    """
    n, d = a.shape
    invariance = F.mse_loss(a, b)
    a = a - a.mean(dim=0)
    b = b - b.mean(dim=0)
    std_a = torch.sqrt(a.var(dim=0) + 1e-4)
    std_b = torch.sqrt(b.var(dim=0) + 1e-4)
    variance = F.relu(1 - std_a).mean() / 2 + F.relu(1 - std_b).mean() / 2
    cov_a = a.T @ a / (n - 1)
    cov_b = b.T @ b / (n - 1)
    covariance = off_diagonal(cov_a).pow(2).sum() / d + off_diagonal(cov_b).pow(2).sum() / d
    return invariance, variance, covariance


class VICReg(LossModule):
    """25 * invariance + 25 * variance + 1 * covariance between student and teacher features."""

    def __init__(
        self, invariance: float = 25.0, variance: float = 25.0, covariance: float = 1.0, *, weight: float = 1.0
    ) -> None:
        super().__init__()
        self.coefficients = (invariance, variance, covariance)
        self.weight = weight

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student, teacher = both_towers(inputs)
        invariance, variance, covariance = vicreg_terms(student, teacher)
        w_inv, w_var, w_cov = self.coefficients
        return {
            "vicreg_invariance_loss": self.weight * w_inv * invariance,
            "vicreg_variance_loss": self.weight * w_var * variance,
            "vicreg_covariance_loss": self.weight * w_cov * covariance,
        }


def barlow_twins_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (on-diagonal, off-diagonal) of Barlow Twins (Zbontar et al., ICML 2021) for [N, D] a, b.

    Each feature is standardised over the batch like BatchNorm1d(affine=False) (biased variance,
    eps 1e-5); C = a_std^T b_std / N; on = sum_i (C_ii - 1)^2, off = sum_{i != j} C_ij^2.
    """
    n = a.shape[0]
    a = (a - a.mean(dim=0)) / torch.sqrt(a.var(dim=0, unbiased=False) + 1e-5)
    b = (b - b.mean(dim=0)) / torch.sqrt(b.var(dim=0, unbiased=False) + 1e-5)
    correlation = a.T @ b / n
    on_diagonal = (torch.diagonal(correlation) - 1).pow(2).sum()
    off_diag = off_diagonal(correlation).pow(2).sum()
    return on_diagonal, off_diag


class BarlowTwins(LossModule):
    """on-diagonal + lambda * off-diagonal of the student-teacher cross-correlation (lambda 0.0051).

    The original ProtoRKD code L2-normalised each feature column instead of batch-standardising it
    and divided the all-reduced correlation by the local batch size; this follows the paper.
    """

    def __init__(self, redundancy_weight: float = 0.0051, *, weight: float = 1.0) -> None:
        super().__init__()
        self.redundancy_weight = redundancy_weight
        self.weight = weight

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student, teacher = both_towers(inputs)
        on_diagonal, off_diag = barlow_twins_terms(student, teacher)
        return {
            "barlow_on_diagonal_loss": self.weight * on_diagonal,
            "barlow_off_diagonal_loss": self.weight * self.redundancy_weight * off_diag,
        }
