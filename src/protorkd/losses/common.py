"""Helpers shared by the loss families: the batch a loss computes over under DDP, and a few tensor formulas.

Distributed convention (docs/method.md; 3-process gloo tests in tests/losses/test_losses_distributed.py). Each
loss computes over the rows its original computes over (`Scope`):

* **global** (InfoNCE as open_clip, ProtoCLIP, CLIP-KD; every loss with `--distill-batch global`): every rank
  gathers every rank's features and computes the loss of the global batch, so its value is the one-process value
  on the concatenated batch. How the gradient crosses the gather is open_clip's `--gather-with-grad`: without it
  (the default, open_clip's) a rank's rows get the gradient of the global loss through their own copy only, and
  DDP's average leaves 1/W of the one-process gradient on the model, as open_clip's; with it, the gathered copies
  carry gradients back too (W x that on a rank's rows), and DDP's average leaves exactly the one-process gradient.
* **local** (ITRA's distillers, which gather only for InfoNCE: `NEED_GATHER = ['InfoNCE']`): each rank computes
  the loss of its own rows; DDP averages the ranks' gradients. The statistics ITRA all-reduces are global: Barlow
  Twins' cross-correlation, DINO's and ProtoRKD's centre, ProtoCPC's prior (their gradients pass through the
  rank's own term only, as a plain all_reduce), and SEED enqueues every rank's teacher rows; CompRess keeps a
  queue per rank.

Parameters owned by a loss get the gradient of that rank's loss; the training loop averages them across ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from protorkd.losses.base import LossInputs, Scope
from protorkd.models.options import TeacherSide


def student_teacher(inputs: LossInputs, scope: Scope, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The scope's student features (with gradient) and teacher features (always detached).

    Directional distillation losses never send a gradient into the teacher, even when
    `inputs.teacher is TeacherSide.NONE` makes the "teacher" a trainable tower.
    """
    student = scope.trainable(inputs.student_features)
    teacher = scope.frozen(inputs.teacher_features)
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return student, teacher


def both_towers(inputs: LossInputs, scope: Scope, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The scope's (student, teacher) features for symmetric losses (VICReg, BarlowTwins).

    The teacher side is detached unless `inputs.teacher is TeacherSide.NONE` (both towers train).
    """
    student = scope.trainable(inputs.student_features)
    if inputs.teacher is TeacherSide.NONE:
        teacher = scope.trainable(inputs.teacher_features)
    else:
        teacher = scope.frozen(inputs.teacher_features)
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
