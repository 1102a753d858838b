"""The tab-separated image-caption corpus (CC3M layout) with bad-sample accounting.

The file is read one row per line, split on the separator, without quoting (`read_corpus_table`): a quote
is part of the caption, so a stray one cannot swallow the following lines; a line that cannot be parsed
(wrong field count, not UTF-8) is kept as a bad row with its reason. A missing, corrupt, truncated or too
large image, or an empty caption, never crashes a worker either: the sample is returned marked bad,
dropped by `collate`, and counted by `BadSampleCounter` with its file, row and line.
"""

from __future__ import annotations

import csv
import logging
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from protorkd.data.captions import DEFAULT_MAX_CAPTION_BYTES, cut_caption
from protorkd.data.columns import StringColumn, StringColumnBuilder
from protorkd.data.images import DEFAULT_MAX_PIXELS, NotARegularFile, TooManyPixels, read_image
from protorkd.errors import BadDataError, UsageError

if TYPE_CHECKING:
    from protorkd.data.views import ViewReplay

log = logging.getLogger(__name__)


@dataclass
class CorpusTable:
    """The rows of a corpus file: image paths (resolved against the file's folder) and captions, the file
    line of each row, and the rows that cannot be used (`problems`: row -> reason). The strings are columns of
    bytes and the lines an int64 array (`data.columns`): no Python object per row."""

    images: StringColumn
    captions: StringColumn
    lines: np.ndarray  # [N] int64
    problems: dict[int, str] = field(default_factory=dict)

    def describe(self, path: Path, index: int) -> str:
        return f"{path} row {index + 1} (line {self.lines[index]})"


def _decode_line(raw: bytes) -> tuple[str, str | None]:
    """(text, None) for a UTF-8 line; (text with U+FFFD replacements, reason) otherwise."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as error:
        byte = raw[error.start]
        return raw.decode("utf-8", errors="replace"), f"not UTF-8 (byte 0x{byte:02x} at column {error.start + 1})"


def _split_quoted(text: str, separator: str) -> tuple[list[str], str | None]:
    """One line split as CSV with quotes (`--csv-quoting minimal`): a quoted field cannot run past its line."""
    try:
        return next(csv.reader([text], delimiter=separator, strict=True)), None
    except csv.Error as error:
        return text.split(separator), f"bad quoting ({error}; an unbalanced quote?)"


def _looks_csv_quoted(field_text: str) -> bool:
    return len(field_text) >= 2 and field_text[0] == field_text[-1] == '"' and '""' in field_text


def read_corpus_table(
    path: Path,
    img_key: str,
    caption_key: str,
    separator: str = "\t",
    dataset_size: int | None = None,
    max_bad_fraction: float | None = None,
    quoting: str = "none",
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    flag: str = "--train-data",
) -> CorpusTable:
    """The first `dataset_size` rows of a tab-separated corpus file, read without any quoting by default.

    Every line is one row split on `separator` (CC3M's files and gather-cc's train.tsv are plain tab-split
    lines: a caption never holds a tab or a newline, and quote characters are part of the caption). With
    `quoting="minimal"` each line is parsed as CSV (quoted fields may hold the separator), still one row per
    line, so an unbalanced quote spoils only its own row. A row
    whose field count differs from the header's, or that is not UTF-8, is kept as a bad row with its reason,
    so row numbers (and the teacher cache keyed by them) stay those of the file; blank lines are skipped.
    With `max_bad_fraction`, more bad rows than that fraction of all rows is a UsageError naming the first.
    A caption longer than `max_caption_bytes` is cut to that many bytes (counted in the log). `flag` names the
    flag that gave the file, in the error for a missing one.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file (expected a {separator!r}-separated CSV)")
    if not path.is_file():
        raise UsageError(f"{flag} {path}: not a regular file (a FIFO or a device is never waited on)")
    problems: dict[int, str] = {}
    quoted: list[int] = []
    cut: list[int] = []
    with open(path, "rb") as handle:
        raw_header = handle.readline()
        header_text, problem = _decode_line(raw_header.rstrip(b"\n").rstrip(b"\r"))
        if not raw_header.strip():
            raise UsageError(f"{path}: the file is empty; expected a header row with {img_key!r} and {caption_key!r}")
        if problem:
            raise UsageError(f"{path} line 1 (the header): {problem}; re-save the file as UTF-8")
        header = header_text.removeprefix("\ufeff").split(separator)
        missing = [key for key in (img_key, caption_key) if key not in header]
        if missing:
            raise UsageError(
                f"{path}: no column {', '.join(map(repr, missing))}; the header has {header}. "
                "Set --csv-img-key / --csv-caption-key (and --csv-separator if the columns are not tab-separated)"
            )
        img_col, cap_col = header.index(img_key), header.index(caption_key)
        root = path.parent
        folder = "" if str(root) == "." else str(root).rstrip("/") + "/"
        images, captions, lines = StringColumnBuilder(prefix=folder), StringColumnBuilder(), array("q")
        for line_number, raw in enumerate(handle, start=2):
            if dataset_size is not None and len(images) >= dataset_size:
                break
            line = raw.rstrip(b"\n").rstrip(b"\r")
            if not line.strip():
                continue
            text, problem = _decode_line(line)
            if quoting == "minimal":
                fields, quote_problem = _split_quoted(text, separator)
                problem = problem or quote_problem
            else:
                fields = text.split(separator)
            if problem is None and len(fields) != len(header):
                problem = (
                    f"{len(fields)} {separator!r}-separated fields where the header has {len(header)} "
                    "(a separator inside a caption?)"
                )
            image = fields[img_col] if img_col < len(fields) else ""
            caption = fields[cap_col] if cap_col < len(fields) else ""
            if problem is not None:
                problems[len(images)] = problem
            elif quoting == "none" and _looks_csv_quoted(caption):
                quoted.append(len(images))
            shortened = cut_caption(caption, max_caption_bytes)
            if shortened is not None:
                cut.append(len(images))
                caption = shortened
            images.append(str(root / image) if image and not Path(image).is_absolute() else image)
            captions.append(caption.strip())
            lines.append(line_number)
    if not len(images):
        raise UsageError(f"{path}: no data rows")
    table = CorpusTable(images.build(), captions.build(), np.frombuffer(lines, dtype=np.int64), problems)
    if cut:
        log.warning(
            "%s: %d captions longer than %d bytes were cut to that length before tokenizing (first: %s; "
            "--max-caption-bytes)",
            path,
            len(cut),
            max_caption_bytes,
            table.describe(path, cut[0]),
        )
    _report_table_problems(path, table, quoted, max_bad_fraction)
    return table


def _report_table_problems(path: Path, table: CorpusTable, quoted: list[int], max_bad_fraction: float | None) -> None:
    if quoted:
        log.warning(
            "%s: %d captions look CSV-quoted (first: %s); protorkd reads tab-separated files without quoting, "
            "so their quote characters are part of the caption (--csv-quoting minimal parses them)",
            path,
            len(quoted),
            table.describe(path, quoted[0]),
        )
    if not table.problems:
        return
    first = "; ".join(f"{table.describe(path, i)}: {reason}" for i, reason in list(table.problems.items())[:5])
    count, rows = len(table.problems), len(table.images)
    if max_bad_fraction is not None and count > max_bad_fraction * rows:
        raise UsageError(
            f"{path}: {count} of {rows} rows cannot be read (more than --max-bad-fraction {max_bad_fraction}); "
            f"first: {first}. Fix these lines, or raise --max-bad-fraction"
        )
    log.warning("%s: %d of %d rows cannot be read and will be skipped; first: %s", path, count, rows, first)


class CsvCorpus(Dataset):
    """Row i -> {"index", "image" ([3, H, W] or None), "caption", "bad" (reason or None), "source"}.

    `load_images=False` skips image decoding (when a cached image teacher replaces the image tower).
    `views=2` returns a second independently augmented view as "image_view2" (BYOL). With `view_replay` (a
    reinforced teacher cache, `--teacher-views`) a sample keyed (epoch, position, row) is the stored view that
    (epoch, row) picks, replayed exactly (`data.views`), and "view" says which. `problems` are rows
    the table reader could not parse, `bad_rows` rows whose image the teacher cache could not read; an image
    with more than `max_pixels` pixels is refused before it is decoded.
    """

    def __init__(
        self,
        images: Sequence[str],
        captions: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor] | None,
        *,
        load_images: bool = True,
        views: int = 1,
        source: str = "corpus",
        bad_rows: set[int] | None = None,
        problems: dict[int, str] | None = None,
        lines: Sequence[int] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        seed: int = 0,
        view_replay: ViewReplay | None = None,
    ) -> None:
        self.images = images
        self.captions = captions
        self.transform = transform
        self.load_images = load_images
        self.views = views
        self.source = source
        self.bad_rows = bad_rows or set()
        self.problems = problems or {}
        self.lines = lines
        self.max_pixels = max_pixels
        self.seed = seed
        self.view_replay = view_replay

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        """Where a row comes from, as a user can find it: file, row and line number."""
        line = self.lines[index] if self.lines is not None else index + 2
        where = f"{self.source} row {index + 1} (line {line})"
        return f"{where}: {self.images[index]}" if self.images[index] else where  # texts only: no image

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict:
        """`key` is a row, or (epoch, position, row) from EpisodeSampler: then the augmentation is seeded by
        (seed, epoch, position), so it does not depend on worker count, worker reuse or resumption."""
        if isinstance(key, tuple):
            epoch, position, index = key
            # The CPU generator only: the transforms draw from it, and torch.manual_seed would also queue a lazy
            # seeding of every accelerator backend per sample (a formatted stack each: ~1 ms per sample).
            torch.random.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + position)
        else:
            index = position = key
            epoch = 0
        sample = {"index": index, "position": position, "caption": self.captions[index], "image": None, "bad": None}
        if self.view_replay is not None:
            sample["view"], sample["view_params"] = self.view_replay.pick(epoch, index)
        if index in self.problems:
            sample["bad"] = self.problems[index]
            return sample
        if not sample["caption"]:
            sample["bad"] = "empty caption"
            return sample
        if index in self.bad_rows:
            sample["bad"] = "unreadable image (found while caching teacher features)"
            return sample
        if not self.load_images:
            return sample
        self.fill_images(sample, index)
        return sample

    def fill_images(self, sample: dict, index: int) -> None:
        """Set sample["image"] (and "image_view2") from row `index`'s file, or sample["bad"] with the reason."""

        def transform(image: Image.Image) -> None:
            sample["image"] = self.augment(image, sample)
            if self.views == 2:
                sample["image_view2"] = self.transform(image)

        try:
            read_image(self.images[index], self.max_pixels, transform)
        except (TooManyPixels, NotARegularFile) as reason:
            sample["bad"] = str(reason)
        except FileNotFoundError:
            sample["bad"] = "missing image"
        except Exception as error:  # PIL raises many types for corrupt / truncated files
            sample["bad"] = f"unreadable image ({type(error).__name__}: {error})"

    def augment(self, image: Image.Image | torch.Tensor, sample: dict) -> torch.Tensor:
        """The training transform of `image`: a new draw, or the stored view the sample was given."""
        if "view_params" in sample:
            from protorkd.data.views import apply_view  # torchvision: imported by the runs that replay views

            return apply_view(self.transform, image, sample["view_params"])
        return self.transform(image)


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
    if samples and "view" in samples[0]:  # a reinforced teacher cache's view of each row
        batch["views"] = torch.tensor([s["view"] for s in good], dtype=torch.long)
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

    def report(self, epoch: int | str) -> None:
        """WARNINGs naming the skipped samples (the first 20) of `epoch` (a number, or what else was read)."""
        if not self.bad:
            return
        where = f"epoch {epoch}" if isinstance(epoch, int) else epoch
        log.warning("%s: skipped %d unreadable samples of %d", where, len(self.bad), self.seen)
        for index, reason in self.bad[:20]:
            log.warning("  skipped %s: %s", self.describe(index), reason)
        if len(self.bad) > 20:
            log.warning("  ... and %d more", len(self.bad) - 20)
