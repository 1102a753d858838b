"""CLIP-to-CLIP distillation (CLIP-KD; Yang et al., CVPR 2024) for a trainable CLIP student and locked CLIP teachers.

Student: inputs.image_features / inputs.text_features [B, D] (both towers train, teacher="none").
Teacher(s): `LossInputs.separate_teachers`[<teacher.image_key>] / [<teacher.text_key>] [B, Dt], normalised,
and optionally [<teacher.logit_scale_key>] (a scalar, already exponentiated). Terms (each weighted, summed
over teachers with per-teacher weights):

* infonce: CLIP loss on the student pair, learnable student logit scale s.
* logit (CRD / open_clip DistillClipLoss, as a KL): KL(softmax(s_t T_I T_T^T) || softmax(s S_I S_T^T))
  row-wise, image->text and text->image, averaged.
* fd: MSE(proj(S_I), T_I) + MSE(proj(S_T), T_T), MSE averaged over all N x Dt elements, as CLIP-KD's
  `F.mse_loss` (proj: when Dt != D, a learnable Linear(D, Dt) with bias applied, as in CLIP-KD's
  `KDClipLoss.forward`, to the student's *unnormalised* features, then normalisation; identity otherwise).
  The weight 2000 is CLIP-KD's alpha_fd_loss, whatever the teacher's width.
* icl: InfoNCE of proj(S_I) against T_T and of proj(S_T) against T_I, with ICL's own learnable scale
  `icl_scale` (CLIP-KD's `cross_logit_scale`: initialised to ln(1/0.07) and, as in CLIP-KD, used as the
  multiplier itself, not exponentiated, and never clamped), one per teacher.
* intra: KL between teacher and student image-image (and text-text) similarity distributions,
  the diagonal removed, teacher scale for the teacher, student scale for the student.
* rkd: RKD (distance + angle) between student and teacher image features and text features.

The projections and ICL's scales take CLIP-KD's weight decay, AdamW's default 0.01 (CLIP-KD's optimizer
puts `loss.parameters()` in a group of their own, without `--wd`; `own_weight_decay`); the student's
logit scale, part of CLIP-KD's model, takes none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd.losses.base import GLOBAL, LossInputs, LossModule, LossNeeds, Scope
from protorkd.losses.common import drop_diagonal, kl_divergence
from protorkd.losses.contrastive import MAX_LOGIT_SCALE, symmetric_infonce
from protorkd.losses.relational import rkd_terms
from protorkd.teachers.keys import CLIP_IMAGE_KEY, CLIP_LOGIT_SCALE_KEY, CLIP_TEXT_KEY


@dataclass(frozen=True)
class ClipTeacher:
    """Where one teacher's features arrive in `inputs.extra`, their width and the teacher's weight."""

    name: str = "teacher"
    image_key: str = CLIP_IMAGE_KEY
    text_key: str = CLIP_TEXT_KEY
    logit_scale_key: str = CLIP_LOGIT_SCALE_KEY
    dim: int = -1  # -1: the student's width
    weight: float = 1.0
    temperature: float = 0.01  # used when extra has no logit scale for this teacher


@dataclass(frozen=True)
class ClipKDWeights:
    infonce: float = 1.0
    logit: float = 1.0
    fd: float = 2000.0
    icl: float = 1.0
    intra: float = 0.0
    rkd: float = 0.0
    rkd_distance: float = 0.5
    rkd_angle: float = 1.0


ICL_SCALE_INIT = math.log(1.0 / 0.07)  # CLIP-KD's cross_logit_scale initial value, used as a plain multiplier
CLIP_KD_LOSS_WEIGHT_DECAY = 0.01  # CLIP-KD: AdamW's default, for the group {"params": loss.parameters()}


def _projection(dim: int, teacher_dim: int) -> nn.Module:
    return nn.Identity() if teacher_dim == dim else nn.Linear(dim, teacher_dim)  # CLIP-KD: nn.Linear, with bias


class CLIPKD(LossModule):
    """InfoNCE on the student plus logit / feature / interactive-contrastive / intra-modal distillation."""

    def __init__(
        self,
        dim: int,
        teachers: Sequence[ClipTeacher] = (ClipTeacher(),),
        weights: ClipKDWeights = ClipKDWeights(),
        *,
        init_temperature: float = 0.07,
        rkd_angle_chunk: int = 0,
        scope: Scope = GLOBAL,
    ) -> None:
        super().__init__()
        self.scope = scope  # CLIP-KD's code gathers the global batch (open_clip's gather)
        if not teachers:
            raise ValueError("CLIP-KD needs at least one teacher")
        names = [teacher.name for teacher in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        self.dim = dim
        self.teachers = tuple(dataclasses.replace(t, dim=dim if t.dim < 0 else t.dim) for t in teachers)
        self.needs = LossNeeds(teacher_features=frozenset(k for t in self.teachers for k in (t.image_key, t.text_key)))
        self.weights = weights
        self.rkd_angle_chunk = rkd_angle_chunk
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.image_projections = nn.ModuleDict({t.name: _projection(dim, t.dim) for t in self.teachers})
        self.text_projections = nn.ModuleDict({t.name: _projection(dim, t.dim) for t in self.teachers})
        self.icl_scales = nn.ParameterDict({t.name: nn.Parameter(torch.tensor(ICL_SCALE_INIT)) for t in self.teachers})

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def own_weight_decay(self) -> dict[str, float]:
        """CLIP-KD's 0.01 for the projections and ICL's scales (not the student's logit scale)."""
        owned = {"image_projections": self.image_projections, "text_projections": self.text_projections}
        owned["icl_scales"] = self.icl_scales
        return {
            f"{prefix}.{name}": CLIP_KD_LOSS_WEIGHT_DECAY
            for prefix, module in owned.items()
            for name, _ in module.named_parameters()
        }

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student_image = self.scope.trainable(inputs.image_features)
        student_text = self.scope.trainable(inputs.text_features)
        unnormalized = None
        if (self.weights.fd or self.weights.icl) and any(t.dim != self.dim for t in self.teachers):
            unnormalized = (
                self.scope.trainable(inputs.required("image_features_unnormalized", "CLIP-KD's projection")),
                self.scope.trainable(inputs.required("text_features_unnormalized", "CLIP-KD's projection")),
            )
        scale = self.scale()
        terms: dict[str, torch.Tensor] = {}
        if self.weights.infonce:
            terms["infonce_loss"] = self.weights.infonce * symmetric_infonce(student_image, student_text, scale)
        for teacher in self.teachers:
            suffix = "" if len(self.teachers) == 1 else f"/{teacher.name}"
            student = (student_image, student_text)
            for name, value in self._teacher_terms(inputs, teacher, student, unnormalized, scale).items():
                terms[name + suffix] = teacher.weight * value
        return terms

    def _teacher_terms(
        self,
        inputs: LossInputs,
        teacher: ClipTeacher,
        student: tuple[torch.Tensor, torch.Tensor],
        unnormalized: tuple[torch.Tensor, torch.Tensor] | None,
        scale: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The terms of one teacher; `student` = the normalised (image, text) rows [N, D], `unnormalized` the same
        before normalisation (None when no teacher's width differs from the student's)."""
        student_image, student_text = student
        given = inputs.separate_teachers
        for key in (teacher.image_key, teacher.text_key):
            if key not in given:
                raise KeyError(
                    f"CLIP-KD teacher {teacher.name!r} needs LossInputs.separate_teachers[{key!r}] ([B, Dt] features)"
                )
        teacher_image = F.normalize(self.scope.frozen(given[teacher.image_key]).to(student_image.dtype), dim=-1)
        teacher_text = F.normalize(self.scope.frozen(given[teacher.text_key]).to(student_text.dtype), dim=-1)
        if teacher.logit_scale_key in given:
            teacher_scale = given[teacher.logit_scale_key].detach().to(student_image.dtype).reshape(())
        else:
            teacher_scale = torch.tensor(1.0 / teacher.temperature, device=student_image.device)
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if w.logit:
            teacher_logits = teacher_scale * teacher_image @ teacher_text.T
            student_logits = scale * student_image @ student_text.T
            image_to_text = kl_divergence(teacher_logits, student_logits)
            text_to_image = kl_divergence(teacher_logits.T, student_logits.T)
            terms["clip_kd_logit_loss"] = w.logit * 0.5 * (image_to_text + text_to_image)
        if w.fd or w.icl:
            if teacher.dim == self.dim:  # CLIP-KD: no projection at equal widths
                projected_image, projected_text = student_image, student_text
            else:  # CLIP-KD's loss.py: the Linear on the unnormalised features, then F.normalize
                assert unnormalized is not None
                projected_image = F.normalize(self.image_projections[teacher.name](unnormalized[0]), dim=-1)
                projected_text = F.normalize(self.text_projections[teacher.name](unnormalized[1]), dim=-1)
            if w.fd:
                fd = F.mse_loss(projected_image, teacher_image) + F.mse_loss(projected_text, teacher_text)
                terms["clip_kd_fd_loss"] = w.fd * fd
            if w.icl:
                labels = torch.arange(student_image.shape[0], device=student_image.device)
                icl_scale = self.icl_scales[teacher.name]
                image_to_teacher_text = F.cross_entropy(icl_scale * projected_image @ teacher_text.T, labels)
                text_to_teacher_image = F.cross_entropy(icl_scale * projected_text @ teacher_image.T, labels)
                terms["clip_kd_icl_loss"] = w.icl * 0.5 * (image_to_teacher_text + text_to_teacher_image)
        if w.intra and student_image.shape[0] > 1:
            intra = 0.0
            for student_side, teacher_side in ((student_image, teacher_image), (student_text, teacher_text)):
                teacher_logits = drop_diagonal(teacher_scale * teacher_side @ teacher_side.T)
                student_logits = drop_diagonal(scale * student_side @ student_side.T)
                intra = intra + 0.5 * kl_divergence(teacher_logits, student_logits)
            terms["clip_kd_intra_loss"] = w.intra * intra
        if w.rkd:
            image_terms = rkd_terms(student_image, teacher_image, w.rkd_distance, w.rkd_angle, self.rkd_angle_chunk)
            text_terms = rkd_terms(student_text, teacher_text, w.rkd_distance, w.rkd_angle, self.rkd_angle_chunk)
            terms["clip_kd_rkd_loss"] = w.rkd * 0.5 * (sum(image_terms.values()) + sum(text_terms.values()))
        return terms

    def log_values(self) -> dict[str, float]:
        values = {"temperature": float(1.0 / self.scale().detach())}
        for name, icl_scale in self.icl_scales.items():
            values["clip_kd/icl_scale" + ("" if len(self.icl_scales) == 1 else f"/{name}")] = icl_scale.item()
        return values
