"""Batched feature extraction under no_grad in a chosen precision, and a cache keyed by the weights that made them.

Image features: `image_features(model, dataset)` -> ([N, D], labels [N]); joint-space normalised features
for zero-shot and retrieval, tower (backbone) features for the linear probe. Text features:
`text_features(model, texts)` -> [N, D] normalised joint features.

The precision of an evaluation is a choice (`--eval-precision`), resolved once by `resolve_eval_precision`
and passed to every forward pass here; `Precision.autocast` alone decides what autocast that means.

`FeatureCache` stores tensors under a key that includes a fingerprint of the weights that produced them
(`weights_fingerprint`), so a cached entry can never be served for another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from protorkd.errors import UsageError
from protorkd.eval.datasets import UnreadableImage
from protorkd.io import atomic_path, atomic_write
from protorkd.models.locked import update_digest
from protorkd.precision import Precision

log = logging.getLogger(__name__)


EVAL_PRECISIONS = ("auto", "fp32", "amp", "amp_bf16")  # --eval-precision


def resolve_eval_precision(name: str | Precision, device: torch.device | str) -> Precision:
    """The precision an evaluation on `device` runs in: `auto` is CLIP_benchmark's default on a GPU (fp16
    autocast, `amp`; its `--no_amp` is our `fp32`) and fp32 on the CPU. Torch has no fp16 autocast on the
    CPU, so `amp` there computes in fp32 and is recorded as fp32: a result file names what ran."""
    name = name.value if isinstance(name, Precision) else name
    if name not in EVAL_PRECISIONS:
        raise UsageError(f"evaluation precision {name!r}: valid: {', '.join(EVAL_PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return Precision.AMP if cuda else Precision.FP32
    precision = Precision(name)
    if precision is Precision.AMP and not cuda:
        log.warning("--eval-precision amp: fp16 autocast exists on CUDA only; the CPU evaluates in fp32")
        return Precision.FP32
    return precision


def collate_or_error(batch: list[tuple[Any, int]]) -> Any:
    """Default collation, or the first `UnreadableImage` of the batch (the caller raises with its path)."""
    for image, _ in batch:
        if isinstance(image, UnreadableImage):
            return image
    return default_collate(batch)


@torch.no_grad()
def image_features(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    workers: int = 0,
    normalize: bool = True,
    precision: Precision = Precision.FP32,
    desc: str = "images",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on CPU, labels [N]) for a dataset of (image tensor, label) pairs.

    normalize=True gives joint-space features (`encode_image`); False gives the image tower's
    backbone features (the linear-probe protocol). The forward passes run under `precision.autocast`.
    An unreadable image stops with a message naming it.
    """
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        collate_fn=collate_or_error,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    features, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=None, mininterval=2.0):
            if isinstance(batch, UnreadableImage):
                raise UsageError(f"cannot read image {batch.path} ({batch.error})")
            images, targets = batch
            # in the tower's dtype: a model trained with --precision bf16 holds bf16 weights
            dtype = next(model.image_tower.parameters()).dtype if hasattr(model, "image_tower") else images.dtype
            images = images.to(device, dtype=dtype, non_blocking=True)
            with precision.autocast(device):
                output = model.encode_image(images) if normalize else model.image_backbone(images)
            features.append(output.float().cpu())
            labels.append(torch.as_tensor(targets))
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def text_features(
    model: torch.nn.Module,
    texts: list[str],
    *,
    device: torch.device | str,
    batch_size: int = 256,
    precision: Precision = Precision.FP32,
) -> torch.Tensor:
    """[N] strings -> [N, D] normalised joint text features (float32, CPU), encoded under `precision.autocast`.

    Texts are encoded in order of length (less padding per batch) and returned in input order.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    try:
        outputs = []
        for start in range(0, len(order), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            with precision.autocast(device):
                outputs.append(model.encode_texts(batch, device=device).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros(0, model.embed_dim)
    sorted_features = torch.cat(outputs)
    result = torch.empty_like(sorted_features)
    result[torch.tensor(order)] = sorted_features
    return result


def weights_fingerprint(*modules: nn.Module | None) -> str:
    """A hash of every parameter and buffer of `modules` (names, dtypes, shapes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    for index, module in enumerate(modules):
        if module is None:
            digest.update(f"<none {index}>".encode())
            continue
        update_digest(digest, module.state_dict(), prefix=f"{index}.")
    return digest.hexdigest()


class FeatureCache:
    """Tensors keyed by a JSON-able description: in memory (least recently used first out, at most
    `memory_bytes` in all) and, with a folder, on disk as `<folder>/<sha>.pt` (written atomically) with the
    description beside it in `<sha>.json`.
    """

    def __init__(self, folder: Path | None = None, *, memory_bytes: int = 256 << 20) -> None:
        self.folder = Path(folder) if folder else None
        self.memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.memory_bytes = memory_bytes
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key_of(description: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get_or_compute(
        self, description: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        key = self.key_of(description)
        if key in self.memory:
            self.memory.move_to_end(key)
            self.hits += 1
            return self.memory[key]
        path = self.folder / f"{key}.pt" if self.folder else None
        if path is not None and path.is_file():
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
                self._remember(key, value)
                return value
            except Exception as error:  # a damaged entry is recomputed, never trusted
                log.warning("ignoring unreadable feature cache entry %s: %s", path, error)
        self.misses += 1
        value = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(value, tmp)
            atomic_write(path.with_suffix(".json"), json.dumps(description, sort_keys=True, default=str, indent=1))
        self._remember(key, value)
        return value

    @staticmethod
    def _size(value: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in value.values() if isinstance(t, torch.Tensor))

    def _remember(self, key: str, value: dict[str, torch.Tensor]) -> None:
        if self._size(value) > self.memory_bytes:
            return
        self.memory[key] = value
        while sum(self._size(v) for v in self.memory.values()) > self.memory_bytes:
            self.memory.popitem(last=False)
