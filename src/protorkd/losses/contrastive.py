"""Contrastive losses: the symmetric CLIP loss (InfoNCE) with a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from protorkd import distributed
from protorkd.data.mixup import mixed_pair_targets
from protorkd.losses.base import LossInputs, LossModule, LossNeeds, Scope

MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather_with_grad: bool = False,
    local_loss: bool = False,
    mixup_lams: torch.Tensor | None = None,
    mixup_groups: list[int] | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: 1/2 [CE(s I T^T, y) + CE(s T I^T, y)].

    image_features, text_features: [B, D] normalised local features; logit_scale: scalar s (already
    exponentiated). Under DDP the features of every rank are gathered; with `local_loss` each rank only
    scores its own B_r rows against the global batch of N (open_clip's memory-saving mode). Ranks may hold
    different B_r (unreadable samples dropped, or none at all): a row's label is its offset in the gathered
    batch (the sizes of the ranks before it), and rank r's loss is the *sum* over its rows times W / N, so that
    DDP's average over the W ranks is the mean over all N rows, i.e. the single-process loss and gradient
    (open_clip's arange(B) + rank * B and per-rank mean are right only for equal B_r).

    mixup_lams: [B] when the images were mixed (`protorkd.data.mixup`): y becomes the soft targets of
    `mixed_pair_targets` (each image's own caption weighted lam, its partner's 1 - lam; the transpose for
    the caption rows). Every rank must pass them or none. `mixup_groups`: the sizes of the local slices that
    were mixed separately (the micro-batches of an --accum-freq group; None: the B local rows are one slice);
    every rank has the same number of slices.
    """
    world = distributed.world_size()
    all_image = distributed.all_gather_cat(image_features, with_grad=gather_with_grad)
    all_text = distributed.all_gather_cat(text_features, with_grad=gather_with_grad)
    if mixup_lams is not None:
        groups = mixup_groups or [image_features.shape[0]]
        return _mixed_clip_loss(
            image_features, text_features, all_image, all_text, logit_scale, mixup_lams, groups, local_loss
        )
    if not (local_loss and world > 1):
        return symmetric_infonce(all_image, all_text, logit_scale)
    batch, total = image_features.shape[0], all_image.shape[0]
    offset = local_offset(batch, device=image_features.device)
    labels = torch.arange(batch, device=image_features.device) + offset
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    summed = F.cross_entropy(logits_per_image, labels, reduction="sum") + F.cross_entropy(
        logits_per_text, labels, reduction="sum"
    )
    return 0.5 * summed * world / total


def _mixed_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    logit_scale: torch.Tensor,
    lams: torch.Tensor,
    groups: list[int],
    local_loss: bool,
) -> torch.Tensor:
    """`clip_loss` with mixup's soft targets (the same reductions as the hard-label form)."""
    world, batch, total = distributed.world_size(), image_features.shape[0], all_image.shape[0]
    device = image_features.device
    slices = [int(size) for size in distributed.all_gather_cat(torch.tensor(groups, device=device))]
    sizes = [sum(slices[r * len(groups) : (r + 1) * len(groups)]) for r in range(world)]  # rows of each rank
    targets = mixed_pair_targets(distributed.all_gather_cat(lams.to(device, image_features.dtype)), slices)
    if not (local_loss and world > 1):
        logits_per_image = logit_scale * all_image @ all_text.T
        return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets.T))
    offset = sum(sizes[: distributed.rank()])
    rows = slice(offset, offset + batch)
    summed = F.cross_entropy(logit_scale * image_features @ all_text.T, targets[rows], reduction="sum")
    summed = summed + F.cross_entropy(logit_scale * text_features @ all_image.T, targets.T[rows], reduction="sum")
    return 0.5 * summed * world / total


def local_offset(batch: int, *, device: torch.device) -> int:
    """This rank's first row in the gathered global batch: the sum of the local batch sizes of lower ranks."""
    sizes = distributed.all_gather_cat(torch.tensor([batch], device=device))
    return int(sizes[: distributed.rank()].sum())


def symmetric_infonce(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """1/2 [CE(s I T^T, y) + CE(s T I^T, y)] over the rows given ([N, D] each, no gather): row i pairs with row i."""
    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels))


class InfoNCE(LossModule):
    """CLIP's symmetric contrastive loss between the image and text features, learnable temperature.

    The log-scale starts at ln(1 / init_temperature) and is clamped at ln(100) like CLIP. It takes mixed
    images (`--mixup-alpha`): its targets are the pairing itself, which mixup's soft targets generalise.
    """

    needs = LossNeeds(accepts_mixup=True)

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
        self.scope = Scope(global_batch=True, with_grad=gather_with_grad)  # open_clip's ClipLoss gathers

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        loss = clip_loss(
            inputs.image_features,
            inputs.text_features,
            self.scale(),
            gather_with_grad=self.gather_with_grad,
            local_loss=self.local_loss,
            mixup_lams=inputs.mixup_lams,
            mixup_groups=inputs.mixup_groups,
        )
        return {"infonce_loss": self.weight * loss}

    def log_values(self) -> dict[str, float]:
        """Scalars worth logging next to the loss terms."""
        return {"temperature": float(1.0 / self.scale().detach())}
