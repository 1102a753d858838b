"""AdamW parameter groups and the learning-rate schedule (a pure function of the global step)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

NO_DECAY_NAME_PARTS = ("bias", "logit_scale", "norm", "bn", "ln", "temperature")


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """[decay group, no-decay group]: no decay for 1-d tensors (biases, norms), temperatures and scales."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            lowered = name.lower()
            if parameter.ndim < 2 or any(part in lowered.split(".")[-1] for part in NO_DECAY_NAME_PARTS):
                no_decay.append(parameter)
            else:
                decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    modules: Iterable[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    groups = [group for group in param_groups(modules, weight_decay) if group["params"]]
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup base*(step+1)/warmup, then cosine decay to 0 at `total_steps` (ProtoCLIP's schedule)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
