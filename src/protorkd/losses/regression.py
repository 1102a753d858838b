"""Feature regression: the student's normalised features regressed onto the teacher's (SimReg)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protorkd.losses.base import LOCAL, LossInputs, LossModule, Scope
from protorkd.losses.common import student_teacher, zero_with_grad

PENALTIES = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "smooth_l1": F.smooth_l1_loss,
}


class SimReg(LossModule):
    """mean_i penalty(normalize(s_i) - normalize(t_i)), the teacher detached.

    penalty is MSE (SimReg), L1 (SimReg-L1) or smooth L1 (SimReg-SmoothL1), averaged over all elements
    of the scope's rows (under DDP the local batch, as ITRA; `losses.common.Scope`).
    """

    def __init__(self, penalty: str = "mse", weight: float = 1.0, *, scope: Scope = LOCAL) -> None:
        super().__init__()
        self.scope = scope
        if penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {penalty!r}; valid: {', '.join(PENALTIES)}")
        self.penalty = penalty
        self.weight = weight

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student, teacher = student_teacher(inputs, self.scope)
        if student.shape[0] == 0:  # a rank with no readable row: a connected 0
            return {"distill_loss": zero_with_grad(student)}
        return {"distill_loss": self.weight * PENALTIES[self.penalty](student, teacher)}
