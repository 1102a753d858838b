"""Locked feature teachers: towers that only ever produce features for the feature cache.

A `TeacherDef` describes one teacher modality (which library builds it, which weights, how its inputs
are prepared). Its `spec` keys the teacher feature cache; `build_teacher_tower` builds the locked tower
with its own tokenizer or image preprocessing, so a teacher never receives inputs prepared for the
student. A CLIP teacher is two definitions (its image and its text tower) of the same open_clip model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from protorkd.models.image_towers import ImageTower, build_image_tower
from protorkd.models.locked import named_weights
from protorkd.models.text_towers import TextTower, build_text_tower


@dataclass(frozen=True)
class TeacherDef:
    """One locked teacher modality. `name` is its role in a run ("text", "clip-image", ...), not part of the spec."""

    name: str
    modality: str  # "text" or "image"
    builder: str
    model: str
    tag: str = ""
    pooler: str = "mean"
    max_seq_length: int = 0
    image_size: int | None = None

    def spec(self, tower: nn.Module | None = None) -> dict[str, Any]:
        """What identifies this teacher's features: library, architecture, weights, input preparation.

        Weights are named by their checkpoint file's digest, their pretrained tag or hub name; a randomly
        initialised tower (tiny test towers) is named by a fingerprint of `tower`'s weights, so it must be given.
        """
        spec: dict[str, Any] = {"builder": self.builder, "model": self.model, "tag": self.tag}
        if self.modality == "text":
            spec["max_seq_length"] = self.max_seq_length
            if self.builder == "huggingface":
                spec["pooler"] = self.pooler
        else:
            spec["image_size"] = self.image_size
        weights = named_weights(self.builder, self.model, self.tag)
        if weights is None:
            if tower is None:
                raise ValueError(f"teacher {self.name}: randomly initialised weights need the built tower")
            weights = "init:" + weights_fingerprint(tower)
        spec["weights"] = weights
        return spec

    @property
    def needs_tower_for_spec(self) -> bool:
        return named_weights(self.builder, self.model, self.tag) is None


def weights_fingerprint(module: nn.Module) -> str:
    """A cheap hash of a module's weights, so a cache from other weights is refused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items())[:64]:
        digest.update(name.encode())
        digest.update(tensor.detach().float().flatten()[:256].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_teacher_tower(definition: TeacherDef) -> ImageTower | TextTower:
    """The locked tower (requires_grad False, eval mode) with its own tokenizer / preprocessing."""
    if definition.modality == "text":
        tower = build_text_tower(
            definition.builder, definition.model, definition.tag, definition.pooler, definition.max_seq_length
        )
    else:
        tower = build_image_tower(definition.builder, definition.model, definition.tag, definition.image_size)
    tower.requires_grad_(False)
    return tower.eval()


def tower_info(tower: nn.Module) -> dict[str, Any]:
    """Informational manifest fields: the image transform, and an open_clip model's logit scale."""
    info: dict[str, Any] = {"tower": getattr(tower, "name", type(tower).__name__)}
    preprocess = getattr(tower, "preprocess", None)
    if preprocess is not None:
        info["transform"] = {
            "image_size": preprocess.image_size,
            "mean": list(preprocess.mean),
            "std": list(preprocess.std),
            "interpolation": preprocess.interpolation,
            "resize": "shorter side, centre crop",
        }
    logit_scale = getattr(getattr(tower, "model", None), "logit_scale", None)
    if isinstance(logit_scale, torch.Tensor):
        info["logit_scale"] = float(logit_scale.detach().exp())
    return info
