"""The loss registry: `build_loss(name, config, dim)` makes the `nn.Module` that `--loss NAME` selects.

Each entry is a factory `(config: LossConfig, dim: int) -> nn.Module` that unpacks the flags its loss
needs; `dim` is the joint embedding width. Every loss returns a flat dict of weighted named terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from protorkd.config import LossConfig
from protorkd.losses.base import LossInputs
from protorkd.losses.contrastive import InfoNCE
from protorkd.losses.regression import SimReg
from protorkd.registry import Registry

LossFactory = Callable[[LossConfig, int], nn.Module]
LOSSES: Registry[LossFactory] = Registry("loss")


@LOSSES.register("InfoNCE")
def _infonce(cfg: LossConfig, dim: int) -> nn.Module:
    return InfoNCE(
        init_temperature=cfg.temperature,
        weight=cfg.w_distill,
        gather_with_grad=cfg.gather_with_grad,
        local_loss=cfg.local_loss,
    )


@LOSSES.register("SimReg")
def _simreg(cfg: LossConfig, dim: int) -> nn.Module:
    return SimReg("mse", weight=cfg.w_distill)


@LOSSES.register("SimReg-L1")
def _simreg_l1(cfg: LossConfig, dim: int) -> nn.Module:
    return SimReg("l1", weight=cfg.w_distill)


@LOSSES.register("SimReg-SmoothL1")
def _simreg_smooth_l1(cfg: LossConfig, dim: int) -> nn.Module:
    return SimReg("smooth_l1", weight=cfg.w_distill)


def build_loss(name: str, cfg: LossConfig, dim: int) -> nn.Module:
    """The loss module registered as `name` (case-insensitive); an unknown name lists the valid ones."""
    return LOSSES.get(name)(cfg, dim)


__all__ = ["LOSSES", "LossInputs", "build_loss"]
