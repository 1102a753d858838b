"""The tab-separated image-caption corpus (CC3M layout) with bad-sample accounting.

A missing, corrupt or truncated image, or an empty caption, never crashes a worker: the sample is
returned marked bad, dropped by `collate`, and counted by `BadSampleCounter` with its file and row.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from protorkd.errors import BadDataError, UsageError

log = logging.getLogger(__name__)


def read_corpus_table(
    path: Path, img_key: str, caption_key: str, separator: str = "\t", dataset_size: int | None = None
) -> tuple[list[str], list[str]]:
    """(image paths resolved against the CSV's folder, captions) of the first `dataset_size` rows."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--train-data {path}: no such file (expected a {separator!r}-separated CSV)")
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=separator, quoting=csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            raise UsageError(f"{path}: the file is empty; expected a header row with {img_key!r} and {caption_key!r}")
        missing = [key for key in (img_key, caption_key) if key not in header]
        if missing:
            raise UsageError(
                f"{path}: no column {', '.join(map(repr, missing))}; the header has {header}. "
                "Set --csv-img-key / --csv-caption-key (and --csv-separator if the columns are not tab-separated)"
            )
        img_col, cap_col = header.index(img_key), header.index(caption_key)
        images, captions = [], []
        root = path.parent
        for row in reader:
            if dataset_size is not None and len(images) >= dataset_size:
                break
            if not row:
                continue
            image = row[img_col] if img_col < len(row) else ""
            caption = row[cap_col] if cap_col < len(row) else ""
            images.append(str(root / image) if image and not Path(image).is_absolute() else image)
            captions.append(caption.strip())
    if not images:
        raise UsageError(f"{path}: no data rows")
    return images, captions


class CsvCorpus(Dataset):
    """Row i -> {"index", "image" ([3, H, W] or None), "caption", "bad" (reason or None), "source"}.

    `load_images=False` skips image decoding (when a cached image teacher replaces the image tower).
    `views=2` returns a second independently augmented view as "image_view2" (BYOL).
    """

    def __init__(
        self,
        images: list[str],
        captions: list[str],
        transform: Callable[[Image.Image], torch.Tensor] | None,
        *,
        load_images: bool = True,
        views: int = 1,
        source: str = "corpus",
        bad_rows: set[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.captions = captions
        self.transform = transform
        self.load_images = load_images
        self.views = views
        self.source = source
        self.bad_rows = bad_rows or set()
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        """Where a row comes from, as a user can find it: file, row and line number."""
        return f"{self.source} row {index + 1} (line {index + 2}): {self.images[index]}"

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict:
        """`key` is a row, or (epoch, position, row) from EpisodeSampler: then the augmentation is seeded by
        (seed, epoch, position), so it does not depend on worker count, worker reuse or resumption."""
        if isinstance(key, tuple):
            epoch, position, index = key
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + position)
        else:
            index = position = key
        sample = {"index": index, "position": position, "caption": self.captions[index], "image": None, "bad": None}
        if not sample["caption"]:
            sample["bad"] = "empty caption"
            return sample
        if index in self.bad_rows:
            sample["bad"] = "unreadable image (found while caching teacher features)"
            return sample
        if not self.load_images:
            return sample
        try:
            with Image.open(self.images[index]) as image:
                image.load()
                sample["image"] = self.transform(image)
                if self.views == 2:
                    sample["image_view2"] = self.transform(image)
        except FileNotFoundError:
            sample["bad"] = "missing image"
        except Exception as error:  # PIL raises many types for corrupt / truncated files
            sample["bad"] = f"unreadable image ({type(error).__name__}: {error})"
        return sample


def collate(samples: list[dict]) -> dict:
    """Drop bad samples; stack the rest. Returns indices [b] (corpus rows), positions [b] (in the episode),
    images [b, 3, H, W] (if loaded), captions, bad."""
    good = [s for s in samples if s["bad"] is None]
    batch: dict = {
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "positions": torch.tensor([s["position"] for s in good], dtype=torch.long),
        "captions": [s["caption"] for s in good],
        "bad": [(s["index"], s["bad"]) for s in samples if s["bad"] is not None],
    }
    if good and good[0]["image"] is not None:
        batch["images"] = torch.stack([s["image"] for s in good])
    if good and "image_view2" in good[0]:
        batch["images_view2"] = torch.stack([s["image_view2"] for s in good])
    return batch


@dataclass
class BadSampleCounter:
    """Counts unreadable samples of one epoch and stops the run when they exceed `max_fraction`."""

    max_fraction: float
    describe: Callable[[int | str], str]  # a row index (TSV) or an already described source (webdataset)
    seen: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)

    def update(self, batch_size: int, bad: list[tuple[int, str]]) -> None:
        self.seen += batch_size
        self.bad.extend(bad)

    def check(self, epoch_size: int | None = None) -> None:
        """Raise BadDataError when the bad fraction (over `epoch_size`, else over what was seen) is too high."""
        total = epoch_size or self.seen
        if total and len(self.bad) > self.max_fraction * total and len(self.bad) >= 1:
            first = "; ".join(f"{self.describe(i)} ({reason})" for i, reason in self.bad[:5])
            raise BadDataError(
                f"{len(self.bad)} of {total} samples this epoch are unreadable (more than --max-bad-fraction "
                f"{self.max_fraction}); first: {first}. Fix or remove these rows, or raise --max-bad-fraction"
            )

    def report(self, epoch: int) -> None:
        if not self.bad:
            return
        log.warning("epoch %d: skipped %d unreadable samples of %d", epoch, len(self.bad), self.seen)
        for index, reason in self.bad[:20]:
            log.warning("  skipped %s: %s", self.describe(index), reason)
        if len(self.bad) > 20:
            log.warning("  ... and %d more", len(self.bad) - 20)
