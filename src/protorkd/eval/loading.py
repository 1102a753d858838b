"""Rebuild the dual encoder a checkpoint holds, from its weights and the `ModelOptions` that describe it.

A checkpoint stores the flags of its training run as one flat dict (`checkpoint["config"]`);
`model_options_from_flat` picks the model flags out of it. Weights that do not fit the model the options
describe are refused with a message naming the checkpoint and where the options came from: evaluating a
differently built model would give a silently wrong number. Reading an experiment's params.txt and
cross-checking it is the app's job (`protorkd.commands.common`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from protorkd.checkpoint import strip_module_prefix
from protorkd.errors import UsageError
from protorkd.models.build import build_dual_encoder
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.open_clip_models import trained_weights_follow
from protorkd.models.options import ModelOptions


def model_options_from_flat(values: Mapping[str, Any]) -> ModelOptions:
    """The model flags among a run's flat {flag name: value} dict (other flags are ignored)."""
    names = {f.name for f in dataclasses.fields(ModelOptions)}
    return ModelOptions(**{key: value for key, value in values.items() if key in names})


def option_differences(a: ModelOptions, b: ModelOptions) -> list[str]:
    """`name: a vs b` for every model flag on which `a` and `b` differ."""
    return [
        f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
        for f in dataclasses.fields(ModelOptions)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def weight_mismatches(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped weights of `state_dict` for `model` (empty when it fits)."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    return problems


def require_weights(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Refuse a file that holds no model weights (not a protorkd checkpoint)."""
    if "state_dict" not in checkpoint:
        raise UsageError(f"{path} is not a protorkd checkpoint (no state_dict)")


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], options: ModelOptions, *, path: Path, source: str
) -> DualEncoder:
    """The model `options` describe with the checkpoint's weights, in eval mode on the CPU.

    `path` (the checkpoint) and `source` (where `options` came from) only name things in the error raised
    when the weights do not fit.
    """
    require_weights(checkpoint, path)
    with trained_weights_follow():
        model = build_dual_encoder(options)
    state_dict = strip_module_prefix(checkpoint["state_dict"])
    problems = weight_mismatches(model, state_dict)
    if problems:
        raise UsageError(f"checkpoint {path} does not fit the model described by {source}: {'; '.join(problems)}")
    model.load_state_dict(state_dict)
    model.eval()
    return model
