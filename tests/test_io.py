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


def test_a_line_appended_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"epoch": 1}\n{"epoch": 2, "zeroshot/sha')  # a crash mid-append
    append_line(path, '{"epoch": 2}')
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2, "zeroshot/sha\n{"epoch": 2}\n'


def test_temporaries_of_interrupted_writes_are_recognised_and_removed(tmp_path):
    from protorkd.io import is_temporary, remove_temporaries, temporary_path

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    left = temporary_path(checkpoints / "epoch_latest.pt")  # what a kill mid-write leaves: .epoch_latest.pt.PID.tmp.pt
    left.write_bytes(b"x" * 1000)
    (tmp_path / ".run.4242.tmp").mkdir()  # an atomic folder a kill left
    (tmp_path / ".run.4242.tmp" / "params.txt").write_text("y" * 10)
    keep = ["epoch_latest.pt", ".lock", "notes.tmp", ".hidden", "a.4242.tmp.pt"]
    for name in keep:
        (checkpoints / name).write_text("keep")
    assert is_temporary(left.name) and not any(is_temporary(name) for name in keep)
    removed = remove_temporaries(tmp_path)
    assert sorted((path.name, size) for path, size in removed) == [(left.name, 1000), (".run.4242.tmp", 10)]
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(keep) and not (tmp_path / ".run.4242.tmp").exists()


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path):
    import errno

    from protorkd.errors import WriteFailed
    from protorkd.io import atomic_path

    path = tmp_path / "epoch_latest.pt"
    path.write_text("the previous checkpoint")
    with pytest.raises(WriteFailed) as error, atomic_path(path) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(error.value) == (f"cannot write {path}: no space left on the device; the file there before is unchanged")
    assert path.read_text() == "the previous checkpoint" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _under_file_size_limit(code: str, limit: int, cwd: Path):
    """Run `python -c code` with `ulimit -f` at `limit` bytes (Python ignores SIGXFSZ, so writes fail with EFBIG)."""
    import os
    import resource
    import subprocess
    import sys

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": str(SRC.parents[1])}
    command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, preexec_fn=limited, capture_output=True, text=True, timeout=300)


def test_a_checkpoint_over_the_file_size_limit_is_one_line_naming_it(tmp_path):
    """torch reports this as 30 lines of C++ traceback ("file write failed"); the previous checkpoint stays."""
    code = (
        "import torch\n"
        "from protorkd.checkpoint import save_checkpoint\n"
        "from protorkd.errors import WriteFailed\n"
        "save_checkpoint('epoch_latest.pt', {'w': torch.zeros(10)})\n"
        "try:\n"
        "    save_checkpoint('epoch_latest.pt', {'w': torch.zeros(100_000)})\n"
        "except WriteFailed as error:\n"
        "    print(error)\n"
        "print(torch.load('epoch_latest.pt', weights_only=True)['w'].shape)\n"
    )
    result = _under_file_size_limit(code, 100_000, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "cannot write epoch_latest.pt: the file-size limit (ulimit -f) is reached; the file there before is unchanged",
        "torch.Size([10])",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_latest.pt"]  # no temporary left


def test_the_cli_reports_a_write_the_file_size_limit_stops_in_one_line(tmp_path):
    code = "import sys; from protorkd.cli import main; sys.exit(main(['demo-data', '--out', 'demo', '--size', '20']))"
    result = _under_file_size_limit(code, 1000, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "protorkd demo-data: error: cannot write demo: the file-size limit (ulimit -f) is reached; nothing was "
        "created there"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []
