"""out.log, results.jsonl, tensorboard and (optionally) wandb.

Metrics in out.log, results.jsonl and the watch CSV are percentages (`top1`, `R@5`, ...: 0-100) and are
written with 12 significant digits (`without_float_noise`): 100 * 0.169 is stored as 16.9, not
16.900000000000002. CLIP_benchmark's result files (`eval --output`) keep its fractions (`acc1`: 0-1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from protorkd.io import append_line

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"
DATE_FORMAT = "%Y-%m-%d,%H:%M:%S"


def setup_file_logging(path: Path) -> logging.Handler:
    """Add `path` as a log file beside the terminal output; returns the handler (remove it when done)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def without_float_noise(metrics: dict[str, float]) -> dict[str, float]:
    """Every value to 12 significant digits: the binary noise of a percentage computed as 100 * fraction goes,
    every digit a metric can mean stays (float64 holds about 16)."""
    return {key: float(f"{value:.12g}") for key, value in metrics.items()}


class MetricWriter:
    """Scalars to tensorboard / wandb; evaluation results also as JSON lines in results.jsonl."""

    def __init__(self, experiment_dir: Path, report_to: str, *, config: dict[str, Any], wandb_project: str) -> None:
        self.results_path = experiment_dir / "results.jsonl"
        targets = {t.strip() for t in report_to.split(",") if t.strip()}
        unknown = targets - {"tensorboard", "wandb", "all"}
        if unknown:
            from protorkd.errors import UsageError

            raise UsageError(f"--report-to: unknown target(s) {sorted(unknown)}; valid: tensorboard, wandb, all")
        self.tensorboard = None
        self.wandb = None
        if targets & {"tensorboard", "all"}:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(experiment_dir / "tensorboard"))
        if targets & {"wandb", "all"}:
            try:
                import wandb
            except ImportError as error:
                from protorkd.errors import UsageError

                raise UsageError("--report-to wandb needs `pip install wandb` (or protorkd[wandb])") from error
            self.wandb = wandb.init(project=wandb_project, name=experiment_dir.name, config=config)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def results(self, metrics: dict[str, float], *, epoch: int, step: int, **fields: str) -> None:
        """One results.jsonl line: epoch, step, `fields` (what the evaluation ran in), the metrics."""
        line = {"epoch": epoch, "step": step, **fields, **without_float_noise(metrics)}
        append_line(self.results_path, json.dumps(line))  # fsynced
        self.scalars({f"eval/{key}": value for key, value in metrics.items()}, step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
