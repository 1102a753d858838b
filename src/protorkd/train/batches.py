"""What one training batch becomes: the model's forward arguments, under the run's numeric precision.

A batch may have no rows on this rank (all its samples were unreadable). Under DDP such a rank still runs
the step with zero rows, so that it takes part in every collective (the loss's gathers, DDP's gradient
all-reduce); `global_rows` tells every rank whether any rank has rows at all.
"""

from __future__ import annotations

import contextlib

import torch

from protorkd import distributed
from protorkd.losses import LossNeeds
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import TeacherSide
from protorkd.precision import Precision
from protorkd.teachers.features import Teachers


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for a resolved `--precision` (`Precision.resolve`)."""
    return Precision(precision).autocast(device)


def model_inputs(
    batch: dict,
    model: DualEncoder,
    teachers: Teachers,
    teacher: TeacherSide,
    device: torch.device,
    precision: str,
    needs: LossNeeds | None = None,
) -> dict:
    """The model's forward arguments for one batch: raw inputs, or a locked teacher tower's cached features.

    With `needs`, the auxiliary terms' extra passes: a second image view (BYOL) and a second dropout pass
    of the text tower (SimCSE).
    """
    inputs: dict = {}
    if teacher is TeacherSide.TEXT and teachers.tower is not None:
        inputs["text_backbone_features"] = teachers.tower.lookup(batch["indices"]).to(device, non_blocking=True)
    else:
        inputs["tokens"] = {k: v.to(device) for k, v in _tokens(model, batch["captions"]).items()}
        if needs is not None and needs.text_dropout_view:
            inputs["text_views"] = 2
    if teacher is TeacherSide.IMAGE and teachers.tower is not None:
        inputs["image_backbone_features"] = teachers.tower.lookup(batch["indices"]).to(device, non_blocking=True)
    else:
        keys = ("images", "images_view2") if needs is not None and needs.image_view2 else ("images",)
        for key in keys:
            images = batch[key] if key in batch else _no_images(model)
            images = images.to(device, non_blocking=True)
            images = images.contiguous(memory_format=torch.channels_last)
            inputs[key] = images.to(torch.bfloat16) if precision == "bf16" else images
    return inputs


def _tokens(model: DualEncoder, captions: list[str]) -> dict[str, torch.Tensor]:
    """The text tower's tokens; zero rows for an empty batch (not every tokenizer accepts an empty list)."""
    if captions:
        return model.tokenize(captions)
    return {key: value[:0] for key, value in model.tokenize([""]).items()}


def _no_images(model: DualEncoder) -> torch.Tensor:
    """[0, 3, S, S]: the images of a batch whose samples were all unreadable."""
    size = model.image_preprocess.image_size
    return torch.zeros(0, 3, size, size)


def global_rows(batch: dict, device: torch.device) -> int:
    """Rows of this batch summed over every rank (one small all-reduce under DDP; the local count otherwise)."""
    local = len(batch["indices"])
    if not distributed.is_initialized():
        return local
    return int(distributed.all_reduce_sum(torch.tensor(local, device=device)))
