"""`Features`: what one training forward of the dual encoder returns, as named fields instead of string keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Features:
    """L2-normalised joint-space features of one local batch ([B, D] each; None where not computed).

    image / text: the two towers through their heads (from raw inputs, or a locked tower's cached features).
    image_view2: a second augmented view through the image tower (BYOL).
    text_dropout: a second pass of a trainable text tower, with other dropout masks (SimCSE).
    image_proto / text_proto: ProtoCLIP's projection heads on the unnormalised joint features [B, d], the space
        its prototypes and clusters live in; never seen by evaluation.
    image_unnormalized / text_unnormalized: `image` / `text` before the L2 normalisation [B, D] (what CLIP-KD's
        projection into a wider or narrower teacher space acts on).
    """

    image: torch.Tensor | None = None
    text: torch.Tensor | None = None
    image_view2: torch.Tensor | None = None
    text_dropout: torch.Tensor | None = None
    image_proto: torch.Tensor | None = None
    text_proto: torch.Tensor | None = None
    image_unnormalized: torch.Tensor | None = None
    text_unnormalized: torch.Tensor | None = None

    def float(self) -> Features:
        """Every field in float32 (what the losses compute in, whatever precision the towers ran in)."""
        values = (getattr(self, field.name) for field in dataclasses.fields(self))  # astuple would deep-copy
        return Features(*(None if value is None else value.float() for value in values))

    def clustering_space(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) as ProtoCLIP clusters them: the projection heads' outputs when the model has them, else
        the joint features."""
        image = self.image_proto if self.image_proto is not None else self.image
        text = self.text_proto if self.text_proto is not None else self.text
        if image is None or text is None:
            raise ValueError("clustering needs both towers' features of the batch")
        return image, text
