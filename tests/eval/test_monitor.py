"""The monitor's bookkeeping with a stand-in evaluator: each epoch once, in order, across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from protorkd.eval.monitor import ALL_CSV, ALL_PNG, evaluate_pending, evaluate_single, read_rows, watch


def _checkpoints(root: Path, *epochs: int) -> None:
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        (root / "checkpoints" / f"epoch_{epoch}.pt").write_bytes(b"x" * epoch)
    (root / "checkpoints" / "epoch_latest.pt").write_bytes(b"latest")


class Recorder:
    def __init__(self, fail_on: set[str] = frozenset(), interrupt_on: str | None = None):
        self.calls: list[str] = []
        self.fail_on = fail_on
        self.interrupt_on = interrupt_on

    def __call__(self, path: Path) -> dict[str, float]:
        self.calls.append(path.name)
        if path.name == self.interrupt_on:
            raise KeyboardInterrupt
        if path.name in self.fail_on:
            raise RuntimeError("cannot read checkpoint")
        epoch = int(path.stem.split("_")[1])
        metrics = {"zeroshot/top1": 10.0 * epoch}
        if epoch >= 3:
            metrics["sts/avg"] = 1.0 * epoch  # a metric that appears later adds a column
        return metrics


def test_each_checkpoint_is_evaluated_once_in_epoch_order(tmp_path):
    _checkpoints(tmp_path, 10, 2, 1)
    recorder = Recorder()
    assert evaluate_pending(tmp_path, recorder, settle_seconds=0) == [1, 2, 10]
    assert recorder.calls == ["epoch_1.pt", "epoch_2.pt", "epoch_10.pt"]
    assert evaluate_pending(tmp_path, recorder, settle_seconds=0) == []
    _checkpoints(tmp_path, 3)
    assert evaluate_pending(tmp_path, recorder, settle_seconds=0) == [3]
    rows = read_rows(tmp_path / ALL_CSV)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "10"]
    header = (tmp_path / ALL_CSV).read_text().splitlines()[0]
    assert header == "epoch,zeroshot/top1,sts/avg"
    assert rows[0]["sts/avg"] == "" and rows[2]["sts/avg"] == "3.0"
    with Image.open(tmp_path / ALL_PNG) as plot:  # one 3.2 x 2.4 inch panel per metric, 2 in a row, 90 dpi
        assert plot.format == "PNG" and plot.size == (576, 216)


def test_interrupted_monitor_restarts_without_loss_or_duplicates(tmp_path):
    _checkpoints(tmp_path, 1, 2, 3)
    with pytest.raises(KeyboardInterrupt):
        evaluate_pending(tmp_path, Recorder(interrupt_on="epoch_2.pt"), settle_seconds=0)
    assert [r["epoch"] for r in read_rows(tmp_path / ALL_CSV)] == ["1"]
    assert not list(tmp_path.glob("*.tmp"))
    restarted = Recorder()
    evaluate_pending(tmp_path, restarted, settle_seconds=0)
    assert restarted.calls == ["epoch_2.pt", "epoch_3.pt"]
    assert [r["epoch"] for r in read_rows(tmp_path / ALL_CSV)] == ["1", "2", "3"]


def test_unreadable_checkpoint_is_skipped_until_it_changes(tmp_path, caplog):
    _checkpoints(tmp_path, 1, 2)
    recorder = Recorder(fail_on={"epoch_1.pt"})
    failed: dict[int, float] = {}
    assert evaluate_pending(tmp_path, recorder, settle_seconds=0, failed=failed) == [2]
    assert "skipping" in caplog.text and "epoch_1.pt" in caplog.text
    evaluate_pending(tmp_path, recorder, settle_seconds=0, failed=failed)
    assert recorder.calls.count("epoch_1.pt") == 1  # not retried while unchanged


def test_watch_stops_after_the_last_epoch(tmp_path):
    _checkpoints(tmp_path, 1, 2)
    watch(tmp_path, Recorder(), last_epoch=2, interval=0.01, settle_seconds=0)
    assert len(read_rows(tmp_path / ALL_CSV)) == 2


def test_single_epoch_writes_its_own_csv(tmp_path):
    _checkpoints(tmp_path, 4)
    out = evaluate_single(tmp_path, 4, Recorder())
    assert out.name == "single_evaluation_metrics@epoch_4.csv"
    assert read_rows(out) == [{"epoch": "4", "zeroshot/top1": "40.0", "sts/avg": "4.0"}]
    assert not (tmp_path / ALL_CSV).exists()
