"""Locked towers named by their source and a hash of their weights, instead of copied into every checkpoint.

A locked tower (`--teacher text` locks the text tower, `--lock-image-model` the image tower) never changes
during training, so a checkpoint need not hold it: it records where the tower comes from (builder, model,
tag, pooler, sequence length or image size) and the sha256 of its weights (`state_sha256`), and loading
rebuilds the tower from that source and checks the hash (`check_locked_towers`). Only towers whose weights
have a source are left out (`named_weights`: a hub model, a pretrained tag, a weights file); a randomly
initialised locked tower (the tiny test towers) cannot be rebuilt, so its weights stay in the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from protorkd.errors import UsageError
from protorkd.models.open_clip_models import LOCAL_DIR
from protorkd.models.options import ModelOptions

NAMED_WEIGHT_BUILDERS = ("sbert", "huggingface")  # the model name identifies the weights
TOWERS = ("image_tower", "text_tower")


def named_weights(builder: str, model: str, tag: str) -> str | None:
    """A name for pretrained weights (file digest, tag, model folder or hub id), None for random ones."""
    if tag and os.path.isfile(tag):
        return "file:" + file_digest(tag)
    if tag:
        return "tag:" + tag
    if model.startswith(LOCAL_DIR):
        folder = model.removeprefix(LOCAL_DIR)
        weights = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
        return "file:" + file_digest(os.path.join(folder, weights[0])) if weights else None
    if builder in NAMED_WEIGHT_BUILDERS:
        return "hub:" + model
    return None


def file_digest(path: str, block: int = 4 << 20) -> str:
    """sha256 of a file's size, first and last 4 MiB: cheap even for multi-GB checkpoints."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(block))
        if size > block:
            handle.seek(max(block, size - block))
            digest.update(handle.read(block))
    return digest.hexdigest()[:16]


def update_digest(digest: Any, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Feed every tensor of `state` (its name, dtype, shape and bytes, in the state's order) to `digest`."""
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{prefix}{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        digest.update(data.numpy().tobytes())


def state_sha256(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """sha256 of a module's state dict; with `dtype`, floating tensors are first cast to it (the dtype the
    tower was held in when the checkpoint was written: bf16 under --precision bf16)."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    digest = hashlib.sha256()
    update_digest(digest, state)
    return digest.hexdigest()


def _floating_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.state_dict().values() if p.is_floating_point()), torch.float32)


def tower_source(tower: str, options: ModelOptions) -> dict[str, Any]:
    """Where `tower` ("image_tower" or "text_tower") of the model `options` describe comes from."""
    if tower == "image_tower":
        return {
            "builder": options.image_model_builder,
            "model": options.image_model,
            "tag": options.image_model_tag,
            "image_size": options.image_size,
        }
    return {
        "builder": options.text_model_builder,
        "model": options.text_model,
        "tag": options.text_model_tag,
        "pooler": options.text_pooler,
        "max_seq_length": options.max_seq_length,
    }


def rebuildable_locked_towers(model: nn.Module, options: ModelOptions) -> list[str]:
    """The locked towers of `model` whose weights have a source (they can be left out of a checkpoint)."""
    locked = {"image_tower": getattr(model, "lock_image", False), "text_tower": getattr(model, "lock_text", False)}
    adapter = options.adapter is not None  # adapters change a tower's weights: never left out
    return [
        tower
        for tower in TOWERS
        if locked[tower]
        and not (tower == "text_tower" and adapter)
        and named_weights(*(tower_source(tower, options)[key] for key in ("builder", "model", "tag"))) is not None
    ]


def locked_tower_records(model: nn.Module, options: ModelOptions) -> dict[str, dict[str, Any]]:
    """{tower: its source, dtype and sha256} for every locked tower a checkpoint may leave out."""
    records = {}
    for tower in rebuildable_locked_towers(model, options):
        module = getattr(model, tower)
        dtype = _floating_dtype(module)
        records[tower] = {
            **tower_source(tower, options),
            "dtype": str(dtype).removeprefix("torch."),
            "sha256": state_sha256(module.state_dict()),
        }
    return records


def without_towers(state_dict: Mapping[str, torch.Tensor], towers: list[str] | Mapping[str, Any]) -> dict:
    """`state_dict` without the parameters and buffers of `towers`."""
    prefixes = tuple(f"{tower}." for tower in towers)
    return {key: value for key, value in state_dict.items() if not key.startswith(prefixes)}


def check_locked_towers(
    model: nn.Module, records: Mapping[str, Mapping[str, Any]], options: ModelOptions, *, where: str
) -> None:
    """Check that `model`'s rebuilt locked towers are the ones `records` describe; one-line UsageError if not.

    The model was rebuilt from its source (`options`); under a bf16 checkpoint its tower is rounded to bf16 and
    hashed so, the dtype training held it in: evaluation sees the weights training saw.
    """
    for tower, record in records.items():
        if tower not in TOWERS:
            raise UsageError(f"{where}: unknown locked tower {tower!r} (a checkpoint of another protorkd version?)")
        source = tower_source(tower, options)
        differs = [
            f"{key} {record.get(key)!r} vs {value!r}" for key, value in source.items() if record.get(key) != value
        ]
        if differs:
            raise UsageError(
                f"{where}: the locked {tower} was {', '.join(differs)} (checkpoint vs this model); "
                "rebuild it with the checkpoint's own flags"
            )
        module = getattr(model, tower)
        dtype, held = getattr(torch, str(record.get("dtype", "float32"))), _floating_dtype(module)
        if held != dtype:  # the values training saw (bf16-rounded), in the dtype this model holds them in
            module.to(dtype).to(held)
        digest = state_sha256(module.state_dict(), dtype)
        if digest != record.get("sha256"):
            name = f"{source['builder']}:{source['model']}" + (f"@{source['tag']}" if source["tag"] else "")
            raise UsageError(
                f"{where}: the locked {tower} rebuilt from its source {name} has other weights than the run "
                f"trained with (sha256 {digest[:12]} vs {str(record.get('sha256'))[:12]}); restore the same "
                "model files or version, or use a checkpoint that holds the tower"
            )
