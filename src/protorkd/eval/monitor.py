"""The checkpoint monitor behind `protorkd watch`: evaluate each new `checkpoints/epoch_N.pt` of an experiment once.

The evaluation itself is a callable the caller passes (`Evaluator`: checkpoint path -> flat metrics);
this module only finds checkpoints, keeps the bookkeeping and draws the plot.

Results go to `EXP_DIR/evaluation_metrics_all.csv` (one row per epoch, column `epoch`, the caller's `info`
columns (e.g. `eval_precision`), then every metric key; a new metric adds a column) and
`EXP_DIR/evaluation_metrics_all.png` (one panel per numeric column). The CSV
is the monitor's memory: it is rewritten atomically after each evaluation, so a killed or restarted
monitor neither loses a row nor evaluates an epoch twice.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from protorkd.io import atomic_open, atomic_path

log = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)\.pt$")
ALL_CSV = "evaluation_metrics_all.csv"
ALL_PNG = "evaluation_metrics_all.png"
Evaluator = Callable[[Path], dict[str, float]]


def list_checkpoints(checkpoint_dir: Path) -> dict[int, Path]:
    """{epoch: path} of `epoch_N.pt` files (never epoch_latest.pt or temporary files)."""
    found = {}
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match:
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's rows as strings ([] when it does not exist yet)."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> None:
    """Atomically write rows; columns = `epoch` then the union of all other keys in first-seen order."""
    columns: list[str] = ["epoch"]
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _numeric(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value in (None, "")
    return True


def plot_rows(rows: list[dict], path: Path) -> None:
    """One small panel per metric against epoch (matplotlib, Agg backend), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({key for row in rows for key in row if key != "epoch" and _numeric(row[key])})
    if not metrics:
        return
    columns = min(4, len(metrics))
    grid_rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 2.4 * grid_rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        points = sorted((int(row["epoch"]), float(row[metric])) for row in rows if row.get(metric) not in (None, ""))
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        axis.set_title(metric, fontsize=8)
        axis.set_xlabel("epoch", fontsize=7)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(metrics) :]:
        axis.axis("off")
    figure.tight_layout()
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=90)
    finally:
        plt.close(figure)


def _is_stable(path: Path, settle_seconds: float) -> bool:
    """True when the file's size and mtime did not change over `settle_seconds` (it is not being written)."""
    try:
        before = path.stat()
        if settle_seconds > 0:
            time.sleep(settle_seconds)
        after = path.stat()
    except FileNotFoundError:
        return False
    return (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns) and after.st_size > 0


def evaluate_pending(
    experiment_dir: Path,
    evaluate: Evaluator,
    *,
    settle_seconds: float = 1.0,
    failed: dict[int, float] | None = None,
    info: dict[str, str] | None = None,
) -> list[int]:
    """Evaluate every checkpoint not yet in the CSV, in epoch order; returns the epochs evaluated now.

    An unreadable checkpoint is skipped with a warning and retried only when its file changes. `info` columns
    (strings, e.g. the evaluation's precision) go into every row beside the metrics.
    """
    csv_path = experiment_dir / ALL_CSV
    failed = {} if failed is None else failed
    done_now = []
    for epoch, path in list_checkpoints(experiment_dir / "checkpoints").items():
        rows = read_rows(csv_path)
        if any(int(row["epoch"]) == epoch for row in rows):
            continue
        mtime = path.stat().st_mtime if path.exists() else 0.0
        if failed.get(epoch) == mtime or not _is_stable(path, settle_seconds):
            continue
        log.info("evaluating %s", path)
        try:
            metrics = evaluate(path)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # an unreadable or mismatched checkpoint must not stop the monitor
            log.warning("skipping %s: %s", path, error)
            failed[epoch] = mtime
            continue
        rows = read_rows(csv_path)
        rows.append({"epoch": epoch, **(info or {}), **metrics})
        rows.sort(key=lambda row: int(row["epoch"]))
        write_rows(csv_path, rows)
        plot_rows(rows, experiment_dir / ALL_PNG)
        log.info("epoch %d: %s", epoch, "  ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items())))
        done_now.append(epoch)
    return done_now


def watch(
    experiment_dir: Path,
    evaluate: Evaluator,
    *,
    last_epoch: int | None,
    interval: float = 10.0,
    once: bool = False,
    settle_seconds: float = 1.0,
    info: dict[str, str] | None = None,
) -> None:
    """Poll for new checkpoints until interrupted, until `last_epoch` is evaluated, or once with `once`."""
    failed: dict[int, float] = {}
    while True:
        evaluate_pending(experiment_dir, evaluate, settle_seconds=settle_seconds, failed=failed, info=info)
        evaluated = {int(row["epoch"]) for row in read_rows(experiment_dir / ALL_CSV)}
        if once:
            return
        if last_epoch is not None and last_epoch in evaluated:
            log.info("the last epoch (%d) is evaluated; done", last_epoch)
            return
        time.sleep(interval)


def evaluate_single(
    experiment_dir: Path, epoch: int | str, evaluate: Evaluator, *, info: dict[str, str] | None = None
) -> Path:
    """Evaluate `checkpoints/epoch_{epoch}.pt` (epoch N or "latest") and write
    `single_evaluation_metrics@epoch_{epoch}.csv`."""
    path = experiment_dir / "checkpoints" / f"epoch_{epoch}.pt"
    metrics = evaluate(path)
    out = experiment_dir / f"single_evaluation_metrics@epoch_{epoch}.csv"
    write_rows(out, [{"epoch": epoch, **(info or {}), **metrics}])
    return out
