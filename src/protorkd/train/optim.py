"""AdamW parameter groups and the learning-rate schedule (a pure function of the global step).

Parameters fall into two roles, as in ProtoCLIP (`main.py`, `scheduler.py`): "visual" (the image tower and
its head into the joint space, which is what ProtoCLIP's `visual` module holds) and "rest" (the text tower,
its head, ProtoCLIP's projection heads and every parameter a loss owns). Each role has a decay and a
no-decay group (plus one group per weight decay that a loss fixes for its own parameters, e.g. CLIP-KD's 0.01)
and its own schedule, which is how Locked-image Tuning (`--lit-start-epoch`: the visual learning rate is 0
from then on) and a delayed or shortened text schedule (`--text-start-epoch`, `--text-end-epoch`,
`--lr-text`) work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from protorkd.losses.base import fixed_weight_decays

NO_DECAY_NAME_PARTS = ("bias", "logit_scale", "norm", "bn", "ln", "temperature")
VISUAL, REST = "visual", "rest"


def _no_decay(name: str, parameter: nn.Parameter) -> bool:
    """1-d tensors (biases, norms), temperatures and scales, and ProtoCLIP's projection heads (as ProtoCLIP)."""
    return (
        parameter.ndim < 2
        or any(part in name.lower().split(".")[-1] for part in NO_DECAY_NAME_PARTS)
        or "projection_head" in name
    )


def param_groups(modules_by_role: Mapping[str, Iterable[nn.Module]], weight_decay: float) -> list[dict]:
    """Per role (in the mapping's order; a parameter belongs to the first role that lists it): a decay group and
    a no-decay group, then one group per weight decay that a loss fixes for its own parameters
    (`LossModule.own_weight_decay`), each tagged with its "role". Frozen parameters are left out, empty groups too."""
    groups, seen = [], set()
    for role, modules in modules_by_role.items():
        decay, no_decay, fixed = [], [], {}
        for module in modules:
            fixed_decays = fixed_weight_decays(module)
            for name, parameter in module.named_parameters():
                if not parameter.requires_grad or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                if id(parameter) in fixed_decays:
                    fixed.setdefault(fixed_decays[id(parameter)], []).append(parameter)
                else:
                    (no_decay if _no_decay(name, parameter) else decay).append(parameter)
        groups.append({"params": decay, "weight_decay": weight_decay, "role": role})
        groups.append({"params": no_decay, "weight_decay": 0.0, "role": role})
        groups.extend({"params": params, "weight_decay": value, "role": role} for value, params in fixed.items())
    return [group for group in groups if group["params"]]


def build_optimizer(
    modules_by_role: Mapping[str, Iterable[nn.Module]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    """AdamW over `param_groups(modules_by_role, weight_decay)`; a module list is also accepted (one role)."""
    if not isinstance(modules_by_role, Mapping):
        modules_by_role = {REST: list(modules_by_role)}
    fused = device_type == "cuda"
    return torch.optim.AdamW(param_groups(modules_by_role, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup base*(step+1)/warmup, then cosine decay to 0 at `total_steps`, 0 after (ProtoCLIP's schedule)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


@dataclass(frozen=True)
class GroupSchedule:
    """ProtoCLIP's `protoclip_cosine_lr`: warmup + cosine per role, each relative to its own start and end step.

    visual: `lr_at(step)` over [0, visual_steps) and 0 from `visual_steps` on (visual_steps = the total, or
    the first step of the LiT epoch). rest: 0 before `text_start_step`, then `lr_at(step - text_start_step)`
    over [text_start_step, text_end_step) with `text_lr`, 0 from `text_end_step` on.
    """

    base_lr: float
    text_lr: float
    warmup_steps: int
    visual_steps: int
    text_start_step: int
    text_end_step: int

    def __call__(self, step: int) -> dict[str, float]:
        visual = lr_at(step, base_lr=self.base_lr, warmup_steps=self.warmup_steps, total_steps=self.visual_steps)
        rest = 0.0
        if self.text_start_step <= step:
            rest = lr_at(
                step - self.text_start_step,
                base_lr=self.text_lr,
                warmup_steps=self.warmup_steps,
                total_steps=self.text_end_step - self.text_start_step,
            )
        if step >= self.visual_steps:
            visual = 0.0
        return {VISUAL: visual, REST: rest}


def group_schedule(
    *,
    lr: float,
    lr_text: float,
    warmup: int,
    steps_per_epoch: int,
    epochs: int,
    lit_start_epoch: int = -1,
    text_start_epoch: int = 0,
    text_end_epoch: int = -1,
) -> GroupSchedule:
    """The schedule the flags describe: `lr_text` < 0 is `lr`, `text_end_epoch` < 0 is `epochs`, and
    `lit_start_epoch` (1-based) > 0 ends the visual schedule when epoch `lit_start_epoch` begins."""
    total = steps_per_epoch * epochs
    return GroupSchedule(
        base_lr=lr,
        text_lr=lr if lr_text < 0 else lr_text,
        warmup_steps=warmup,
        visual_steps=steps_per_epoch * (lit_start_epoch - 1) if lit_start_epoch > 0 else total,
        text_start_step=steps_per_epoch * text_start_epoch,
        text_end_step=steps_per_epoch * (epochs if text_end_epoch < 0 else text_end_epoch),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float | Mapping[str, float]) -> None:
    """Set every group's learning rate: one value, or {role: value} by each group's "role"."""
    for group in optimizer.param_groups:
        group["lr"] = lr[group.get("role", REST)] if isinstance(lr, Mapping) else lr
