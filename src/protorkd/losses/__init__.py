"""Distillation losses: one module per family, a registry (`losses.registry`: `LOSSES`, `build_loss`), the
inputs every loss receives and the needs it declares (`losses.base`), and the loss flags (`losses.options`).

Names are imported lazily, so reading the flags (`from protorkd.losses.options import LossOptions`, which
`protorkd --help` does) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from protorkd.losses.options import LossOptions

_LAZY = {
    "LOSSES": "registry",
    "LossContext": "registry",
    "build_auxiliary_losses": "registry",
    "build_loss": "registry",
    "loss_components": "registry",
    "clip_kd_teachers": "registry",
    "main_loss": "registry",
    "LossInputs": "base",
    "LossNeeds": "base",
    "ClusteringLoss": "base",
    "Loss": "base",
    "LossModule": "base",
    "clamp_logit_scales": "common",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"protorkd.losses.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'protorkd.losses' has no attribute {name!r}")


__all__ = ["LossOptions", *sorted(_LAZY)]
