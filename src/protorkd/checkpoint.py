"""Checkpoints are plain dicts of tensors, numbers and strings, written atomically, never unpickled as objects.

Keys: epoch (completed epochs), name, state_dict (model), loss_state (loss parameters and buffers),
optimizer, scaler (when used), version, config (the user's flags as a flat dict). Loadable with
`torch.load(path, weights_only=True)`.

The random state is not stored: every epoch reseeds everything from (seed, epoch, rank) before it draws
anything (see `train.loop`), which is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from protorkd import __version__
from protorkd.errors import UsageError
from protorkd.io import atomic_path


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the protorkd version) atomically: a kill mid-write never leaves a truncated file."""
    with atomic_path(Path(path)) as tmp:
        torch.save({**payload, "version": __version__}, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, with tensors on the CPU; a missing or unreadable file is a UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot read checkpoint {path}: {error}") from error


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from a DistributedDataParallel wrapper, with their `module.` prefix removed."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path:
    """'latest' -> checkpoint_dir/epoch_latest.pt; anything else is a path that must exist."""
    path = checkpoint_dir / "epoch_latest.pt" if resume == "latest" else Path(resume)
    if not path.is_file():
        hint = " (no epoch_latest.pt yet: the run never finished an epoch)" if resume == "latest" else ""
        raise UsageError(f"--resume {resume}: no checkpoint at {path}{hint}")
    return path
