"""Checkpoints are plain dicts of tensors, numbers and strings, written atomically.

Keys: epoch (completed epochs), name, state_dict (model), loss_state (loss parameters and buffers),
optimizer, scaler (when used), rng (torch / numpy / python states as tensors), version, config
(the resolved flags as a flat dict). Loadable with `torch.load(path, weights_only=True)`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protorkd import __version__
from protorkd.errors import UsageError


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to `path.tmp` then rename, so a kill mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**payload, "version": __version__}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot read checkpoint {path}: {error}") from error


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as checkpoint-safe values (tensors, lists, numbers)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": torch.tensor([float(np_state[3]), float(np_state[4])], dtype=torch.float64),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, cached = state["numpy_gauss"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], int(has_gauss), cached)
    )
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path:
    """'latest' -> checkpoint_dir/epoch_latest.pt; anything else is a path that must exist."""
    path = checkpoint_dir / "epoch_latest.pt" if resume == "latest" else Path(resume)
    if not path.is_file():
        hint = " (no epoch_latest.pt yet: the run never finished an epoch)" if resume == "latest" else ""
        raise UsageError(f"--resume {resume}: no checkpoint at {path}{hint}")
    return path
