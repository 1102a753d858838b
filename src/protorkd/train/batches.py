"""What one training batch becomes: the model's forward arguments, under the run's numeric precision."""

from __future__ import annotations

import contextlib

import torch

from protorkd.losses import LossNeeds
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import TeacherSide
from protorkd.teachers.features import Teachers


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast only on CUDA (amp = fp16, amp_bf16 = bf16); elsewhere compute in the weights' dtype."""
    if device.type == "cuda" and precision in ("amp", "amp_bf16"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "amp" else torch.bfloat16)
    return contextlib.nullcontext()


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
        inputs["tokens"] = {k: v.to(device) for k, v in model.tokenize(batch["captions"]).items()}
        if needs is not None and needs.text_dropout_view:
            inputs["text_views"] = 2
    if teacher is TeacherSide.IMAGE and teachers.tower is not None:
        inputs["image_backbone_features"] = teachers.tower.lookup(batch["indices"]).to(device, non_blocking=True)
    else:
        keys = ("images", "images_view2") if needs is not None and needs.image_view2 else ("images",)
        for key in keys:
            images = batch[key].to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.to(memory_format=torch.channels_last)
            inputs[key] = images.to(torch.bfloat16) if precision == "bf16" else images
    return inputs
