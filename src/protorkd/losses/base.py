"""What every loss receives and returns.

A loss is an `nn.Module` whose `forward(inputs: LossInputs)` returns a flat dict of *weighted* named
terms (`{"distill_loss": ..., "simcse_loss": ...}`); the training loop sums every value and logs every
key, so what is logged is what is optimised. A loss may own parameters (a learnable temperature,
prototypes) and buffers (queues, centres); the loop optimises the former and checkpoints both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protorkd.models.options import TeacherSide


@dataclass
class LossInputs:
    """Joint-space features of one local batch.

    image_features / text_features: [B, D], L2-normalised outputs of the projection heads.
    teacher: which tower is the locked teacher (TEXT, IMAGE) or NONE (both towers train).
    indices: [B] corpus row of each sample (used by prototype / clustering losses).
    positions: [B] each sample's position in its episode (ProtoCLIP's "episodic index": a row drawn twice
        in one episode has two positions); None for streamed shards.
    extra: optional named tensors, e.g. "image_features_view2" [B, D] for BYOL,
        "text_features_dropout" [B, D] for SimCSE, or raw teacher features.
    mixup_lams: [B] when the run mixes images (`protorkd.data.mixup`; 1 = this batch unmixed): image i is
        lam x_i + (1 - lam) x_{B-1-i}. Only losses with `accepts_mixup` are given mixed images.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    teacher: TeacherSide = TeacherSide.TEXT
    indices: torch.Tensor | None = None
    epoch: int = 0
    positions: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    mixup_lams: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.teacher = TeacherSide(self.teacher)  # "text" / "image" / "none" are accepted too

    @property
    def teacher_features(self) -> torch.Tensor:
        """[B, D] features of the teacher tower (the text tower when teacher is NONE)."""
        return self.image_features if self.teacher is TeacherSide.IMAGE else self.text_features

    @property
    def student_features(self) -> torch.Tensor:
        """[B, D] features of the student tower (the image tower when teacher is NONE)."""
        return self.text_features if self.teacher is TeacherSide.IMAGE else self.image_features


@dataclass(frozen=True)
class LossNeeds:
    """What a loss needs from the training run beyond the two towers' features; the run checks these
    capabilities (never a loss's name) and provides exactly what is asked for.

    row_ids: `LossInputs.indices` are corpus rows that mean the same thing every epoch (per-row state such
        as cluster labels), so the corpus must have addressable rows (a TSV, not streamed shards).
    teacher_features: keys of separate locked teachers' features the loss reads from `LossInputs.extra`.
    clustering: the run clusters each episode and installs the clusters with `loss.set_clusters`.
    image_view2: a second augmented view of each image, as extra["image_features_view2"].
    text_dropout_view: a second dropout pass of a trainable text tower, as extra["text_features_dropout"].
    """

    row_ids: bool = False
    teacher_features: frozenset[str] = frozenset()
    clustering: bool = False
    image_view2: bool = False
    text_dropout_view: bool = False

    def __or__(self, other: LossNeeds) -> LossNeeds:
        return LossNeeds(
            self.row_ids or other.row_ids,
            self.teacher_features | other.teacher_features,
            self.clustering or other.clustering,
            self.image_view2 or other.image_view2,
            self.text_dropout_view or other.text_dropout_view,
        )


def accepts_mixup(loss: torch.nn.Module) -> bool:
    """Whether a loss's targets follow `LossInputs.mixup_lams` (a loss that does not say so cannot take mixed
    images: its targets are per-sample features that mixing the images would contradict)."""
    return bool(getattr(loss, "accepts_mixup", False))


def needs_of(loss: torch.nn.Module) -> LossNeeds:
    """A loss's declared needs (`loss.needs`); a loss that declares none needs nothing extra."""
    return getattr(loss, "needs", LossNeeds())
