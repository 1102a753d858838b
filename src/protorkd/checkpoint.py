"""Checkpoints are plain dicts of tensors, numbers and strings, written atomically, never unpickled as objects.

Two kinds, both loadable with `torch.load(path, weights_only=True)`:

* weights (`epoch_N.pt`, `weights_payload`): epoch (completed epochs), name, config (the user's flags as a
  flat dict), version, state_dict (the model without its rebuildable locked towers), locked_towers (each left
  out tower's source and sha256: `models.locked`), logit_scale (the loss's learned temperature, when it has one).
* training (`epoch_latest.pt`, `training_payload`): the weights plus what only a resume needs: loss_state
  (loss parameters and buffers), optimizer, scaler (when used).

A checkpoint written before locked towers were left out holds every tower and the training state in each
`epoch_N.pt`; it still loads (`load_model_state`) and resumes.

The random state is not stored: every epoch reseeds everything from (seed, epoch, rank) before it draws
anything (see `train.loop`), which is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from protorkd import __version__
from protorkd.errors import UsageError
from protorkd.io import atomic_path
from protorkd.models.locked import check_locked_towers, locked_tower_records, without_towers
from protorkd.models.options import ModelOptions

LATEST = "epoch_latest.pt"
CHECKSUM = "tensors_sha256"  # every checkpoint's key for the sha256 of its tensors (`tensors_sha256`)
NEVER_UNPICKLES = "protorkd loads only plain dicts of tensors, numbers and strings and never unpickles objects"
TRAINING_STATE = ("loss_state", "optimizer", "scaler")  # what only `epoch_latest.pt` holds
NUMBERED = re.compile(r"epoch_(\d+)\.pt")


def learned_logit_scale(loss: nn.Module) -> torch.Tensor | None:
    """The loss's learned log temperature (the first parameter named `logit_scale`), as open_clip's models
    hold it; None for a loss without one."""
    for name, parameter in loss.named_parameters():
        if name.rsplit(".", 1)[-1] == "logit_scale":
            return parameter.detach().reshape(())
    return None


def weights_payload(
    model: nn.Module,
    options: ModelOptions,
    *,
    epoch: int,
    name: str,
    config: dict[str, Any],
    logit_scale: torch.Tensor | None = None,
) -> dict[str, Any]:
    """What `epoch_N.pt` holds: the model's weights without its rebuildable locked towers (named by source and
    sha256 under "locked_towers"), the epoch, the run's name and flags, and the learned temperature."""
    locked = locked_tower_records(model, options)
    payload = {
        "epoch": epoch,
        "name": name,
        "config": config,
        "state_dict": without_towers(model.state_dict(), locked),
        "locked_towers": locked,
    }
    if logit_scale is not None:
        payload["logit_scale"] = logit_scale.detach().cpu()
    return payload


def training_payload(
    weights: dict[str, Any],
    *,
    loss: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """What `epoch_latest.pt` holds: `weights` plus the state only a resume needs (loss, optimizer, scaler)."""
    payload = {**weights, "loss_state": loss.state_dict(), "optimizer": optimizer.state_dict()}
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    return payload


def load_model_state(model: nn.Module, checkpoint: dict[str, Any], options: ModelOptions, *, where: str) -> None:
    """Load a checkpoint's weights into `model` (built from `options`): its recorded locked towers are checked
    against the rebuilt ones (source and sha256), every other weight must fit exactly. One-line UsageError."""
    locked = checkpoint.get("locked_towers") or {}
    check_locked_towers(model, locked, options, where=where)
    state_dict = strip_module_prefix(checkpoint["state_dict"])
    expected = without_towers(model.state_dict(), locked)
    problems = weight_mismatches(expected, state_dict)
    if problems:
        raise UsageError(f"{where}: {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=False)


def weight_mismatches(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped weights of `state_dict` against `expected` (empty when it fits)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    return problems


def is_weights_only(checkpoint: dict[str, Any]) -> bool:
    """A weights checkpoint (`epoch_N.pt`): no optimizer state to resume from."""
    return "optimizer" not in checkpoint


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the protorkd version and the sha256 of every tensor it holds) atomically: a kill
    mid-write never leaves a truncated file, and a changed bit is refused on load (`load_checkpoint`)."""
    payload = {**payload, "version": __version__}
    with atomic_path(Path(path)) as tmp:
        torch.save({**payload, CHECKSUM: tensors_sha256(payload)}, tmp)


def tensors_sha256(payload: Any) -> str:
    """sha256 over every tensor in `payload` (nested dicts and lists, keys in sorted order): each one's place,
    dtype, shape and bytes. Numbers and strings are not hashed: a flipped bit in them is a changed flag, epoch or
    name, which resumes refuse or print; it is the tensors that would change a model without a word."""
    digest = hashlib.sha256()

    def visit(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)  # 0-d tensors too
            digest.update(f"{where}|{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(value[key], f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{where}[{index}]")

    visit({key: value for key, value in payload.items() if key != CHECKSUM}, "")
    return digest.hexdigest()


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
    recorded = checkpoint.pop(CHECKSUM, None)  # absent in checkpoints written before checksums: not checked
    if recorded is not None and recorded != tensors_sha256(checkpoint):
        raise UsageError(
            f"checkpoint {path} is corrupt: its tensors do not match the sha256 written with them (a changed bit "
            "on disk or in transfer); use another checkpoint, e.g. the previous epoch_N.pt"
        )
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
    """After a kill between epoch_latest.pt and epoch_N.pt, write the latter from the former's weights.

    Returns the restored path, or None when there was nothing to restore."""
    latest, numbered = Path(checkpoint_dir) / LATEST, Path(checkpoint_dir) / f"epoch_{epoch}.pt"
    if numbered.exists() or not latest.is_file():
        return None
    checkpoint = load_checkpoint(latest)
    save_checkpoint(numbered, {k: v for k, v in checkpoint.items() if k not in (*TRAINING_STATE, "version")})
    return numbered


def numbered_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """[(epoch, path)] of the `epoch_N.pt` files in `checkpoint_dir`, by epoch."""
    found = []
    for path in Path(checkpoint_dir).glob("epoch_*.pt"):
        match = NUMBERED.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` most recent `epoch_N.pt` (keep 0: delete none); returns the deleted paths."""
    if keep <= 0:
        return []
    deleted = [path for _, path in numbered_checkpoints(checkpoint_dir)[:-keep]]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted
