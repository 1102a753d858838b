"""Atomic file writes: the only way protorkd puts a file under its final name.

A write goes to a hidden temporary file in the same folder, is flushed and fsynced, then renamed over
the final name with `os.replace`, and the folder is fsynced. A reader (or a run killed at any point,
or a power loss after the rename returned) sees either the old complete file or the new complete
file, never a truncated or empty one. `atomic_folder` does the same for a whole folder (every file in it
fsynced before the rename), and `append_line` is the durable append for JSON-lines logs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path` that keeps its suffix (writers such as np.save and matplotlib infer the
    format from it) and that no `epoch_*.pt`-style glob matches: `.epoch_3.pt.1234.tmp.pt`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk (for files written by a library that closes them itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace(source: Path, path: Path) -> None:
    """fsync `source`, rename it to `path`, fsync the folder: the last step of every atomic write."""
    fsync_file(source)
    os.replace(source, path)
    fsync_folder(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path for a writer that takes a file name (torch.save, PIL, np.save, tar writers);
    when the block succeeds the file is fsynced and renamed to `path`, when it raises it is removed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """`open(path, mode)` whose content appears under `path` only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()


def atomic_write(path: Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write `data` (text or bytes) to `path` atomically."""
    if isinstance(data, bytes):
        with atomic_open(path, "wb") as handle:
            handle.write(data)
    else:
        with atomic_open(path, "w", encoding=encoding, newline="") as handle:
            handle.write(data)


def append_line(path: Path, line: str) -> None:
    """Append one line (a newline is added) and fsync: a later crash can only tear a line written after it.

    Readers of such logs (results.jsonl) skip a torn last line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; when the block succeeds every file in it is fsynced and the
    folder is renamed to `path` (which must not exist, or be empty), when it raises the folder is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync_file(Path(folder) / name)
            fsync_folder(Path(folder))
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
