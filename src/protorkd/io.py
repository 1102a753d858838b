"""Atomic file writes: the only way protorkd puts a file under its final name.

A write goes to a hidden temporary file in the same folder, is flushed and fsynced, then renamed over
the final name with `os.replace`, and the folder is fsynced. A reader (or a run killed at any point,
or a power loss after the rename returned) sees either the old complete file or the new complete
file, never a truncated or empty one. `atomic_folder` does the same for a whole folder (every file in it
fsynced before the rename), and `append_line` is the durable append for JSON-lines logs.

A write that a full disk, a quota or a file-size limit (`ulimit -f`) stops is a `WriteFailed` naming the file
(torch reports it as 30 lines of C++ traceback that never say why). A process killed mid-write leaves its hidden
temporary behind: `is_temporary` recognises those names and `remove_temporaries` clears them from a folder
no other process writes in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from protorkd.errors import WriteFailed

# `.NAME.PID.tmp` (a folder, `atomic_folder`) or `.NAME.PID.tmp.SUFFIX` (a file, `temporary_path`)
_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp(\.[^.]+)?$")
_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
         errno.EFBIG: "the file-size limit (ulimit -f) is reached"}  # fmt: skip


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path` that keeps its suffix (writers such as np.save and matplotlib infer the
    format from it) and that no `epoch_*.pt`-style glob matches: `.epoch_3.pt.1234.tmp.pt`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one `temporary_path` or `atomic_folder` makes."""
    return _TEMPORARY.match(name) is not None


def remove_temporaries(folder: Path) -> list[tuple[Path, int]]:
    """Delete every temporary (`is_temporary`) under `folder`, left by processes killed mid-write; returns
    [(path, bytes)]. Only for a folder no other process is writing in (a locked experiment folder)."""
    removed: list[tuple[Path, int]] = []
    for root, folders, files in os.walk(folder):
        for name in [name for name in folders if is_temporary(name)]:
            path = Path(root) / name
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
            folders.remove(name)
            removed.append((path, size))
        for name in filter(is_temporary, files):
            path = Path(root) / name
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                removed.append((path, size))
    return removed


def _why_unwritable(error: BaseException, tmp: Path) -> str | None:
    """What stopped a write, when it was the disk or a limit: from the errno, or (torch's C++ writer raises a
    RuntimeError without one: "iostream error", "unexpected pos") from the file's size against `ulimit -f` and
    the folder's free space."""
    if isinstance(error, OSError):
        return _FULL.get(error.errno)
    if not isinstance(error, RuntimeError):
        return None
    with contextlib.suppress(OSError):
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and tmp.stat().st_size >= limit:
            return _FULL[errno.EFBIG]
    with contextlib.suppress(OSError):
        if os.statvfs(tmp.parent).f_bavail == 0:
            return _FULL[errno.ENOSPC]
    return None


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
    except BaseException as error:
        reason = _why_unwritable(error, tmp)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if reason is not None:
            raise WriteFailed(f"cannot write {path}: {reason}; the file there before is unchanged") from None
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

    A torn last line (no newline: a crash mid-append) is ended first, so it stays its own unreadable line
    instead of swallowing this one; readers of such logs (results.jsonl) skip it."""
    with open(path, "a+b") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
        else:
            torn = False
        try:
            handle.write((b"\n" if torn else b"") + line.rstrip("\n").encode("utf-8") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as error:
            if error.errno in _FULL:
                raise WriteFailed(f"cannot append to {path}: {_FULL[error.errno]}") from None
            raise


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
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in _FULL:
            raise WriteFailed(f"cannot write {path}: {_FULL[error.errno]}; nothing was created there") from None
        raise
