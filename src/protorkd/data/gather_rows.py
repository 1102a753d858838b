"""The CC3M URL list (caption<TAB>url, no header) and gather-cc's append-only resume log.

Row i is line i + 1 of the input (0-based line index), so keys, image paths and shard numbers stay
the same across runs and machines. The resume log `state.jsonl` holds one header line (what the
output depends on) and then one line per finished row, `{"row": i, "reason": "ok" | <failure>, ...}`,
flushed as soon as the row is done; the last record of a row wins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from protorkd.errors import UsageError

STATE_VERSION = 1
PENDING, OK, BLANK = 0, 1, 2  # status codes; failure kinds get codes 3.. in order of first appearance


@dataclass(frozen=True)
class Row:
    index: int  # 0-based line index in the input TSV
    caption: str
    url: str

    @property
    def key(self) -> str:
        return f"{self.index:09d}"


def _parse_line(path: Path, index: int, raw: bytes) -> Row | None:
    """One input line -> Row; None for a blank line or a `caption<TAB>url` header."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} line {index + 1}: not UTF-8 ({error}); re-save the file as UTF-8") from None
    if not line.strip():
        return None
    fields = line.split("\t")
    if len(fields) != 2:
        raise UsageError(
            f"{path} line {index + 1}: expected 2 tab-separated fields (caption<TAB>url), got {len(fields)}; "
            "fix or delete the row"
        )
    caption, url = fields[0].strip(), fields[1].strip()
    if index == 0 and url.lower() in ("url", "image_url", "link"):
        return None  # a header row, although CC3M ships none
    if not url.lower().startswith(("http://", "https://")):
        swapped = caption.lower().startswith(("http://", "https://"))
        hint = "the columns look swapped; expected caption<TAB>url" if swapped else "expected an http(s) URL"
        raise UsageError(f"{path} line {index + 1}: second field {url[:80]!r} is not a URL ({hint}); fix the row")
    return Row(index, caption, url)


def iter_rows(path: Path) -> Iterator[Row]:
    """Stream the rows of a CC3M-style TSV; raises UsageError naming the first malformed line."""
    with open(path, "rb") as handle:
        for index, raw in enumerate(handle):
            row = _parse_line(path, index, raw)
            if row is not None:
                yield row


def scan_tsv(path: Path) -> tuple[int, list[int]]:
    """(number of lines, indices of blank/header lines); validates every line first so a bad row fails fast."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file; pass the CC3M list, e.g. Train_GCC-training.tsv (caption<TAB>url)")
    lines, blank = 0, []
    with open(path, "rb") as handle:
        for index, raw in enumerate(handle):
            lines = index + 1
            if _parse_line(path, index, raw) is None:
                blank.append(index)
    if lines == len(blank):
        raise UsageError(f"{path}: no rows; expected lines of caption<TAB>url")
    return lines, blank


class StateLog:
    """The resume log: per-row status codes in a bytearray (1 byte per row), extras for ok rows on demand."""

    def __init__(self, path: Path, header: dict, num_lines: int, blank_lines: list[int]) -> None:
        self.path = path
        self.header = header
        self.status = bytearray(num_lines)
        for index in blank_lines:
            self.status[index] = BLANK
        self.reasons: list[str] = ["pending", "ok", "blank"]
        self.codes: dict[str, int] = {"pending": PENDING, "ok": OK, "blank": BLANK}
        self._handle: IO[str] | None = None

    def code(self, reason: str) -> int:
        if reason not in self.codes:
            if len(self.reasons) == 256:
                raise RuntimeError(f"more than 253 distinct failure kinds; cannot record {reason!r}")
            self.codes[reason] = len(self.reasons)
            self.reasons.append(reason)
        return self.codes[reason]

    def load(self, keep_extras: Callable[[int], bool] | None = None) -> dict[int, dict]:
        """Read an existing log (cutting a torn last line); returns the extras of ok rows where `keep_extras`."""
        extras: dict[int, dict] = {}
        if not self.path.exists():
            return extras
        good_bytes = 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith(b"\n"):
                    break  # killed mid-write
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(
                        f"{self.path} line {number}: corrupt resume log ({error}); delete it to start --out over"
                    ) from None
                good_bytes += len(line)
                if number == 1:
                    self._check_header(record)
                    continue
                row, reason = record.pop("row"), record.pop("reason")
                if row >= len(self.status):
                    continue
                self.status[row] = self.code(reason)
                if reason == "ok" and keep_extras is not None and keep_extras(row):
                    extras[row] = record
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(good_bytes)
        return extras

    def _check_header(self, found: dict) -> None:
        changed = {k: (found.get(k), v) for k, v in self.header.items() if found.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise UsageError(
                f"{self.path} belongs to a different gather-cc run ({detail}); rerun with the original settings "
                "to resume it, or choose a new --out"
            )

    def open(self) -> None:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", encoding="utf-8")
        if fresh:
            self._write(self.header)

    def record(self, row: int, reason: str, **extras: int) -> None:
        """Mark `row` done; the line is flushed at once so a SIGKILL loses at most this row."""
        self.status[row] = self.code(reason)
        self._write({"row": row, "reason": reason, **extras})

    def _write(self, record: dict) -> None:
        assert self._handle is not None, "StateLog.open() first"
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def counts(self) -> dict[str, int]:
        """reason -> number of rows (pending and blank lines excluded)."""
        counts: dict[str, int] = {}
        for code, reason in enumerate(self.reasons):
            if code not in (PENDING, BLANK):
                number = self.status.count(code)
                if number:
                    counts[reason] = number
        return counts
