"""What every loss receives and returns.

A loss is an `nn.Module` whose `forward(inputs: LossInputs)` returns a flat dict of *weighted* named
terms (`{"distill_loss": ..., "simcse_loss": ...}`); the training loop sums every value and logs every
key, so what is logged is what is optimised. A loss may own parameters (a learnable temperature,
prototypes) and buffers (queues, centres); the loop optimises the former and checkpoints both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossInputs:
    """Joint-space features of one local batch.

    image_features / text_features: [B, D], L2-normalised outputs of the projection heads.
    teacher: which tower is the locked teacher ("text", "image") or "none" (both towers train).
    indices: [B] corpus row of each sample (used by prototype / clustering losses).
    extra: optional named tensors, e.g. "image_features_view2" [B, D] for BYOL,
        "text_features_dropout" [B, D] for SimCSE, or raw teacher features.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    teacher: str = "text"
    indices: torch.Tensor | None = None
    epoch: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def teacher_features(self) -> torch.Tensor:
        """[B, D] features of the teacher tower (the text tower when teacher is "none")."""
        return self.image_features if self.teacher == "image" else self.text_features

    @property
    def student_features(self) -> torch.Tensor:
        """[B, D] features of the student tower (the image tower when teacher is "none")."""
        return self.text_features if self.teacher == "image" else self.image_features
