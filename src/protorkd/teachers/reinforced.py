"""The reinforced teacher cache: K stored augmented views per image and a locked image teacher's features of each.

MobileCLIP's dataset reinforcement (Vasu et al., CVPR 2024) for any image teacher: for every image the fill draws K
augmentations from the run's own training transform, seeded by (the cache's view seed, `--teacher-views-seed`,
image, view) (`data.views`; not the run's --seed, so one cache serves runs of every seed), keeps their
parameters, and encodes each view with the teacher, exactly the tensor the student will see, prepared for the
teacher as an online teacher prepares it (`OnlineImageTeacher.view`). Training then picks one view per (epoch, row)
(`data.views.view_of_row`, with the run's --seed), rebuilds the student's input from the stored parameters, bit for
bit, and reads the teacher's features of that view: what CLIP-KD's online teacher computes, without running the
teacher every epoch.

A folder (`teacher-image-views-<hash>`) holds `views.npy` ([U, K, P] float32 view parameters), `features.npy`
([U, K, D] float16, memory mapped), `rows.npy` ([N] corpus row -> unique image) and `manifest.json` (corpus hash,
teacher, view transform, source geometry, K, view seed, chunk size, complete). It is filled in chunks of images, each
flushed and fsynced before it is marked done (`chunks/<c>.json`), so a killed fill resumes at the chunks not
marked; N processes can fill disjoint chunks of one cache side by side (`shard`; `protorkd cache-teacher --views K
--shard i/N`). A cache built for another transform, source, teacher, image size, K, view seed or chunk size
is refused in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from protorkd.data.views import ViewReplay, apply_view, draw_view, view_seed, view_width
from protorkd.errors import UsageError
from protorkd.failpoints import failpoint
from protorkd.io import atomic_path, atomic_write, fsync_file
from protorkd.teachers.cache import (
    _bad_rows,
    _check_manifest,
    _refusal,
    corpus_hash,
    distinct_keys,
    read_manifest,
    stored_rows,
    write_manifest,
)

log = logging.getLogger(__name__)
CHUNK = 64  # images per recorded chunk (x K views each)
FORMAT_VERSION = 1


@dataclass
class ReinforcedFeatures:
    """Lookup into a reinforced cache: view parameters and the teacher's features of each view of each image."""

    params: np.ndarray  # [U, K, P] float32 (memory mapped)
    features: np.ndarray  # [U, K, D] float16 (memory mapped)
    rows: np.ndarray  # [N] int64: corpus row -> unique image
    bad_rows: set[int]
    folder: Path
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    def replay(self, seed: int) -> ViewReplay:
        """What the training data path needs to replay these views; the run's `seed` picks each row's view in each
        epoch (the cache's own `seed` drew the views)."""
        return ViewReplay(self.view_params, self.views, seed)

    def view_params(self, row: int, view: int) -> np.ndarray:
        """[P] float32: the stored parameters of view `view` of corpus row `row`'s image."""
        return np.asarray(self.params[self.rows[row], view])

    def lookup(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """[B] corpus rows and [B] view numbers -> [B, D] float32 teacher features."""
        if views is None:
            raise ValueError("a reinforced teacher cache needs each row's view number (the batch's 'views')")
        items = self.rows[indices.cpu().numpy()]
        return torch.from_numpy(np.asarray(self.features[items, views.cpu().numpy()], dtype=np.float32))


def build_reinforced_cache(
    folder: Path,
    *,
    keys: Sequence[str],
    spec: dict[str, Any],
    views: int,
    seed: int,
    transform: Callable,
    load: Callable[[str], Any],
    teacher_input: Callable[[torch.Tensor], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    dim: int | Callable[[], int],
    batch_size: int = 256,
    progress: bool = True,
    info: Callable[[], dict[str, Any]] | None = None,
    chunk: int = CHUNK,
    shard: tuple[int, int] = (0, 1),
) -> ReinforcedFeatures | None:
    """Fill (or resume, or reuse) the reinforced cache in `folder` for corpus image paths `keys`.

    spec: the teacher and the view transform (augmentation, image size, statistics, source geometry), recorded and
        checked. transform: the student's training transform, whose draws make the views (`data.views`).
    load: path -> the source image the training data path gives the transform (a PIL image read from the file, or
        the decoded tensor of the in-memory corpus). teacher_input: the student's view [B, 3, S, S] -> the
        teacher's input (its resolution and statistics). encode: teacher inputs -> [B, D] features (no grad).
    shard (i, N): fill only the chunks c with c % N == i (N processes, e.g. one per GPU, fill one cache side by
        side); returns None while other shards' chunks are missing. Each finished chunk is flushed, fsynced and
        then marked (`chunks/<c>.json`, with its unreadable images), so any kill resumes at the chunks not marked.

    The global random state is left as it was: a fill must not change what the run draws after it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys_hash = corpus_hash(keys)
    with _locked(folder):
        rows = stored_rows(folder, read_manifest(folder), keys_hash, len(keys))
    if rows is None:
        unique, rows = distinct_keys(keys)
        count = len(unique)
    else:  # complete: the row map its fill wrote, nothing to encode
        unique, count = [], int(read_manifest(folder)["unique"])  # type: ignore[index]
    width = view_width(transform)
    expected = {
        "format": FORMAT_VERSION,
        "modality": "image-views",
        "teacher": spec,
        "corpus_sha256": keys_hash,
        "rows": len(keys),
        "unique": count,
        "views": views,
        "seed": seed,
        "view_width": width,
        "chunk": chunk,
    }
    with _locked(folder):  # shards started together: one creates the arrays, the others open them
        manifest = read_manifest(folder)
        if manifest is None:
            dim_ = int(dim() if callable(dim) else dim)
            for name, dtype, width_ in (("views.npy", np.float32, width), ("features.npy", np.float16, dim_)):
                np.lib.format.open_memmap(folder / name, mode="w+", dtype=dtype, shape=(len(unique), views, width_))
            manifest = {**expected, "dim": dim_, "complete": False}
            write_manifest(folder, manifest)
    _check_manifest(manifest, expected, folder)
    dim_ = _check_arrays(manifest, folder, count, views, width)
    if manifest["complete"]:
        return _open(folder, rows, list(manifest.get("bad_unique", [])), seed, manifest)
    chunks = range(-(-len(unique) // chunk))
    marked = _marked(folder)
    index, shards = shard
    mine = [c for c in chunks if c % shards == index and c not in marked]
    if marked:
        log.info("resuming reinforced teacher cache %s: %d of %d chunks done", folder, len(marked), len(chunks))
    params = np.load(folder / "views.npy", mmap_mode="r+")
    features = np.load(folder / "features.npy", mmap_mode="r+")
    bar = tqdm(
        total=len(mine),
        desc=f"teacher features of {views} views",
        disable=None if progress else True,
        unit="chunk",
        mininterval=1.0,
    )
    with torch.random.fork_rng(devices=[]):  # the views reseed torch's generator; the caller's stream is restored
        for number in mine:
            start, stop = number * chunk, min((number + 1) * chunk, len(unique))
            block_params, block_features, bad = _fill_chunk(
                unique[start:stop],
                start,
                views,
                (width, dim_),
                seed,
                transform,
                load,
                teacher_input,
                encode,
                batch_size,
            )
            params[start:stop], features[start:stop] = block_params, block_features
            for array, name in ((params, "views.npy"), (features, "features.npy")):
                array.flush()
                fsync_file(folder / name)  # on disk before the chunk is marked done
            (folder / "chunks").mkdir(exist_ok=True)
            atomic_write(folder / "chunks" / f"{number}.json", json.dumps({"bad_unique": bad}))
            bar.update(1)
            failpoint("teacher-cache-chunk")
    bar.close()
    del params, features
    with _locked(folder):
        marked = _marked(folder)
        manifest = read_manifest(folder) or manifest
        if not manifest.get("complete"):
            if len(marked) < len(chunks):
                log.info("reinforced teacher cache %s: %d of %d chunks done", folder, len(marked), len(chunks))
                return None
            with atomic_path(folder / "rows.npy") as tmp:
                np.save(tmp, rows)
            bad_unique = sorted(item for bad in marked.values() for item in bad)
            extra = {"info": info()} if info is not None else {}
            manifest = {**expected, "dim": dim_, "complete": True, "bad_unique": bad_unique, **extra}
            write_manifest(folder, manifest)
    return _open(folder, rows, list(manifest["bad_unique"]), seed, manifest)


def _fill_chunk(
    paths: list[str],
    first: int,
    views: int,
    widths: tuple[int, int],
    seed: int,
    transform: Callable,
    load: Callable[[str], Any],
    teacher_input: Callable[[torch.Tensor], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The views ([b, K, P]) and the teacher's features ([b, K, D]) of images `first`... (`paths`), and the images
    that could not be read (their rows are zero)."""
    width, dim = widths
    block_params = np.zeros((len(paths), views, width), dtype=np.float32)
    block_features = np.zeros((len(paths), views, dim), dtype=np.float16)
    inputs, slots, bad = [], [], []
    for offset, path in enumerate(paths):
        try:
            image = load(path)
        except Exception as error:  # unreadable image: remembered, its rows are skipped in training
            log.warning("reinforced teacher cache: cannot read %s (%s); its rows will be skipped", path, error)
            bad.append(first + offset)
            continue
        for view in range(views):
            torch.random.default_generator.manual_seed(view_seed(seed, first + offset, view))
            block_params[offset, view] = draw_view(transform, image)
            inputs.append(apply_view(transform, image, block_params[offset, view]))
            slots.append((offset, view))
    for b in range(0, len(inputs), batch_size):
        batch = teacher_input(torch.stack(inputs[b : b + batch_size]))
        encoded = encode(batch).float().cpu().numpy().astype(np.float16)
        if encoded.shape != (len(batch), dim):
            raise RuntimeError(f"the teacher gave features of shape {encoded.shape}, ({len(batch)}, {dim}) expected")
        for (offset, view), row in zip(slots[b : b + batch_size], encoded):
            block_features[offset, view] = row
    return block_params, block_features, bad


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the cache folder (shards of one fill creating or completing it together)."""
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _marked(folder: Path) -> dict[int, list[int]]:
    """{chunk number: its unreadable images} of the chunks recorded as done."""
    marked = {}
    for path in (folder / "chunks").glob("*.json") if (folder / "chunks").is_dir() else []:
        try:
            marked[int(path.stem)] = list(json.loads(path.read_text())["bad_unique"])
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(_refusal(folder, f"{path} cannot be read ({error})")) from None
    return marked


def _check_arrays(manifest: dict, folder: Path, unique: int, views: int, width: int) -> int:
    """The feature width of a manifest that matches the run, checked against the arrays on disk."""
    dim = manifest.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise UsageError(_refusal(folder, f"its manifest records feature width {dim!r}"))
    shapes = (("views.npy", np.float32, (unique, views, width)), ("features.npy", np.float16, (unique, views, dim)))
    for name, dtype, shape in shapes:
        try:
            array = np.load(folder / name, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise UsageError(_refusal(folder, f"{name} cannot be read ({error})")) from None
        if array.shape != shape or array.dtype != dtype:
            message = f"{name} is {array.dtype}{list(array.shape)}, not {np.dtype(dtype)}{list(shape)}"
            raise UsageError(_refusal(folder, message))
    return dim


def _open(folder: Path, rows: np.ndarray, bad_unique: list[int], seed: int, manifest: dict) -> ReinforcedFeatures:
    params = np.load(folder / "views.npy", mmap_mode="r")
    features = np.load(folder / "features.npy", mmap_mode="r")
    return ReinforcedFeatures(
        params, features, rows, _bad_rows(rows, bad_unique), folder, seed, manifest.get("info", {})
    )


__all__ = ["ReinforcedFeatures", "build_reinforced_cache"]
