"""Features of a locked teacher tower for a whole corpus, computed once and reused.

A cache folder holds `features.npy` ([U, D] float16, one row per unique caption or image path, memory
mapped), `rows.npy` ([N] int64: corpus row -> feature row) and `manifest.json` (corpus hash, teacher
spec, dims, progress). It is filled in chunks and the manifest records progress after each chunk, so
an interrupted run resumes where it stopped. A cache whose manifest does not match the run is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from protorkd.errors import UsageError

log = logging.getLogger(__name__)
CHUNK = 2048
FORMAT_VERSION = 1


@dataclass
class TeacherFeatures:
    """Row lookup into cached teacher features; `bad_rows` are corpus rows whose image could not be read."""

    features: np.ndarray  # [U, D] float16 (memory mapped)
    rows: np.ndarray  # [N] int64
    bad_rows: set[int]
    folder: Path

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """[B] corpus rows -> [B, D] float32 teacher features."""
        rows = self.rows[indices.cpu().numpy()]
        return torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))


def corpus_hash(keys: list[str]) -> str:
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8", "replace"))
        digest.update(b"\0")
    return digest.hexdigest()


def cache_folder(root: Path, modality: str, spec: dict[str, Any], keys_hash: str) -> Path:
    key = hashlib.sha256(json.dumps({"spec": spec, "corpus": keys_hash}, sort_keys=True).encode()).hexdigest()
    return Path(root) / f"teacher-{modality}-{key[:16]}"


def _check_manifest(manifest: dict, expected: dict, folder: Path) -> None:
    differences = [
        f"{field}: cache has {manifest.get(field)!r}, this run needs {value!r}"
        for field, value in expected.items()
        if manifest.get(field) != value
    ]
    if differences:
        raise UsageError(
            f"teacher cache {folder} does not match this run ({'; '.join(differences)}); "
            "point --teacher-cache elsewhere or delete that folder"
        )


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / "manifest.json")


def build_teacher_cache(
    folder: Path,
    *,
    modality: str,
    keys: list[str],
    spec: dict[str, Any],
    encode: Callable[[list[Any]], torch.Tensor],
    load: Callable[[str], Any] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> TeacherFeatures:
    """Fill (or resume, or reuse) the cache in `folder` for corpus `keys` (captions or image paths).

    encode: a batch of inputs -> [b, D] features (runs the locked teacher under no_grad).
    load: key -> encoder input (e.g. path -> transformed image tensor); identity for captions.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(keys))
    position = {key: i for i, key in enumerate(unique)}
    rows = np.fromiter((position[key] for key in keys), dtype=np.int64, count=len(keys))
    expected = {
        "format": FORMAT_VERSION,
        "modality": modality,
        "teacher": spec,
        "corpus_sha256": corpus_hash(keys),
        "rows": len(keys),
        "unique": len(unique),
    }
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest is not None:
        _check_manifest(manifest, expected, folder)
    done = manifest["done"] if manifest else 0
    bad_unique: list[int] = manifest.get("bad_unique", []) if manifest else []
    if manifest and manifest.get("complete"):
        features = np.load(folder / "features.npy", mmap_mode="r")
        return TeacherFeatures(features, rows, _bad_rows(rows, bad_unique), folder)

    load = load or (lambda key: key)
    dim = None if manifest is None else manifest["dim"]
    features = None
    if dim is not None:
        features = np.load(folder / "features.npy", mmap_mode="r+")
    if done:
        log.info("resuming teacher cache %s at %d / %d", folder, done, len(unique))
    # captions are encoded longest-first in order of the unique list chunks; order inside a chunk is free
    bar = tqdm(
        total=len(unique),
        initial=done,
        desc=f"teacher {modality} features",
        disable=not progress,
        unit=modality == "text" and "caption" or "image",
        mininterval=1.0,
    )
    for start in range(done, len(unique), CHUNK):
        chunk = list(range(start, min(start + CHUNK, len(unique))))
        outputs: dict[int, np.ndarray] = {}
        inputs, valid = [], []
        for i in chunk:
            try:
                inputs.append(load(unique[i]))
                valid.append(i)
            except Exception as error:  # unreadable image: remember and zero-fill
                log.warning("teacher cache: cannot read %s (%s); its rows will be skipped", unique[i], error)
                bad_unique.append(i)
        if modality == "text":  # similar lengths together: less padding
            order = sorted(range(len(valid)), key=lambda j: len(inputs[j]))
            inputs, valid = [inputs[j] for j in order], [valid[j] for j in order]
        for b in range(0, len(valid), batch_size):
            encoded = encode(inputs[b : b + batch_size]).float().cpu().numpy().astype(np.float16)
            for i, vector in zip(valid[b : b + batch_size], encoded):
                outputs[i] = vector
            bar.update(len(encoded))
        if features is None:
            dim = int(next(iter(outputs.values())).shape[0]) if outputs else 0
            features = np.lib.format.open_memmap(
                folder / "features.npy", mode="w+", dtype=np.float16, shape=(len(unique), dim)
            )
        for i in chunk:
            features[i] = outputs.get(i, 0.0)
        features.flush()
        done = chunk[-1] + 1
        _write_manifest(
            folder, {**expected, "dim": dim, "done": done, "complete": done == len(unique), "bad_unique": bad_unique}
        )
    bar.close()
    np.save(folder / "rows.npy", rows)
    features = np.load(folder / "features.npy", mmap_mode="r")
    return TeacherFeatures(features, rows, _bad_rows(rows, bad_unique), folder)


def _bad_rows(rows: np.ndarray, bad_unique: list[int]) -> set[int]:
    if not bad_unique:
        return set()
    return set(np.nonzero(np.isin(rows, np.asarray(bad_unique)))[0].tolist())


def image_loader(transform: Callable[[Image.Image], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    def load(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            image.load()
            return transform(image)

    return load
