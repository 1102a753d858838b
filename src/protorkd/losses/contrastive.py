"""Contrastive losses: the symmetric CLIP loss (InfoNCE) with a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd import distributed
from protorkd.losses.base import LossInputs

MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather_with_grad: bool = False,
    local_loss: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: 1/2 [CE(s I T^T, y) + CE(s T I^T, y)].

    image_features, text_features: [B, D] normalised local features; logit_scale: scalar s (already
    exponentiated). Under DDP the features of every rank are gathered; with `local_loss` each rank only
    scores its own rows against the global batch (open_clip's memory-saving mode, same gradient).
    """
    world, rank = distributed.world_size(), distributed.rank()
    all_image = distributed.all_gather_cat(image_features, with_grad=gather_with_grad)
    all_text = distributed.all_gather_cat(text_features, with_grad=gather_with_grad)
    batch = image_features.shape[0]
    if local_loss and world > 1:
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(batch, device=image_features.device) + rank * batch
    else:
        return symmetric_infonce(all_image, all_text, logit_scale)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def symmetric_infonce(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """1/2 [CE(s I T^T, y) + CE(s T I^T, y)] over the rows given ([N, D] each, no gather): row i pairs with row i."""
    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels))


class InfoNCE(nn.Module):
    """CLIP's symmetric contrastive loss between the image and text features, learnable temperature.

    The log-scale starts at ln(1 / init_temperature) and is clamped at ln(100) like CLIP.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        weight: float = 1.0,
        *,
        learn_temperature: bool = True,
        gather_with_grad: bool = False,
        local_loss: bool = False,
    ) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)
        self.weight = weight
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        loss = clip_loss(
            inputs.image_features,
            inputs.text_features,
            self.scale(),
            gather_with_grad=self.gather_with_grad,
            local_loss=self.local_loss,
        )
        return {"infonce_loss": self.weight * loss}

    def log_values(self) -> dict[str, float]:
        """Scalars worth logging next to the loss terms."""
        return {"temperature": float(1.0 / self.scale().detach())}
