"""Redundancy-reduction objectives between the two towers: VICReg and Barlow Twins.

Under DDP, with `--distill-batch local` (the default, ITRA's), VICReg computes over the rank's own rows (ITRA does
not gather them) and Barlow Twins standardises over the rank's rows and sums the cross-correlation over the ranks
(ITRA's all_reduce); with `--distill-batch global` both use the gathered global batch, as the papers' own code
does (VICReg's FullGatherLayer, Barlow Twins' SyncBatchNorm and all-reduced correlation). The teacher tower's
terms are constants (detached) unless both towers train (`teacher="none"`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protorkd.losses.base import LOCAL, LossInputs, LossModule, Scope
from protorkd.losses.common import both_towers, off_diagonal, zero_with_grad


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
        self,
        invariance: float = 25.0,
        variance: float = 25.0,
        covariance: float = 1.0,
        *,
        weight: float = 1.0,
        scope: Scope = LOCAL,
    ) -> None:
        super().__init__()
        self.coefficients = (invariance, variance, covariance)
        self.weight = weight
        self.scope = scope

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student, teacher = both_towers(inputs, self.scope)
        names = ("vicreg_invariance_loss", "vicreg_variance_loss", "vicreg_covariance_loss")
        if student.shape[0] < 2:  # a variance needs two rows; a rank without them contributes a connected 0
            return {name: zero_with_grad(student) + zero_with_grad(teacher) for name in names}
        invariance, variance, covariance = vicreg_terms(student, teacher)
        w_inv, w_var, w_cov = self.coefficients
        return {
            "vicreg_invariance_loss": self.weight * w_inv * invariance,
            "vicreg_variance_loss": self.weight * w_var * variance,
            "vicreg_covariance_loss": self.weight * w_cov * covariance,
        }


def barlow_twins_terms(a: torch.Tensor, b: torch.Tensor, scope: Scope = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (on-diagonal, off-diagonal) of Barlow Twins (Zbontar et al., ICML 2021) for [B, D] a, b.

    Each feature is standardised over the rank's batch like a (non-synchronised) BatchNorm1d(affine=False)
    (biased variance, eps 1e-5); C = sum over ranks of a_std^T b_std, divided by the global batch N, as Barlow
    Twins' own DDP code sums it (`scope.summed`); on = sum_i (C_ii - 1)^2, off = sum_{i != j} C_ij^2.
    """
    if a.shape[0] > 0:
        a = (a - a.mean(dim=0)) / torch.sqrt(a.var(dim=0, unbiased=False) + 1e-5)
        b = (b - b.mean(dim=0)) / torch.sqrt(b.var(dim=0, unbiased=False) + 1e-5)
    correlation = scope.summed(a.T @ b) / scope.rows(a)
    on_diagonal = (torch.diagonal(correlation) - 1).pow(2).sum()
    off_diag = off_diagonal(correlation).pow(2).sum()
    return on_diagonal, off_diag


class BarlowTwins(LossModule):
    """on-diagonal + lambda * off-diagonal of the student-teacher cross-correlation (lambda 0.0051).

    The original ProtoRKD code L2-normalised each feature column instead of batch-standardising it
    and divided the all-reduced correlation by the local batch size (W x the paper's at W ranks); this
    follows the paper (the global batch size).
    """

    def __init__(self, redundancy_weight: float = 0.0051, *, weight: float = 1.0, scope: Scope = LOCAL) -> None:
        super().__init__()
        self.redundancy_weight = redundancy_weight
        self.weight = weight
        self.scope = scope

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student, teacher = both_towers(inputs, self.scope)
        on_diagonal, off_diag = barlow_twins_terms(student, teacher, self.scope)
        return {
            "barlow_on_diagonal_loss": self.weight * on_diagonal,
            "barlow_off_diagonal_loss": self.weight * self.redundancy_weight * off_diag,
        }
