"""The metric-record schema: flat metric keys, and CLIP_benchmark's result records.

Two shapes, each defined here only:
- flat keys `task/dataset/metric` (`zeroshot/cifar10/top1`, `retrieval/coco2017/image_to_text_R@5`), values in
  %: what `SuiteResult.metrics` returns, what training logs, `results.jsonl` lines and `protorkd watch`'s CSV
  columns;
- CLIP_benchmark records `{"dataset", "model", "pretrained", "task", "metrics", "language"}` (metrics as
  fractions, under CLIP_benchmark's metric names where it has them): `protorkd eval --output` and
  `protorkd elevater`'s results.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protorkd.io import atomic_write

LANGUAGE = "en"
CLASSIFICATION_TASKS = ("zeroshot_classification", "linear_probe")  # CLIP_benchmark tasks scored as accuracies
LINEAR_PROBE_PREFIX = "lp_"  # CLIP_benchmark's prefix of linear-probe metric names
CLASSIFICATION_METRICS = {
    "top1": "acc1",
    "top5": "acc5",
    "mean_per_class_recall": "mean_per_class_recall",
    "val_top1": "val_acc1",
    "roc_auc": "roc_auc",
    "map_11pt": "mean_average_precision_11pt",
}  # ours -> CLIP_benchmark's
RETRIEVAL_METRICS = {"image_to_text": "text_retrieval_recall", "text_to_image": "image_retrieval_recall"}


def metric_key(task: str, dataset: str, metric: str) -> str:
    return f"{task}/{dataset}/{metric}"


@dataclass
class TaskResult:
    """One task's metrics (in %) on one dataset, with the names CLIP_benchmark gives the task and dataset."""

    task: str
    dataset: str
    metrics: dict[str, float]
    clip_benchmark_task: str
    clip_benchmark_name: str = ""
    seconds: float = 0.0
    images: int = 0


@dataclass
class SuiteResult:
    results: list[TaskResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why

    @property
    def metrics(self) -> dict[str, float]:
        """{`task/dataset/metric`: value}, the flat form every log and CSV uses."""
        return {metric_key(r.task, r.dataset, key): value for r in self.results for key, value in r.metrics.items()}


def clip_benchmark_metrics(task: str, metrics: Mapping[str, float], *, named_only: bool = False) -> dict[str, float]:
    """`metrics` (ours, in %) as CLIP_benchmark reports them for its `task`: fractions under its names.

    Accuracies become `acc1`, `acc5`, ... (`lp_acc1` for the linear probe), retrieval recalls
    `text_retrieval_recall@K` / `image_retrieval_recall@K`. Other metrics are kept as they are, or dropped
    with `named_only`.
    """
    renamed: dict[str, float] = {}
    for key, value in metrics.items():
        if task in CLASSIFICATION_TASKS and key in CLASSIFICATION_METRICS:
            prefix = LINEAR_PROBE_PREFIX if task == "linear_probe" else ""
            renamed[prefix + CLASSIFICATION_METRICS[key]] = value / 100.0
        elif task == "zeroshot_retrieval" and "_R@" in key:
            direction, k = key.split("_R@")
            renamed[f"{RETRIEVAL_METRICS[direction]}@{k}"] = value / 100.0
        elif not named_only:
            renamed[key] = value
    return renamed


def clip_benchmark_record(
    *, dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """One CLIP_benchmark record; `extra` keys (e.g. ELEVATER's `num_shots`) follow the standard ones."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": metrics,
        "language": LANGUAGE,
        **extra,
    }


def suite_records(result: SuiteResult, *, model: str, pretrained: str) -> list[dict[str, Any]]:
    """The records of a suite run (`protorkd eval --output`): one per task and dataset."""
    return [
        clip_benchmark_record(
            dataset=r.clip_benchmark_name or r.dataset,
            model=model,
            pretrained=pretrained,
            task=r.clip_benchmark_task,
            metrics=clip_benchmark_metrics(r.clip_benchmark_task, r.metrics),
        )
        for r in result.results
    ]


def elevater_record(
    dataset: str,
    metrics: dict[str, float],
    *,
    official_metric: str,
    linear_probe: bool,
    model: str,
    pretrained: str,
    num_shots: int = -1,
    seeds: tuple[int, ...] = (),
) -> dict[str, Any]:
    """The record of one ELEVATER dataset: its accuracies under CLIP_benchmark's names, plus `elevater_score`
    (the dataset's official metric) and, over several seeds, `elevater_score_std`."""
    task = "linear_probe" if linear_probe else "zeroshot_classification"
    values = clip_benchmark_metrics(task, metrics, named_only=True)
    values["elevater_score"] = metrics["score"] / 100.0
    if "score_std" in metrics:
        values["elevater_score_std"] = metrics["score_std"] / 100.0
    extra: dict[str, Any] = {"elevater_metric": official_metric}
    if linear_probe:
        extra.update(num_shots=num_shots, seeds=list(seeds))
    return clip_benchmark_record(
        dataset=f"elevater/{dataset}", model=model, pretrained=pretrained, task=task, metrics=values, **extra
    )


def to_json(value: Any) -> str:
    """Indented JSON with NaN (a metric that could not be computed) written as null, which every reader accepts."""

    def clean(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, list):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=1, allow_nan=False) + "\n"


def write_json(path: Path, value: Any) -> None:
    """`value` as `to_json` writes it, atomically (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, to_json(value))
