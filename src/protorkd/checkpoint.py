"""Checkpoints are plain dicts of tensors, numbers and strings, written atomically, never unpickled as objects.

Keys: epoch (completed epochs), name, state_dict (model), loss_state (loss parameters and buffers),
optimizer, scaler (when used), version, config (the user's flags as a flat dict). Loadable with
`torch.load(path, weights_only=True)`.

The random state is not stored: every epoch reseeds everything from (seed, epoch, rank) before it draws
anything (see `train.loop`), which is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from protorkd import __version__
from protorkd.errors import UsageError
from protorkd.io import atomic_path, copy_file

LATEST = "epoch_latest.pt"
NEVER_UNPICKLES = "protorkd loads only plain dicts of tensors, numbers and strings and never unpickles objects"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the protorkd version) atomically: a kill mid-write never leaves a truncated file."""
    with atomic_path(Path(path)) as tmp:
        torch.save({**payload, "version": __version__}, tmp)


def _problem(path: Path, error: BaseException) -> str:
    """What is wrong with a checkpoint torch refused, in a few words instead of torch's 6-9 lines."""
    if not zipfile.is_zipfile(path):
        return "it is truncated or not a torch checkpoint (not a complete zip archive)"
    text = str(error)
    unsupported = re.search(r"GLOBAL ([\w.]+)", text)
    if unsupported:
        return f"it holds a pickled object ({unsupported.group(1)})"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds something other than plain data"
    first = next((line for line in text.splitlines() if line.strip()), "")
    return f"it cannot be read ({type(error).__name__}: {first[:200]})"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, with tensors on the CPU; a missing, unsafe or corrupt file is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot load checkpoint {path}: {_problem(path, error)}; {NEVER_UNPICKLES}") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"cannot load checkpoint {path}: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from a DistributedDataParallel wrapper, with their `module.` prefix removed."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """The checkpoint `--resume` names: 'latest' -> checkpoint_dir/epoch_latest.pt, or None when the
    experiment has none yet (it then starts from scratch); anything else is a path that must exist."""
    if resume == "latest":
        path = Path(checkpoint_dir) / LATEST
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise UsageError(f"--resume {resume}: no checkpoint at {path}")
    return path


def restore_numbered_checkpoint(checkpoint_dir: Path, epoch: int) -> Path | None:
    """After a kill between epoch_latest.pt and epoch_N.pt, copy the former to the latter (atomically).

    Returns the restored path, or None when there was nothing to restore."""
    latest, numbered = Path(checkpoint_dir) / LATEST, Path(checkpoint_dir) / f"epoch_{epoch}.pt"
    if numbered.exists() or not latest.is_file():
        return None
    copy_file(latest, numbered)
    return numbered
