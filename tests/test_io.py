"""Writes: atomic files and folders (fsynced before the rename), durable appends, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protorkd.io import append_line, atomic_folder, atomic_write

SRC = Path(__file__).resolve().parents[1] / "src" / "protorkd"


def test_an_atomic_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    import protorkd.io as io_module

    synced: list[str] = []
    monkeypatch.setattr(io_module, "fsync_file", lambda path: synced.append(Path(path).name))
    with atomic_folder(tmp_path / "done") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
        assert not (tmp_path / "done").exists()
    assert sorted(synced) == ["a.txt", "b.txt"]  # every file fsynced before the rename
    assert (tmp_path / "done" / "sub" / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "failed") as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed while filling")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]  # no folder, no hidden leftover


def test_append_line_adds_one_fsynced_line(tmp_path, monkeypatch):
    import os

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    path = tmp_path / "results.jsonl"
    atomic_write(path, '{"epoch": 1}\n')
    append_line(path, '{"epoch": 2}')
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n' and len(synced) >= 2


def test_files_reach_their_final_name_only_through_protorkd_io():
    """No module renames files itself: every final name is written by io.replace (fsync, rename, fsync)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "io.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\bos\.(replace|rename)\(|\.rename\(|shutil\.move\(", line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert offenders == []
