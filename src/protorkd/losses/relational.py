"""Relational knowledge distillation (RKD; Park et al., CVPR 2019): distance- and angle-wise terms.

Both terms compare the *relations* between samples of the global batch rather than the features
themselves, so teacher and student may have different widths. The angle term is O(N^3): it is
evaluated in chunks of anchors, each under activation checkpointing, so its memory is one chunk
(`chunk x N x N`) whether the graph is kept for backward or not.

Near-duplicate rows (one image twice in a batch, or two crops that a bf16 tower maps to almost the same
row) are where the angle term breaks: the direction of a difference vector a rounding error long is
noise, and the original normalises it anyway (`F.normalize`, eps 1e-12), so its gradient grows as
1/length (10^9 for an exact duplicate). Here a difference shorter than `ANGLE_EPS` x the batch's mean
pairwise distance is divided by that length instead of its own (`F.normalize` with eps = ANGLE_EPS x mu):
the original's value on rows farther apart than that, a bounded gradient on any rows (docs/method.md, RKD;
benchmarks/bench_rkd_near_duplicates.py). The features are centred on the batch mean before
the Gram matrix (distances and angles do not change), so its cancellation scales with the batch's spread,
not with the rows' norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from protorkd.losses.base import LOCAL, LossInputs, LossModule, Scope
from protorkd.losses.common import student_teacher, zero_with_grad

AUTO_CHUNK_TRIPLETS = 2**26  # about 256 MB per fp32 [chunk, N, N] block
ANGLE_EPS = 1e-2  # difference vectors shorter than this x the mean pairwise distance are not normalised


def _upcast(features: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (distances and angles cancel badly in low precision); fp32/fp64 unchanged."""
    return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features


def _centred(features: torch.Tensor) -> torch.Tensor:
    """[N, D] minus its (detached) row mean: the same distances and angles, the same gradient (both are
    invariant to a translation), and a Gram matrix whose rounding scales with the batch's spread."""
    return features - features.mean(dim=0, keepdim=True).detach()


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N] Euclidean distances, exactly 0 on the diagonal (clamped at 1e-12 before sqrt)."""
    features = _centred(features)
    squared_norms = (features * features).sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2.0 * features @ features.T).clamp(min=1e-12)
    eye = torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
    return torch.where(eye, torch.zeros_like(squared), squared.sqrt())


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SmoothL1(D_s / mean D_s, D_t / mean D_t), averaged over all N x N entries (Park et al.'s reduction).

    student: [N, Ds], teacher: [N, Dt]; the normalising means run over the off-diagonal pairs.
    """
    n = student.shape[0]
    if n < 2:
        return student.sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    with torch.no_grad():
        teacher_d = pairwise_distances(_upcast(teacher))
        teacher_d = teacher_d / teacher_d[off].mean()
    student_d = pairwise_distances(_upcast(student))
    student_d = student_d / student_d[off].mean()
    return F.smooth_l1_loss(student_d, teacher_d)


def _angle_geometry(features: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram matrix G [N, N] and squared norms [N] of the centred rows, and 1 / max(||x_b - x_a||, eps * mu)
    [N, N] (0 on the diagonal), mu the mean off-diagonal distance (a constant: no gradient flows through it)."""
    features = _centred(features)
    gram = features @ features.T
    squared_norms = gram.diagonal()
    distances = pairwise_distances(features)
    n = features.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    mean_distance = distances.detach().sum() / max(n * (n - 1), 1)
    floor = (eps * mean_distance).clamp(min=1e-12)
    inverse = torch.where(eye, torch.zeros_like(distances), 1.0 / torch.maximum(distances, floor))
    return gram, squared_norms, inverse


def _angles(gram: torch.Tensor, squared_norms: torch.Tensor, inverse: torch.Tensor, start: int, stop: int):
    """cos of the angle at anchor a between x_b and x_c, for anchors a in [start, stop): [c, N, N].

    <x_b - x_a, x_c - x_a> = G_bc - G_ab - G_ac + G_aa, divided by both lengths (each at least the
    floor of `_angle_geometry`); 0 when b == a or c == a (Park et al. normalise a zero difference to the
    zero vector).
    """
    rows = gram[start:stop]
    dots = gram[None, :, :] - rows[:, :, None] - rows[:, None, :] + squared_norms[start:stop, None, None]
    return dots * inverse[start:stop, :, None] * inverse[start:stop, None, :]


def _angle_chunk_loss(
    student_geometry: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    teacher_geometry: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    start: int,
    stop: int,
) -> torch.Tensor:
    student_angles = _angles(*student_geometry, start, stop)
    with torch.no_grad():
        teacher_angles = _angles(*teacher_geometry, start, stop)
    return F.smooth_l1_loss(student_angles, teacher_angles, reduction="sum")


def rkd_angle_loss(
    student: torch.Tensor, teacher: torch.Tensor, chunk: int = 0, *, eps: float = ANGLE_EPS
) -> torch.Tensor:
    """SmoothL1 between the student's and the teacher's angle tensors, averaged over all N^3 triplets.

    student: [N, Ds], teacher: [N, Dt]. Each side's difference vectors are normalised by
    max(length, eps x that side's mean pairwise distance) (Park et al.: F.normalize, eps 1e-12).
    `chunk` anchors are processed at a time (0: automatic, about AUTO_CHUNK_TRIPLETS triplets per
    chunk); the value and gradient do not depend on it.
    """
    n = student.shape[0]
    if chunk <= 0:
        chunk = max(1, AUTO_CHUNK_TRIPLETS // max(n * n, 1))
    student_geometry = _angle_geometry(_upcast(student), eps)
    with torch.no_grad():
        teacher_geometry = _angle_geometry(_upcast(teacher), eps)
    total = student_geometry[0].new_zeros(())
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        if chunk < n and torch.is_grad_enabled() and student.requires_grad:
            part = checkpoint(_angle_chunk_loss, student_geometry, teacher_geometry, start, stop, use_reentrant=False)
        else:
            part = _angle_chunk_loss(student_geometry, teacher_geometry, start, stop)
        total = total + part
    return total / float(n) ** 3


class RKD(LossModule):
    """w_d * L_distance + w_a * L_angle between the normalised student and teacher features of the scope's rows
    (under DDP the local batch, as ITRA)."""

    def __init__(
        self,
        distance_weight: float = 0.5,
        angle_weight: float = 1.0,
        *,
        angle_chunk: int = 0,
        weight: float = 1.0,
        scope: Scope = LOCAL,
    ) -> None:
        super().__init__()
        self.scope = scope
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.angle_chunk = angle_chunk
        self.weight = weight

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student, teacher = student_teacher(inputs, self.scope)
        if student.shape[0] == 0:  # a rank with no readable row: connected zeros
            names = [
                name
                for name, w in (("rkd_distance_loss", self.distance_weight), ("rkd_angle_loss", self.angle_weight))
                if w
            ]
            return {name: zero_with_grad(student) for name in names}
        return rkd_terms(
            student, teacher, self.weight * self.distance_weight, self.weight * self.angle_weight, self.angle_chunk
        )


def rkd_terms(
    student: torch.Tensor, teacher: torch.Tensor, distance_weight: float, angle_weight: float, angle_chunk: int = 0
) -> dict[str, torch.Tensor]:
    """{"rkd_distance_loss", "rkd_angle_loss"} already weighted; a zero weight skips its term."""
    terms = {}
    if distance_weight:
        terms["rkd_distance_loss"] = distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight:
        terms["rkd_angle_loss"] = angle_weight * rkd_angle_loss(student, teacher, angle_chunk)
    return terms
