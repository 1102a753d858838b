"""The metric-record schema: flat metric keys, and CLIP_benchmark's result files.

Two shapes, each defined here only:
- flat keys `task/dataset/metric` (`zeroshot/cifar10/top1`, `linear_clip_benchmark_joint/cifar10/top1`,
  `retrieval/coco2017/image_to_text_R@5`): what `SuiteResult.metrics` returns, what training logs,
  `results.jsonl` lines and `protorkd watch`'s CSV columns. Accuracies, recalls, Spearman correlations and
  cluster agreements are in %; `l2`, `weight_decay` and the feature statistics of the analysis are plain
  numbers.
- CLIP_benchmark result files: one JSON object per (dataset, task), `{"dataset", "model", "pretrained",
  "task", "metrics", "language", "precision"}`, named `{dataset}_{pretrained}_{model}_{language}_{task}.json`
  as `clip_benchmark eval` names them, so `clip_benchmark build` reads them. Every percentage becomes a
  fraction (CLIP_benchmark's unit) under CLIP_benchmark's metric name where it has one; the other values keep
  their value; a number with a 95 % interval has it beside it (`acc1_ci95_low`, `acc1_ci95_high`).
  `protorkd eval --output DIR` and `protorkd elevater` write them.

A linear probe's names carry its protocol and features (`linear_names`): only CLIP_benchmark's own protocol
on joint features is `linear_probe` / `lp_acc1`, as in a CLIP_benchmark table; the cross-validated protocol
is `linear_probe_cv` / `lp_cv_acc1`, ELEVATER's `linear_probe_elevater` / `lp_elevater_acc1`, backbone
features add `_backbone`. So no two protocols share a column, and no two files of one run share a name.
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
LINEAR_PROTOCOLS = ("clip_benchmark", "cv")  # how it is trained (--linear-protocol); ELEVATER's is "elevater"


def linear_names(protocol: str, features: str) -> tuple[str, str, str]:
    """(flat-key task, CLIP_benchmark file task, file metric prefix) of a linear probe: `linear_{protocol}_
    {features}`; `linear_probe` and `lp_` for CLIP_benchmark's protocol on joint features only, else with
    `_{protocol}` (not CLIP_benchmark's) and `_{features}` (not joint) added."""
    variant = ("" if protocol == "clip_benchmark" else f"_{protocol}") + ("" if features == "joint" else f"_{features}")
    return f"linear_{protocol}_{features}", f"linear_probe{variant}", f"lp{variant}_"


# the protocol behind each task's flat keys, in words (docs/evaluation.md has each in full)
PROTOCOLS = {
    "zeroshot": "zero-shot classification: CLIP's prompt ensemble, logits 100 x cosine (CLIP_benchmark "
    "zeroshot_classification)",
    "linear_clip_benchmark_joint": "linear probe on normalised joint features: CLIP_benchmark's linear_probe "
    "(AdamW, 10 epochs, no standardisation)",
    "linear_clip_benchmark_backbone": "linear probe on the image tower's features, CLIP_benchmark's training",
    "linear_cv_joint": "linear probe on normalised joint features: CLIP paper A.3 L2 search scored by 5-fold "
    "cross-validation, standardised features (protorkd's; not CLIP_benchmark's)",
    "linear_cv_backbone": "linear probe on the image tower's features (ProtoCLIP's probe), the cv protocol",
    "retrieval": "zero-shot retrieval, every caption of each image (CLIP_benchmark zeroshot_retrieval)",
    "sts": "STS: Spearman x 100 of cosine similarities (SimCSE's SentEval protocol)",
    "analysis": "feature analysis (ProtoCLIP's): modality gap, feature spread, image/text cluster agreement",
}


def protocol(key: str) -> str:
    """The protocol of a flat metric key `task/dataset/metric`, in words."""
    return PROTOCOLS.get(key.split("/", 1)[0], "see docs/evaluation.md")


def metric_key(task: str, dataset: str, metric: str) -> str:
    return f"{task}/{dataset}/{metric}"


def is_percent(metric: str) -> bool:
    """Whether our metric `metric` is reported in % (its CLIP_benchmark value is then value / 100)."""
    return metric in PERCENT_METRICS or "_R@" in metric


@dataclass
class TaskResult:
    """One task's metrics on one dataset (percentages in %), with the names its records carry.

    `clip_benchmark_task` is the file's task (`linear_names` for a probe), `prefix` its metric prefix (`lp_`,
    `lp_cv_`, ...), `intervals` {our metric: (low, high) in %} the 95 % intervals, `per_class` the
    classification breakdown for `--per-class` (with `class_names` in label order), `precision` what the
    forward passes ran in."""

    task: str
    dataset: str
    metrics: dict[str, float]
    clip_benchmark_task: str
    clip_benchmark_name: str = ""
    seconds: float = 0.0
    images: int = 0
    prefix: str = ""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_class: Any = None  # intervals.ClassBreakdown
    class_names: list[str] = field(default_factory=list)
    precision: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # the protocol's settings in the file (epochs, normalized, ...)


@dataclass
class SuiteResult:
    results: list[TaskResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why
    precision: str = ""  # the precision every forward pass ran in (features.resolve_eval_precision)

    @property
    def metrics(self) -> dict[str, float]:
        """{`task/dataset/metric`: value}, the flat form every log and CSV uses."""
        return {metric_key(r.task, r.dataset, key): value for r in self.results for key, value in r.metrics.items()}


def clip_benchmark_metrics(
    task: str,
    metrics: Mapping[str, float],
    *,
    prefix: str = "",
    intervals: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """`metrics` (ours) as CLIP_benchmark reports them for its `task`: fractions, under its names.

    zeroshot_classification: acc1, acc5 (null below 5 classes, where CLIP_benchmark writes NaN),
    mean_per_class_recall. A linear probe (`linear_probe*`): the same names after `prefix` (`lp_acc1` for
    CLIP_benchmark's own protocol on joint features, `linear_names`). zeroshot_retrieval:
    image_retrieval_recall@K (text->image), text_retrieval_recall@K (image->text). Other metrics keep our
    name, as a fraction when ours is a percentage. Each metric
    of `intervals` gets `<name>_ci95_low` / `_ci95_high` (fractions) beside it.
    """
    out: dict[str, Any] = {}
    classification = task == "zeroshot_classification" or task.startswith("linear_probe")
    if classification:
        out[prefix + "acc1"] = out[prefix + "acc5"] = None
    intervals = intervals or {}
    for key, value in metrics.items():
        value = value / 100.0 if is_percent(key) else value
        if classification and key in CLASSIFICATION_METRICS:
            name = prefix + CLASSIFICATION_METRICS[key]
        elif task == "zeroshot_retrieval" and "_R@" in key:
            direction, k = key.split("_R@")
            name = f"{RETRIEVAL_METRICS[direction]}@{k}"
        else:
            name = key
        out[name] = value
        if key in intervals:
            low, high = intervals[key]
            out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = low / 100.0, high / 100.0
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
            metrics={
                **clip_benchmark_metrics(r.clip_benchmark_task, r.metrics, prefix=r.prefix, intervals=r.intervals),
                **r.extra,
            },
            **({"precision": r.precision} if r.precision else {}),
        )
        for r in result.results
    ]


def per_class_rows(result: TaskResult) -> list[list[Any]]:
    """The `--per-class` CSV of a classification result: header, then one row per class in label order
    (index, name, test images, top-1 hits and recall %, top-5 likewise when reported)."""
    breakdown = result.per_class
    top5 = breakdown.top5_hits is not None
    rows: list[list[Any]] = [
        ["class", "name", "images", "top1_hits", "top1_recall"] + (["top5_hits", "top5_recall"] if top5 else [])
    ]
    for index, images in enumerate(breakdown.images):
        name = result.class_names[index] if index < len(result.class_names) else str(index)
        row: list[Any] = [index, name, images]
        for hits in (breakdown.top1_hits, breakdown.top5_hits) if top5 else (breakdown.top1_hits,):
            row += [round(hits[index], 6), round(100.0 * hits[index] / images, 4) if images else ""]
        rows.append(row)
    return rows


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
    protocol: str = "elevater",
    precision: str = "",
) -> dict[str, Any]:
    """The record of one ELEVATER dataset: its accuracies under CLIP_benchmark's names, `elevater_score` (the
    dataset's official metric) and, over several seeds, `elevater_score_std`; all fractions. The linear probe
    is ELEVATER's protocol, so its task and names say so (`linear_probe_elevater`, `lp_elevater_acc1`; the
    L-BFGS probe `linear_probe_elevater_lbfgs`)."""
    task, prefix = "zeroshot_classification", ""
    if linear_probe:
        _, task, prefix = linear_names(protocol, features)
    values: dict[str, Any] = {}
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
    if "toolkit_test_selected_score" in metrics:  # the toolkit's own, test-selected number (docs/elevater.md)
        values["elevater_toolkit_test_selected_score"] = metrics["toolkit_test_selected_score"] / 100.0
    extra: dict[str, Any] = {"elevater_metric": official_metric}
    if linear_probe:
        extra.update(num_shots=num_shots, seeds=list(seeds), features=features)
    if precision:
        extra["precision"] = precision
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
