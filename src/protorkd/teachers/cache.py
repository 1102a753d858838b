"""Features of a locked teacher tower for a whole corpus, computed once and reused.

A cache folder holds `features.npy` ([U, D] float16, one row per unique caption or image path, memory
mapped), `rows.npy` ([N] int64: corpus row -> feature row) and `manifest.json` (corpus hash, teacher
spec, dims, progress, and informational fields such as the image transform or a CLIP teacher's logit
scale). It is filled in chunks and the manifest records progress after each chunk, so an interrupted
run resumes where it stopped. A cache whose manifest does not match the run is refused.

Folders are named by modality and a hash of (teacher spec, corpus hash), so one root (`--teacher-cache`,
or an experiment's `cache/`) holds the caches of several teachers and corpora side by side.
`teachers.external` turns a cache into the per-row `.npy` that ProtoCLIP's `--external-teacher` reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from protorkd.data.columns import StringColumn
from protorkd.data.images import DEFAULT_MAX_PIXELS, read_image
from protorkd.errors import UsageError
from protorkd.failpoints import failpoint
from protorkd.io import atomic_path, atomic_write, fsync_file

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
    info: dict[str, Any] = field(default_factory=dict)  # manifest "info": transform, logit_scale, ...

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def lookup(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """[B] corpus rows -> [B, D] float32 teacher features (one per row: `views` does not apply)."""
        rows = self.rows[indices.cpu().numpy()]
        return torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))


def corpus_hash(keys: Sequence[str]) -> str:
    """The hex sha256 of every key's UTF-8 bytes, each followed by a NUL (a column of bytes hashes its buffer)."""
    if isinstance(keys, StringColumn):
        return keys.sha256()
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8", "replace"))
        digest.update(b"\0")
    return digest.hexdigest()


def distinct_keys(keys: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(the distinct keys in first-seen order, [N] int64 row -> its key's index among them)."""
    position: dict[str, int] = {}
    rows = np.fromiter((position.setdefault(key, len(position)) for key in keys), dtype=np.int64, count=len(keys))
    return list(position), rows


def stored_rows(folder: Path, manifest: dict | None, keys_hash: str, count: int) -> np.ndarray | None:
    """The row map (`rows.npy`, memory mapped) of a complete cache of this corpus, None for any other cache.

    A run on a complete cache reads the map its fill wrote instead of indexing the keys again: no dictionary of
    millions of captions at every start. The corpus hash pins the keys, so the map is the one they would give.
    """
    if not manifest or manifest.get("complete") is not True:
        return None
    unique = manifest.get("unique")
    if manifest.get("corpus_sha256") != keys_hash or manifest.get("rows") != count or not isinstance(unique, int):
        return None
    try:
        rows = np.load(Path(folder) / "rows.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None  # never written (a kill right after the last chunk): indexed again and written
    if rows.shape != (count,) or rows.dtype != np.int64 or (count and not 0 <= rows.min() <= rows.max() < unique):
        return None
    return rows


def cache_folder(root: Path, modality: str, spec: dict[str, Any], keys_hash: str) -> Path:
    key = hashlib.sha256(json.dumps({"spec": spec, "corpus": keys_hash}, sort_keys=True).encode()).hexdigest()
    return Path(root) / f"teacher-{modality}-{key[:16]}"


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a cache folder, None when there is none; an unparsable one is a UsageError."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(_refusal(folder, f"its manifest.json cannot be read ({error})")) from None
    if not isinstance(manifest, dict):
        raise UsageError(_refusal(folder, "its manifest.json is not a JSON object"))
    return manifest


def _refusal(folder: Path, problem: str) -> str:
    return (
        f"teacher cache {folder} is unusable: {problem}; delete that folder and rerun (its features are computed again)"
    )


def resolve_cache_folder(root: Path, modality: str, spec: dict[str, Any], keys_hash: str, *, needed: int) -> Path:
    """The folder for one teacher's features under `root`, or `root` itself when it is a single cache.

    A single cache folder (it has a manifest) serves a run that needs exactly one teacher cache
    (`needed`); its manifest is then checked against the run by `build_teacher_cache`.
    """
    root = Path(root)
    if not (root / "manifest.json").exists():
        return cache_folder(root, modality, spec, keys_hash)
    if needed != 1:
        raise UsageError(
            f"--teacher-cache {root} is the cache of one teacher, but this run needs {needed} teacher caches; "
            "point --teacher-cache at the folder that holds them (what `protorkd cache-teacher` writes)"
        )
    return root


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


def _check_progress(manifest: dict, folder: Path, unique: int) -> tuple[int, int]:
    """(dim, done) of a manifest that matches the run, after checking they are consistent with features.npy."""
    dim, done, complete = manifest.get("dim"), manifest.get("done"), manifest.get("complete")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise UsageError(_refusal(folder, f"its manifest records feature width {dim!r}"))
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= unique:
        raise UsageError(_refusal(folder, f"its manifest records {done!r} of {unique} features done"))
    if complete is not (done == unique):
        raise UsageError(_refusal(folder, f"its manifest says complete={complete!r} with {done} of {unique} done"))
    bad = manifest.get("bad_unique", [])
    if not isinstance(bad, list) or not all(isinstance(i, int) and 0 <= i < done for i in bad):
        raise UsageError(_refusal(folder, "its manifest's bad_unique is not a list of finished rows"))
    try:
        features = np.load(folder / "features.npy", mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UsageError(_refusal(folder, f"features.npy cannot be read ({error})")) from None
    if features.shape != (unique, dim) or features.dtype != np.float16:
        raise UsageError(
            _refusal(
                folder,
                f"features.npy is {features.dtype}{list(features.shape)}, the manifest needs float16[{unique}, {dim}]",
            )
        )
    return dim, done


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(folder / "manifest.json", json.dumps(manifest, indent=1))


def build_teacher_cache(
    folder: Path,
    *,
    modality: str,
    keys: Sequence[str],
    spec: dict[str, Any],
    encode: Callable[[list[Any]], torch.Tensor],
    dim: int | Callable[[], int],
    load: Callable[[str], Any] | None = None,
    batch_size: int = 256,
    progress: bool = True,
    info: Callable[[], dict[str, Any]] | None = None,
    chunk: int | None = None,
) -> TeacherFeatures:
    """Fill (or resume, or reuse) the cache in `folder` for corpus `keys` (captions or image paths).

    encode: a batch of inputs -> [b, D] features (runs the locked teacher under no_grad).
    dim: D, the teacher's feature width (its tower's `output_dim`), or a function giving it, asked for only
        when a new cache is started; never guessed from the data, so an all-unreadable chunk cannot set it.
    load: key -> encoder input (e.g. path -> transformed image tensor); identity for captions.
    info: informational manifest fields (transform, logit scale), asked for only when encoding
        happens, so a complete cache never needs the teacher built.

    After each `chunk` keys the features are flushed and fsynced, then the manifest records the progress,
    so a kill at any point resumes at the last recorded chunk. A manifest that is unparsable or disagrees
    with features.npy is refused with the folder to delete, never half-used.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys_hash, manifest = corpus_hash(keys), read_manifest(folder)
    rows = stored_rows(folder, manifest, keys_hash, len(keys))
    if rows is None:
        unique, rows = distinct_keys(keys)
        count = len(unique)
    else:  # complete: nothing to encode
        unique, count = [], int(manifest["unique"])  # type: ignore[index]
    expected = {
        "format": FORMAT_VERSION,
        "modality": modality,
        "teacher": spec,
        "corpus_sha256": keys_hash,
        "rows": len(keys),
        "unique": count,
    }
    features_path = folder / "features.npy"
    if manifest is not None:
        _check_manifest(manifest, expected, folder)
        width, done = _check_progress(manifest, folder, count)
        bad_unique: list[int] = list(manifest.get("bad_unique", []))
        if manifest["complete"]:
            if not isinstance(rows, np.memmap):  # the fill's row map was never written: now, for the next run
                with atomic_path(folder / "rows.npy") as tmp:
                    np.save(tmp, rows)
            features = np.load(features_path, mmap_mode="r")
            return TeacherFeatures(features, rows, _bad_rows(rows, bad_unique), folder, manifest.get("info", {}))
        features = np.load(features_path, mmap_mode="r+")
        log.info("resuming teacher cache %s at %d / %d", folder, done, len(unique))
    else:
        width, done, bad_unique = int(dim() if callable(dim) else dim), 0, []
        if width < 1:
            raise ValueError(f"teacher feature width must be positive, got {width}")
        features = np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float16, shape=(len(unique), width))

    load = load or (lambda key: key)
    chunk = chunk or CHUNK
    # captions are encoded longest-first in order of the unique list chunks; order inside a chunk is free
    bar = tqdm(
        total=len(unique),
        initial=done,
        desc=f"teacher {modality} features",
        disable=None if progress else True,  # a bar only on a terminal
        unit=modality == "text" and "caption" or "image",
        mininterval=1.0,
    )
    for start in range(done, len(unique), chunk):
        indices = list(range(start, min(start + chunk, len(unique))))
        inputs, valid = [], []
        for i in indices:
            try:
                inputs.append(load(unique[i]))
                valid.append(i)
            except Exception as error:  # unreadable image: remember and zero-fill
                log.warning("teacher cache: cannot read %s (%s); its rows will be skipped", unique[i], error)
                bad_unique.append(i)
        if modality == "text":  # similar lengths together: less padding
            order = sorted(range(len(valid)), key=lambda j: len(inputs[j]))
            inputs, valid = [inputs[j] for j in order], [valid[j] for j in order]
        block = np.zeros((len(indices), width), dtype=np.float16)
        for b in range(0, len(valid), batch_size):
            encoded = encode(inputs[b : b + batch_size]).float().cpu().numpy().astype(np.float16)
            if encoded.ndim != 2 or encoded.shape[1] != width:
                raise RuntimeError(
                    f"teacher {spec.get('model')!r} gave features of shape {encoded.shape}, width {width} expected"
                )
            block[[i - start for i in valid[b : b + batch_size]]] = encoded
            bar.update(len(encoded))
        features[start : start + len(indices)] = block
        features.flush()
        fsync_file(features_path)  # the features are on disk before the manifest says they are done
        done = indices[-1] + 1
        extra = {"info": info()} if info is not None else {}
        write_manifest(
            folder,
            {
                **expected,
                "dim": width,
                "done": done,
                "complete": done == len(unique),
                "bad_unique": bad_unique,
                **extra,
            },
        )
        failpoint("teacher-cache-chunk")
    bar.close()
    with atomic_path(folder / "rows.npy") as tmp:
        np.save(tmp, rows)
    del features
    features = np.load(features_path, mmap_mode="r")
    manifest = read_manifest(folder) or {}
    return TeacherFeatures(features, rows, _bad_rows(rows, bad_unique), folder, manifest.get("info", {}))


def _bad_rows(rows: np.ndarray, bad_unique: list[int]) -> set[int]:
    if not bad_unique:
        return set()
    return set(np.nonzero(np.isin(rows, np.asarray(bad_unique)))[0].tolist())


def image_loader(
    transform: Callable[[Image.Image], torch.Tensor], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Callable[[str], torch.Tensor]:
    """path -> transformed image; an image over `max_pixels` pixels raises before it is decoded."""

    def load(path: str) -> torch.Tensor:
        return read_image(path, max_pixels, transform)

    return load
