"""A corpus' strings (captions, image paths) held as bytes: millions of rows without a Python object per row.

A list of 12M Python strings costs about 60 bytes of object header and pointer a row beyond the text, is walked
by the garbage collector, and is copied page by page into every forked DataLoader worker as its reference counts
are touched (pytorch/pytorch#13246). A `StringColumn` holds the UTF-8 bytes of all its strings in one numpy
buffer, each followed by a NUL, and an int64 array of where each ends: 8 bytes a row beyond the text (plus one
for a path column), nothing for the collector, and pages the workers only read.

Image paths share their folder: a row whose path starts with the column's `prefix` (the corpus file's folder)
stores only the rest, and is given back as `prefix + rest`, the same string `str(folder / path)` was.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

_BLOCK = 1 << 16  # rows decoded together when iterating


class StringColumn(Sequence[str]):
    """Row i -> its string, decoded from the column's bytes on access."""

    def __init__(self, data: np.ndarray, ends: np.ndarray, prefix: str = "", prefixed: np.ndarray | None = None):
        self.data, self.ends, self.prefix, self.prefixed = data, ends, prefix, prefixed
        self._sha256: str | None = None  # the column never changes: hashed once for every cache that keys on it

    @classmethod
    def of(cls, strings: Sequence[str]) -> StringColumn:
        builder = StringColumnBuilder()
        for text in strings:
            builder.append(text)
        return builder.build()

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        count = len(self.ends)
        if not -count <= index < count:
            raise IndexError(f"row {index} of a column of {count}")
        index %= count
        start = int(self.ends[index - 1]) if index else 0
        text = self.data[start : int(self.ends[index]) - 1].tobytes().decode("utf-8")
        return self.prefix + text if self.prefixed is not None and self.prefixed[index] else text

    def __iter__(self) -> Iterator[str]:
        for first in range(0, len(self), _BLOCK):
            last = min(first + _BLOCK, len(self))
            base = int(self.ends[first - 1]) if first else 0
            block = self.data[base : int(self.ends[last - 1])].tobytes()
            starts = [0, *(self.ends[first : last - 1] - base).tolist()]
            stops = (self.ends[first:last] - base - 1).tolist()
            flags = self.prefixed[first:last].tolist() if self.prefixed is not None else [0] * (last - first)
            for start, stop, flag in zip(starts, stops, flags, strict=True):
                text = block[start:stop].decode("utf-8")
                yield self.prefix + text if flag else text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable contents, like a list

    def __repr__(self) -> str:
        head = ", ".join(repr(text) for text in self[:3])
        return f"StringColumn([{head}{', ...' if len(self) > 3 else ''}], {len(self)} rows)"

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.ends.nbytes + (self.prefixed.nbytes if self.prefixed is not None else 0)

    def sha256(self) -> str:
        """The hex sha256 of every string's UTF-8 bytes, each followed by a NUL (`teachers.cache.corpus_hash`):
        of the buffer itself when no row is prefixed. Computed once (each teacher's cache and the reinforced
        cache's own check key on it)."""
        if self._sha256 is None:
            if self.prefixed is None or not self.prefixed.any():
                self._sha256 = hashlib.sha256(memoryview(self.data)).hexdigest()
            else:
                digest = hashlib.sha256()
                for text in self:
                    digest.update(text.encode("utf-8"))
                    digest.update(b"\0")
                self._sha256 = digest.hexdigest()
        return self._sha256


class StringColumnBuilder:
    """Appends strings to a growing buffer; `build()` gives the column. With a `prefix`, a string starting with
    it is stored without it."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self._data = bytearray()
        self._ends = array("q")
        self._prefixed = bytearray() if prefix else None

    def __len__(self) -> int:
        return len(self._ends)

    def append(self, text: str) -> None:
        if self._prefixed is not None:
            shared = text.startswith(self.prefix)
            self._prefixed.append(shared)
            if shared:
                text = text[len(self.prefix) :]
        self._data += text.encode("utf-8")
        self._data.append(0)
        self._ends.append(len(self._data))

    def build(self) -> StringColumn:
        data = np.frombuffer(self._data, dtype=np.uint8) if self._data else np.zeros(0, np.uint8)
        ends = np.frombuffer(self._ends, dtype=np.int64) if self._ends else np.zeros(0, np.int64)
        prefixed = None if self._prefixed is None else np.frombuffer(self._prefixed, dtype=np.bool_)
        return StringColumn(data, ends, self.prefix, prefixed)
