"""The reinforced teacher cache: K stored augmented views per image and a locked image teacher's features of each.

MobileCLIP's dataset reinforcement (Vasu et al., CVPR 2024) for any image teacher: for every image the fill draws K
augmentations from the run's own training transform, seeded by (seed, image, view) (`data.views`), keeps their
parameters, and encodes each view with the teacher, exactly the tensor the student will see, prepared for the
teacher as an online teacher prepares it (`OnlineImageTeacher.view`). Training then picks one view per (epoch, row)
(`data.views.view_of_row`), rebuilds the student's input from the stored parameters, bit for bit, and reads the
teacher's features of that view: what CLIP-KD's online teacher computes, without running the teacher every epoch.

A folder (`teacher-image-views-<hash>`) holds `views.npy` ([U, K, P] float32 view parameters), `features.npy`
([U, K, D] float16, memory mapped), `rows.npy` ([N] corpus row -> unique image) and `manifest.json` (corpus hash,
teacher, view transform, source geometry, K, seed, progress). It is filled in chunks of images, each flushed and
fsynced before the manifest records it, so a killed fill resumes at the last recorded chunk. A cache built for
another transform, source, teacher, image size, K or seed is refused in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from protorkd.data.views import ViewReplay, apply_view, draw_view, view_seed, view_width
from protorkd.errors import UsageError
from protorkd.failpoints import failpoint
from protorkd.io import atomic_path, fsync_file
from protorkd.teachers.cache import (
    _bad_rows,
    _check_manifest,
    _refusal,
    corpus_hash,
    read_manifest,
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

    def replay(self) -> ViewReplay:
        """What the training data path needs to replay these views."""
        return ViewReplay(self.view_params, self.views, self.seed)

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
    keys: list[str],
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
) -> ReinforcedFeatures:
    """Fill (or resume, or reuse) the reinforced cache in `folder` for corpus image paths `keys`.

    spec: the teacher and the view transform (augmentation, image size, statistics, source geometry), recorded and
        checked. transform: the student's training transform, whose draws make the views (`data.views`).
    load: path -> the source image the training data path gives the transform (a PIL image read from the file, or
        the decoded tensor of the in-memory corpus). teacher_input: the student's view [B, 3, S, S] -> the
        teacher's input (its resolution and statistics). encode: teacher inputs -> [B, D] features (no grad).

    The global random state is left as it was: a fill must not change what the run draws after it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(keys))
    position = {key: i for i, key in enumerate(unique)}
    rows = np.fromiter((position[key] for key in keys), dtype=np.int64, count=len(keys))
    width = view_width(transform)
    expected = {
        "format": FORMAT_VERSION,
        "modality": "image-views",
        "teacher": spec,
        "corpus_sha256": corpus_hash(keys),
        "rows": len(keys),
        "unique": len(unique),
        "views": views,
        "seed": seed,
        "view_width": width,
    }
    manifest = read_manifest(folder)
    params_path, features_path = folder / "views.npy", folder / "features.npy"
    if manifest is not None:
        _check_manifest(manifest, expected, folder)
        done, dim_, bad_unique = _progress(manifest, folder, len(unique), views, width)
        if manifest["complete"]:
            return _open(folder, rows, bad_unique, seed, manifest)
        params = np.load(params_path, mmap_mode="r+")
        features = np.load(features_path, mmap_mode="r+")
        log.info("resuming reinforced teacher cache %s at %d / %d images", folder, done, len(unique))
    else:
        done, dim_, bad_unique = 0, int(dim() if callable(dim) else dim), []
        params = np.lib.format.open_memmap(params_path, mode="w+", dtype=np.float32, shape=(len(unique), views, width))
        features = np.lib.format.open_memmap(
            features_path, mode="w+", dtype=np.float16, shape=(len(unique), views, dim_)
        )
    bar = tqdm(
        total=len(unique),
        initial=done,
        desc=f"teacher features of {views} views",
        disable=None if progress else True,
        unit="image",
        mininterval=1.0,
    )
    with torch.random.fork_rng(devices=[]):  # the views reseed torch's generator; the caller's stream is restored
        for start in range(done, len(unique), chunk):
            stop = min(start + chunk, len(unique))
            block_params = np.zeros((stop - start, views, width), dtype=np.float32)
            block_features = np.zeros((stop - start, views, dim_), dtype=np.float16)
            inputs, slots = [], []
            for item in range(start, stop):
                try:
                    image = load(unique[item])
                except Exception as error:  # unreadable image: remembered, its rows are skipped in training
                    log.warning(
                        "reinforced teacher cache: cannot read %s (%s); its rows will be skipped", unique[item], error
                    )
                    bad_unique.append(item)
                    continue
                for view in range(views):
                    torch.random.default_generator.manual_seed(view_seed(seed, item, view))
                    block_params[item - start, view] = draw_view(transform, image)
                    inputs.append(apply_view(transform, image, block_params[item - start, view]))
                    slots.append((item - start, view))
            for b in range(0, len(inputs), batch_size):
                batch = teacher_input(torch.stack(inputs[b : b + batch_size]))
                encoded = encode(batch).float().cpu().numpy().astype(np.float16)
                if encoded.shape != (len(batch), dim_):
                    raise RuntimeError(
                        f"the teacher gave features of shape {encoded.shape}, ({len(batch)}, {dim_}) expected"
                    )
                for (offset, view), row in zip(slots[b : b + batch_size], encoded):
                    block_features[offset, view] = row
            params[start:stop], features[start:stop] = block_params, block_features
            for array, path in ((params, params_path), (features, features_path)):
                array.flush()
                fsync_file(path)  # on disk before the manifest says they are done
            done = stop
            bar.update(stop - start)
            extra = {"info": info()} if info is not None else {}
            write_manifest(
                folder,
                {
                    **expected,
                    "dim": dim_,
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
    del params, features
    return _open(folder, rows, bad_unique, seed, read_manifest(folder) or {})


def _progress(manifest: dict, folder: Path, unique: int, views: int, width: int) -> tuple[int, int, list[int]]:
    """(done, dim, bad images) of a manifest that matches the run, checked against the arrays on disk."""
    dim, done, complete = manifest.get("dim"), manifest.get("done"), manifest.get("complete")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise UsageError(_refusal(folder, f"its manifest records feature width {dim!r}"))
    if (
        not isinstance(done, int)
        or isinstance(done, bool)
        or not 0 <= done <= unique
        or complete is not (done == unique)
    ):
        raise UsageError(
            _refusal(folder, f"its manifest records {done!r} of {unique} images done, complete={complete!r}")
        )
    bad = manifest.get("bad_unique", [])
    if not isinstance(bad, list) or not all(isinstance(i, int) and 0 <= i < done for i in bad):
        raise UsageError(_refusal(folder, "its manifest's bad_unique is not a list of finished images"))
    for name, dtype, shape in (
        ("views.npy", np.float32, (unique, views, width)),
        ("features.npy", np.float16, (unique, views, dim)),
    ):
        try:
            array = np.load(folder / name, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise UsageError(_refusal(folder, f"{name} cannot be read ({error})")) from None
        if array.shape != shape or array.dtype != dtype:
            raise UsageError(
                _refusal(folder, f"{name} is {array.dtype}{list(array.shape)}, not {np.dtype(dtype)}{list(shape)}")
            )
    return done, dim, list(bad)


def _open(folder: Path, rows: np.ndarray, bad_unique: list[int], seed: int, manifest: dict) -> ReinforcedFeatures:
    params = np.load(folder / "views.npy", mmap_mode="r")
    features = np.load(folder / "features.npy", mmap_mode="r")
    return ReinforcedFeatures(
        params, features, rows, _bad_rows(rows, bad_unique), folder, seed, manifest.get("info", {})
    )


__all__ = ["ReinforcedFeatures", "build_reinforced_cache"]
