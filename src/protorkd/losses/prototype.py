"""Distillation over learnable prototypes shared by teacher and student: DINO, ProtoCPC, ProtoRKD.

Each loss owns a `PrototypeLayer` (a weight-normalised Linear(D -> K, no bias) with g fixed to 1)
and applies it to both towers: the student side with gradient, the teacher side under no_grad
with the detached weights. This is the original's "the teacher head's prototype layer follows the
student's every step", without a copy: there is one set of prototypes, learnt through the student
branch only. Losses run on the gathered global batch (see `losses.common`), so centres and priors
are global-batch means, identical on every rank (the originals all-reduced them).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd.losses.base import LOCAL, LossInputs, LossModule, Scope
from protorkd.losses.common import soft_cross_entropy, student_teacher, zero_with_grad


class PrototypeLayer(nn.Module):
    """logits = x @ normalize(V)^T: [N, D] -> [N, K]; V [K, D] is the only parameter.

    Equivalent to DINO's weight_norm(Linear(D, K, bias=False)) with weight_g fixed to 1. V is drawn
    from nn.Linear's default range with a private generator seeded by `seed`, so every rank builds
    the same prototypes without a broadcast.
    """

    def __init__(self, dim: int, n_prototypes: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(n_prototypes, dim).uniform_(-bound, bound, generator=generator))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Student-side logits [N, K] (gradient reaches the prototypes and the features)."""
        return features @ F.normalize(self.weight, dim=1).T

    @torch.no_grad()
    def teacher_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Teacher-side logits [N, K] with the detached prototypes; no gradient anywhere."""
        return features.detach() @ F.normalize(self.weight.detach(), dim=1).T


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean row entropy (nats) of [N, K] probabilities."""
    return -(probs * probs.clamp(min=1e-12).log()).sum(dim=1).mean()


class _SharedPrototypeLoss(LossModule):
    """Holds the shared prototypes, temperatures and the last step's diagnostics."""

    def __init__(
        self,
        dim: int,
        n_prototypes: int,
        teacher_temperature: float,
        student_temperature: float,
        momentum: float,
        weight: float,
        seed: int,
        scope: Scope,
    ) -> None:
        super().__init__()
        self.scope = scope
        self.prototypes = PrototypeLayer(dim, n_prototypes, seed=seed)
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature
        self.momentum = momentum
        self.weight = weight
        self._diagnostics: dict[str, torch.Tensor] = {}

    def _logits(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = student_teacher(inputs, self.scope)
        return self.prototypes(student), self.prototypes.teacher_logits(teacher)

    def _mean(self, rows: torch.Tensor) -> torch.Tensor:
        """The mean of [B, K] rows over every rank's batch (a collective: ITRA's all_reduce); 0 over no rows."""
        return self.scope.summed(rows.sum(dim=0)) / max(self.scope.rows(rows), 1)

    def _scored(self, loss: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """`loss`, or a connected 0 on a rank with no readable row."""
        return loss if student_logits.shape[0] > 0 else zero_with_grad(student_logits)

    def log_values(self) -> dict[str, float]:
        return {name: float(value) for name, value in self._diagnostics.items()}


class DINO(_SharedPrototypeLoss):
    """CE(softmax((t P - c) / T_t), log_softmax(s P / T_s)) with the teacher centre c (Caron et al., ICCV 2021).

    T_t = 0.04 (`--dino-teacher-temp`), T_s = 0.1; c <- 0.9 c + 0.1 mean_i(t_i P) over the global
    batch, updated after the loss (as DINO does).
    """

    def __init__(
        self,
        dim: int,
        n_prototypes: int = 65536,
        teacher_temperature: float = 0.04,
        student_temperature: float = 0.1,
        center_momentum: float = 0.9,
        *,
        weight: float = 1.0,
        seed: int = 0,
        scope: Scope = LOCAL,
    ) -> None:
        super().__init__(
            dim, n_prototypes, teacher_temperature, student_temperature, center_momentum, weight, seed, scope
        )
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student_logits, teacher_logits = self._logits(inputs)
        teacher_probs = torch.softmax((teacher_logits - self.center) / self.teacher_temperature, dim=1)
        loss = self._scored(
            soft_cross_entropy(teacher_probs, student_logits / self.student_temperature), student_logits
        )
        with torch.no_grad():
            batch_center = self._mean(teacher_logits)[None]  # every rank's batch (ITRA's all_reduce)
            if inputs.update_state:
                self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)
            self._diagnostics = self._diagnose(teacher_probs, student_logits)
        return {"distill_loss": self.weight * loss}

    def _diagnose(self, teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"dino/teacher_entropy": entropy(teacher_probs)}


class ProtoCPC(_SharedPrototypeLoss):
    """-<q, s P / T_s> + logsumexp(s P / T_s + log pi), q = softmax(t P / T_t) (Lee, ICLR 2022).

    pi is the learnt prior over prototypes: pi <- 0.9 pi + 0.1 mean_i q_i over the global batch,
    starting uniform; T_t = 0.04, T_s = 0.1.
    """

    def __init__(
        self,
        dim: int,
        n_prototypes: int = 65536,
        teacher_temperature: float = 0.04,
        student_temperature: float = 0.1,
        prior_momentum: float = 0.9,
        *,
        weight: float = 1.0,
        seed: int = 0,
        scope: Scope = LOCAL,
    ) -> None:
        super().__init__(
            dim, n_prototypes, teacher_temperature, student_temperature, prior_momentum, weight, seed, scope
        )
        self.register_buffer("prior", torch.full((n_prototypes,), 1.0 / n_prototypes))

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student_logits, teacher_logits = self._logits(inputs)
        teacher_probs = torch.softmax(teacher_logits / self.teacher_temperature, dim=1)
        scaled = student_logits / self.student_temperature
        log_prior = self.prior.clamp(min=1e-30).log()
        loss = (-(teacher_probs * scaled).sum(dim=1) + torch.logsumexp(scaled + log_prior, dim=1)).mean()
        loss = self._scored(loss, student_logits)
        with torch.no_grad():
            batch_prior = self._mean(teacher_probs)  # every rank's batch (ITRA's all_reduce)
            if inputs.update_state:
                self.prior.mul_(self.momentum).add_(batch_prior, alpha=1 - self.momentum)
            self._diagnostics = {"protocpc/teacher_entropy": entropy(teacher_probs)}
        return {"distill_loss": self.weight * loss}


class ProtoRKD(DINO):
    """Prototypical relational KD: distil each sample's relation to K shared prototypes.

    r_t = softmax((t P - c) / T_t) (teacher relation, sharpened and centred), r_s = softmax(s P / T_s);
    loss = mean_i CE(r_t, r_s); c <- 0.9 c + 0.1 mean_i t_i P. The objective is DINO's (as in the
    original code); the class stays separate because its role differs: the prototypes are a shared
    relational basis learnt only through the student branch, with no EMA teacher head, and its
    diagnostics describe how the relation mass is spread over prototypes (see docs/method.md).
    """

    def _diagnose(self, teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        assignments = teacher_probs.argmax(dim=1)
        return {
            "protorkd/teacher_entropy": entropy(teacher_probs),
            "protorkd/prototypes_used": assignments.bincount(minlength=teacher_probs.shape[1]).count_nonzero(),
            "protorkd/assignment_agreement": (assignments == student_logits.argmax(dim=1)).float().mean(),
        }
