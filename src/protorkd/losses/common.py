"""Helpers shared by the loss families: the global-batch gather and a few tensor formulas.

Distributed convention (every loss in this package follows it, the 2-process test checks it):
each rank gathers the features of all ranks (`all_gather_cat(with_grad=True)` for trainable
features, without gradient for teacher features) and computes the loss of the *global* batch.
Hence on every rank

* the loss value equals the single-process value on the concatenated batch;
* the gradient w.r.t. a rank's own input rows is world_size x the single-process gradient of
  those rows (the gather's backward sums the identical losses of all ranks), so DDP's gradient
  averaging leaves exactly the single-process gradient on the model parameters;
* parameters owned by the loss (temperatures, prototypes) get the full single-process gradient
  on every rank, identical everywhere, whether or not the loop averages them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses.base import LossInputs
from protorkd.models.options import TeacherSide


def gather_trainable(features: torch.Tensor) -> torch.Tensor:
    """[B, D] local rows -> [N, D] global rows whose gradient flows back to every rank."""
    return distributed.all_gather_cat(features, with_grad=True)


def gather_frozen(features: torch.Tensor) -> torch.Tensor:
    """[B, ...] local rows -> [N, ...] global rows, detached (teacher features, indices)."""
    return distributed.all_gather_cat(features.detach(), with_grad=False)


def student_teacher(inputs: LossInputs, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ([N, D]) student features (with gradient) and teacher features (always detached).

    Directional distillation losses never send a gradient into the teacher, even when
    `inputs.teacher is TeacherSide.NONE` makes the "teacher" a trainable tower.
    """
    student = gather_trainable(inputs.student_features)
    teacher = gather_frozen(inputs.teacher_features)
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return student, teacher


def both_towers(inputs: LossInputs, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (student, teacher) features for symmetric losses (VICReg, BarlowTwins).

    The teacher side is detached unless `inputs.teacher is TeacherSide.NONE` (both towers train).
    """
    student = gather_trainable(inputs.student_features)
    if inputs.teacher is TeacherSide.NONE:
        teacher = gather_trainable(inputs.teacher_features)
    else:
        teacher = gather_frozen(inputs.teacher_features)
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return student, teacher


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """[N, N] -> [N * (N - 1)] entries off the diagonal, row by row."""
    n = matrix.shape[0]
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def drop_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """[N, N] -> [N, N - 1]: each row without its diagonal entry."""
    n = matrix.shape[0]
    return off_diagonal(matrix).view(n, n - 1)


def soft_cross_entropy(target_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_k p_ik log softmax(z_i)_k; target_probs, student_logits: [N, K]."""
    return -(target_probs * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()


def kl_divergence(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean_i KL(softmax(t_i) || softmax(s_i)) ("batchmean"); target_logits, student_logits: [N, K]."""
    target_log_probs = F.log_softmax(target_logits, dim=-1)
    return F.kl_div(F.log_softmax(student_logits, dim=-1), target_log_probs, reduction="batchmean", log_target=True)


def zero_with_grad(features: torch.Tensor) -> torch.Tensor:
    """A 0 that is still connected to `features`, so backward() works when a loss has nothing to score."""
    return features.sum() * 0.0 + 0.0  # + 0.0: a positive zero (a negative sum times 0.0 is -0.0)


@torch.no_grad()
def clamp_logit_scales(module: torch.nn.Module, max_value: float = math.log(100.0)) -> None:
    """Clamp every learnable log-scale (`logit_scale`, ProtoCLIP's `logit_scale_proto`) to [0, ln 100] in place,
    after each optimizer step, as CLIP, open_clip, ProtoCLIP and CLIP-KD do (CLIP-KD's ICL scale is not one)."""
    for name, parameter in module.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("logit_scale"):
            parameter.clamp_(0.0, max_value)
