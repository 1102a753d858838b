"""The metric-record schema: flat metric keys, and CLIP_benchmark's result files.

Two shapes, each defined here only:
- flat keys `task/dataset/metric` (`zeroshot/cifar10/top1`, `linear_joint/cifar10/top1`,
  `retrieval/coco2017/image_to_text_R@5`): what `SuiteResult.metrics` returns, what training logs,
  `results.jsonl` lines and `protorkd watch`'s CSV columns. Accuracies, recalls, Spearman correlations and
  cluster agreements are in %; `l2` and the feature statistics of the analysis are plain numbers.
- CLIP_benchmark result files: one JSON object per (dataset, task), `{"dataset", "model", "pretrained",
  "task", "metrics", "language"}`, named `{dataset}_{pretrained}_{model}_{language}_{task}.json` as
  `clip_benchmark eval` names them, so `clip_benchmark build` reads them. Every percentage becomes a fraction
  (CLIP_benchmark's unit) under CLIP_benchmark's metric name where it has one; the other values keep their
  value. `protorkd eval --output DIR` and `protorkd elevater` write them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protorkd.io import atomic_write

LANGUAGE = "en"
FILE_TEMPLATE = "{dataset}_{pretrained}_{model}_{language}_{task}.json"  # clip_benchmark eval's default --output
# ours -> CLIP_benchmark's, for its classification tasks (the linear probe's get the `lp_` prefix)
CLASSIFICATION_METRICS = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"}
RETRIEVAL_METRICS = {"image_to_text": "text_retrieval_recall", "text_to_image": "image_retrieval_recall"}
PERCENT_METRICS = {
    "top1",
    "top5",
    "mean_per_class_recall",
    "cv_top1",
    "mean_recall",
    "spearman",
    "spearman_wmean",
    "image_text_cluster_ari",
    "image_text_cluster_ami",
    "top_class_share",
}
LINEAR_FEATURES = ("joint", "backbone")  # what the linear probe reads (--linear-features)


def metric_key(task: str, dataset: str, metric: str) -> str:
    return f"{task}/{dataset}/{metric}"


def is_percent(metric: str) -> bool:
    """Whether our metric `metric` is reported in % (its CLIP_benchmark value is then value / 100)."""
    return metric in PERCENT_METRICS or "_R@" in metric


@dataclass
class TaskResult:
    """One task's metrics on one dataset (percentages in %), with the names CLIP_benchmark gives the task and
    dataset. `features` names what a linear probe read ("joint" or "backbone"); it is part of `task`."""

    task: str
    dataset: str
    metrics: dict[str, float]
    clip_benchmark_task: str
    clip_benchmark_name: str = ""
    seconds: float = 0.0
    images: int = 0
    features: str = ""


@dataclass
class SuiteResult:
    results: list[TaskResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why

    @property
    def metrics(self) -> dict[str, float]:
        """{`task/dataset/metric`: value}, the flat form every log and CSV uses."""
        return {metric_key(r.task, r.dataset, key): value for r in self.results for key, value in r.metrics.items()}


def clip_benchmark_metrics(task: str, metrics: Mapping[str, float], *, features: str = "") -> dict[str, Any]:
    """`metrics` (ours) as CLIP_benchmark reports them for its `task`: fractions, under its names.

    zeroshot_classification: acc1, acc5 (null below 5 classes, where CLIP_benchmark writes NaN),
    mean_per_class_recall. linear_probe: lp_acc1, lp_acc5, lp_mean_per_class_recall on the joint features
    (CLIP_benchmark's probe reads normalised encode_image features, `normalized: true`); on backbone
    features, which CLIP_benchmark never probes, lp_backbone_acc1, ... so the two never share a column.
    zeroshot_retrieval: image_retrieval_recall@K (text->image), text_retrieval_recall@K (image->text).
    Other metrics keep our name, as a fraction when ours is a percentage.
    """
    out: dict[str, Any] = {}
    classification = task in ("zeroshot_classification", "linear_probe")
    if classification:
        prefix = "" if task == "zeroshot_classification" else ("lp_" if features == "joint" else f"lp_{features}_")
        out[prefix + "acc1"] = out[prefix + "acc5"] = None
    for key, value in metrics.items():
        value = value / 100.0 if is_percent(key) else value
        if classification and key in CLASSIFICATION_METRICS:
            out[prefix + CLASSIFICATION_METRICS[key]] = value
        elif task == "zeroshot_retrieval" and "_R@" in key:
            direction, k = key.split("_R@")
            out[f"{RETRIEVAL_METRICS[direction]}@{k}"] = value
        else:
            out[key] = value
    if task == "linear_probe":
        out.update(normalized=features == "joint", fewshot_k=-1, seed=0)
    return out


def clip_benchmark_record(
    *, dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, Any], **extra: Any
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
            metrics=clip_benchmark_metrics(r.clip_benchmark_task, r.metrics, features=r.features),
        )
        for r in result.results
    ]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=@-]", "_", text)


def record_filename(record: Mapping[str, Any]) -> str:
    """CLIP_benchmark's file name for a record: `{dataset}_{pretrained}_{model}_{language}_{task}.json`, with
    the dataset's '/' as '_' and a checkpoint path reduced to its file name, as `clip_benchmark eval` does;
    other characters outside [A-Za-z0-9._+=@-] become '_'."""
    pretrained = str(record["pretrained"])
    return FILE_TEMPLATE.format(
        dataset=_slug(str(record["dataset"])),
        pretrained=_slug(Path(pretrained).name if "/" in pretrained else pretrained),
        model=_slug(str(record["model"])),
        language=_slug(str(record["language"])),
        task=_slug(str(record["task"])),
    )


def write_records(folder: Path, records: list[dict[str, Any]]) -> list[Path]:
    """Each record as its own CLIP_benchmark file in `folder` (created); returns the paths written."""
    paths = [Path(folder) / record_filename(record) for record in records]
    if len(set(paths)) != len(paths):
        raise ValueError("two records map to the same CLIP_benchmark file name")
    for path, record in zip(paths, records):
        write_json(path, record)
    return paths


def elevater_record(
    dataset: str,
    metrics: dict[str, float],
    *,
    official_metric: str,
    linear_probe: bool,
    model: str,
    pretrained: str,
    features: str = "joint",
    num_shots: int = -1,
    seeds: tuple[int, ...] = (),
) -> dict[str, Any]:
    """The record of one ELEVATER dataset: its accuracies under CLIP_benchmark's names, `elevater_score` (the
    dataset's official metric) and, over several seeds, `elevater_score_std`; all fractions."""
    task = "linear_probe" if linear_probe else "zeroshot_classification"
    values: dict[str, Any] = {}
    prefix = ("lp_" if features == "joint" else f"lp_{features}_") if linear_probe else ""
    for ours, theirs in (
        *CLASSIFICATION_METRICS.items(),
        ("roc_auc", "roc_auc"),
        ("map_11pt", "mean_average_precision_11pt"),
    ):
        if ours in metrics:
            values[prefix + theirs] = metrics[ours] / 100.0
    values["elevater_score"] = metrics["score"] / 100.0
    if "score_std" in metrics:
        values["elevater_score_std"] = metrics["score_std"] / 100.0
    extra: dict[str, Any] = {"elevater_metric": official_metric}
    if linear_probe:
        extra.update(num_shots=num_shots, seeds=list(seeds), features=features)
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
