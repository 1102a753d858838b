"""The evaluation suite: each task finds its datasets under the data root and runs its `evaluate`.

Used by `protorkd eval`, `protorkd watch` and the training loop (`run_suite`), so all report the same
numbers. Each task is one entry of `TASKS` (an `EvalTask`): its runner, the data it needs and its
CLIP_benchmark task name; `TASK_NAMES` lists them in the order they run. Metric keys are flat
`task/dataset/metric` (`eval.records`): `zeroshot/cifar10/top1`, `linear_clip_benchmark_joint/cifar10/top1`
(the linear probe names its protocol and the features it read), `retrieval/coco2017/image_to_text_R@5`,
`sts/STSB/spearman`, `analysis/coco2017/modality_gap`. A task whose data is absent is skipped, with the
reason. Every result also carries its 95 % intervals and, for classification, its per-class breakdown
(`eval.intervals`), and the precision its forward passes ran in (`EvalOptions.precision`, resolved once).

The representation diagnostics (`eval.diagnostics`: effective ranks, alignment, uniformity, student-teacher
cosine on a fixed sample of each captioned dataset, `diagnostics/shapes/image_effective_rank`) run with
every suite run that runs a task reading images, so training, `watch` and `eval` log them at every
evaluation (`EvalOptions.diagnostics_sample` 0: only when asked for). A collapse logs one WARNING per metric.

Training calls `run_suite(model, root, tasks=due, options=EvalOptions(device=..., batch_size=...,
workers=..., cache=cache, precision=..., zeroshot_metadata=...))` with the tasks due this epoch and a
`FeatureCache` the run keeps, so zero-shot classifiers of a frozen text tower are built once per run. The
defaults of `EvalOptions` are the standard protocols (CLIP's prompts for every registered dataset,
CLIP_benchmark's linear probe on joint features), so training, `watch` and `eval` report the same numbers
without passing anything else.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from protorkd.errors import UsageError
from protorkd.eval import analysis, diagnostics, retrieval, sts, zeroshot
from protorkd.eval.catalog import ClassificationSpec, RetrievalSpec, select
from protorkd.eval.features import (
    FeatureCache,
    image_features,
    resolve_eval_precision,
    text_features,
    weights_fingerprint,
)
from protorkd.eval.intervals import ClassBreakdown, bootstrap_recall_intervals, classification_extras
from protorkd.eval.linear_clip_benchmark import clip_benchmark_linear_probe
from protorkd.eval.linear_probe import ProbeResult, cv_linear_probe
from protorkd.eval.records import LINEAR_FEATURES, SuiteResult, TaskResult, linear_names
from protorkd.precision import Precision
from protorkd.registry import Registry

log = logging.getLogger(__name__)
METADATA_FILE = "zeroshot_metadata.json"  # a data root's own class names / templates (the demo writes one)


@dataclass
class EvalOptions:
    device: torch.device | str = "cpu"
    batch_size: int = 256
    workers: int = 0
    datasets: list[str] | None = None  # None: every dataset present
    zeroshot_metadata: Path | None = None  # overrides the shipped CLIP prompts and ROOT/zeroshot_metadata.json
    precision: str | Precision = "auto"  # features.EVAL_PRECISIONS; auto: amp on CUDA (CLIP_benchmark's), else fp32
    linear_protocol: str = "clip_benchmark"  # records.LINEAR_PROTOCOLS
    linear_solver: str = "torch"  # the cv protocol's solver
    linear_val_proportion: float | None = None  # the clip_benchmark protocol's --val_proportion (None: no search)
    linear_features: str = "joint"  # "joint": normalised encode_image (CLIP_benchmark's); "backbone": the tower
    analysis_clusters: int = 10
    cache: FeatureCache | None = None
    diagnostics_sample: int = diagnostics.DEFAULT_SAMPLE  # images per captioned dataset; 0: not run unasked

    def __post_init__(self) -> None:
        self.precision = resolve_eval_precision(self.precision, self.device)  # resolved once, here

    def record_fields(self) -> dict[str, str]:
        """What a results line records about how the numbers were made: {"eval_precision": "fp32", ...}."""
        return {"eval_precision": self.precision.value, "linear_protocol": self.linear_protocol}


@dataclass
class DatasetScore:
    """What a task runner returns for one dataset; `run_suite` adds the task's names to make a `TaskResult`."""

    dataset: str
    metrics: dict[str, float]
    clip_benchmark_name: str = ""
    seconds: float = 0.0
    images: int = 0
    names: tuple[str, str, str] | None = None  # a linear probe's (task, file task, metric prefix): linear_names
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_class: ClassBreakdown | None = None
    class_names: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class Needs(Enum):
    """The data a task runs on."""

    CLASSIFICATION = "a classification dataset"
    LABELLED_TRAIN = "a classification dataset with a train split"
    CAPTIONS = "a captioned-image dataset"
    STS = "SentEval STS folders"


@dataclass
class _Run:
    """What one suite run shares between tasks: data root, datasets present, options, memoised features."""

    model: torch.nn.Module
    root: Path
    specs: list
    options: EvalOptions
    precision: Precision
    memo: dict = field(default_factory=dict)

    def transform(self) -> Callable:
        from protorkd.data.transforms import eval_transform  # torchvision: imported when used, `--help` stays fast

        return eval_transform(self.model.image_preprocess)

    def preprocess_key(self) -> list:
        p = self.model.image_preprocess
        return [p.image_size, list(p.mean), list(p.std), p.interpolation]

    def image_fingerprint(self) -> str:
        if "image_fingerprint" not in self.memo:
            self.memo["image_fingerprint"] = weights_fingerprint(self.model.image_tower)
        return self.memo["image_fingerprint"]

    def image_joint_fingerprint(self) -> str:
        if "image_joint_fingerprint" not in self.memo:
            self.memo["image_joint_fingerprint"] = weights_fingerprint(self.model.image_tower, self.model.image_head)
        return self.memo["image_joint_fingerprint"]

    def classification(self, *, with_train: bool = False) -> list[ClassificationSpec]:
        return [
            s
            for s in self.specs
            if isinstance(s, ClassificationSpec) and (not with_train or s.has_split(self.root, s.train_split))
        ]

    def captioned(self) -> list[RetrievalSpec]:
        return [s for s in self.specs if isinstance(s, RetrievalSpec)]

    def missing(self, needs: Needs) -> str | None:
        """Why the data `needs` names is absent under the root, or None when it is there."""
        if needs is Needs.CLASSIFICATION and not self.classification():
            return f"no classification dataset under {self.root} (ROOT/<name>/test/<class>/, see docs/data.md)"
        if needs is Needs.LABELLED_TRAIN and not self.classification(with_train=True):
            return f"no classification dataset with a train split under {self.root}"
        if needs is Needs.CAPTIONS and not self.captioned():
            return f"no captions file under {self.root} (coco2017/annotations/captions_val2017.json, ...)"
        if needs is Needs.STS and not sts.present_tasks(self.root / "sts"):
            return f"no SentEval STS folders under {self.root / 'sts'}"
        return None

    def captioned_features(self, spec: RetrievalSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, caption features, caption_image) of a retrieval dataset, encoded once per run."""
        key = ("captioned", spec.name)
        if key not in self.memo:
            dataset = spec.load(self.root, self.transform())
            o = self.options
            images, _ = image_features(
                self.model,
                dataset,
                device=o.device,
                batch_size=o.batch_size,
                workers=o.workers,
                precision=self.precision,
                desc="retrieval images",
            )
            self.memo[key] = (images, self.caption_features(dataset.captions), dataset.caption_image)
        return self.memo[key]

    def caption_features(self, captions: list[str]) -> torch.Tensor:
        """[T, D] joint caption features; with a feature cache, encoded once while the text side's weights stay
        the same (a locked text teacher: once per training run, not at every evaluation)."""
        o = self.options

        def compute() -> dict[str, torch.Tensor]:
            return {
                "features": text_features(
                    self.model, captions, device=o.device, batch_size=o.batch_size, precision=self.precision
                )
            }

        if o.cache is None:
            return compute()["features"]
        if "text_fingerprint" not in self.memo:
            self.memo["text_fingerprint"] = zeroshot.text_side_fingerprint(self.model)
        description = {
            "kind": "caption_features",
            "text_weights": self.memo["text_fingerprint"],
            "captions": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
            "count": len(captions),
            "precision": self.precision.value,
        }
        return o.cache.get_or_compute(description, compute)["features"]


def _zeroshot(run: _Run) -> list[DatasetScore]:
    o = run.options
    metadata_files = [p for p in (o.zeroshot_metadata, run.root / METADATA_FILE) if p is not None and Path(p).exists()]
    if o.zeroshot_metadata is not None and not Path(o.zeroshot_metadata).exists():
        raise UsageError(f"--zeroshot-metadata {o.zeroshot_metadata}: no such file")
    scores = []
    for spec in run.classification():
        started = time.time()
        dataset = spec.load(run.root, spec.test_split, run.transform())
        if dataset.empty_classes:
            log.warning(
                "%s: %d class folders without images (%s): %s",
                spec.name,
                len(dataset.empty_classes),
                "their classes stay, as the dataset's class list is fixed"
                if spec.registered
                else "dropped with their class names",
                ", ".join(dataset.empty_classes),
            )
        prompts = zeroshot.resolve_prompts(
            spec.name,
            dataset.class_folders,
            dataset.classes,
            packaged_key=spec.prompts,
            subset=spec.prompt_classes,
            metadata_files=metadata_files,
        )
        log.info(
            "zero-shot %s: %d classes, %d templates from %s",
            spec.name,
            len(prompts.classnames),
            len(prompts.templates),
            prompts.source,
        )
        logits, labels = zeroshot.logits_and_labels(
            run.model,
            dataset,
            prompts,
            device=o.device,
            batch_size=o.batch_size,
            workers=o.workers,
            cache=o.cache,
            precision=run.precision,
        )
        intervals, per_class = classification_extras(logits, labels)
        names = [name if isinstance(name, str) else name[0] for name in prompts.classnames]
        scores.append(
            DatasetScore(
                spec.name,
                zeroshot.zeroshot_metrics(logits, labels),
                spec.zeroshot_record_name,
                time.time() - started,
                len(dataset),
                intervals=intervals,
                per_class=per_class,
                class_names=names,
            )
        )
    return scores


def _linear_features(run: _Run, spec: ClassificationSpec, split: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({"features" [N, D], "labels" [N]}, class names) of one split, the features from the feature cache when
    it has them: normalised joint features (`encode_image`) or the image tower's, as
    `EvalOptions.linear_features` says."""
    o = run.options
    joint = o.linear_features == "joint"
    dataset = spec.load(run.root, split, run.transform())

    def compute() -> dict[str, torch.Tensor]:
        x, y = image_features(
            run.model,
            dataset,
            device=o.device,
            batch_size=o.batch_size,
            workers=o.workers,
            normalize=joint,
            precision=run.precision,
            desc=f"linear-probe {split} images",
        )
        return {"features": x, "labels": y}

    if o.cache is None:
        return compute(), dataset.classes
    description = {
        "kind": "linear_features" if not joint else "linear_joint_features",
        "image_weights": run.image_fingerprint() if not joint else run.image_joint_fingerprint(),
        "preprocess": run.preprocess_key(),
        "data": str(spec.split_path(run.root, split).resolve()),
        "split": split,
        "size": len(dataset),
        "classes": dataset.classes,
        "precision": run.precision.value,
    }
    return o.cache.get_or_compute(description, compute), dataset.classes


def _linear(run: _Run) -> list[DatasetScore]:
    o = run.options
    if o.linear_features not in LINEAR_FEATURES:
        raise UsageError(f"linear-probe features {o.linear_features!r}: valid: {', '.join(LINEAR_FEATURES)}")
    protocol = LINEAR_PROTOCOL_RUNNERS.get(o.linear_protocol)
    scores = []
    for spec in run.classification(with_train=True):
        started = time.time()
        train, train_classes = _linear_features(run, spec, spec.train_split)
        test, classes = _linear_features(run, spec, spec.test_split)
        if train_classes != classes:  # labels are positions in these lists: they must be the same list
            only = sorted(set(train_classes) ^ set(classes))
            raise UsageError(
                f"{spec.name}: its {spec.train_split} and {spec.test_split} splits have different class folders "
                f"({', '.join(only[:3]) or 'in another order'}); give both the same classes"
            )
        result = protocol(train["features"], train["labels"], test["features"], test["labels"], run)
        intervals, per_class = classification_extras(result.test_logits, test["labels"])
        images = len(train["labels"]) + len(test["labels"])
        seconds = time.time() - started
        scores.append(
            DatasetScore(
                spec.name,
                result.metrics,
                spec.clip_benchmark_name,
                seconds,
                images,
                names=linear_names(o.linear_protocol, o.linear_features),
                intervals=intervals,
                per_class=per_class,
                class_names=list(classes),
                extra={**result.settings, "normalized": o.linear_features == "joint"},
            )
        )
    return scores


def _clip_benchmark_protocol(train_x, train_y, test_x, test_y, run: _Run) -> ProbeResult:
    o = run.options
    return clip_benchmark_linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        val_proportion=o.linear_val_proportion,
        precision=run.precision,
        device=o.device,
    )


def _cv_protocol(train_x, train_y, test_x, test_y, run: _Run) -> ProbeResult:
    return cv_linear_probe(
        train_x, train_y, test_x, test_y, solver=run.options.linear_solver, device=run.options.device
    )


LINEAR_PROTOCOL_RUNNERS: Registry[Callable[..., ProbeResult]] = Registry("linear-probe protocol")
LINEAR_PROTOCOL_RUNNERS.register("clip_benchmark")(_clip_benchmark_protocol)
LINEAR_PROTOCOL_RUNNERS.register("cv")(_cv_protocol)


def _retrieval(run: _Run) -> list[DatasetScore]:
    scores = []
    for spec in run.captioned():
        started = time.time()
        images, texts, caption_image = run.captioned_features(spec)
        image_hits, text_hits = retrieval.retrieval_hits(images, texts, caption_image)
        scores.append(
            DatasetScore(
                spec.name,
                retrieval.recall_metrics(image_hits, text_hits),
                spec.clip_benchmark_name,
                time.time() - started,
                len(images),
                intervals=bootstrap_recall_intervals(image_hits, text_hits, caption_image),
            )
        )
    return scores


def _analysis(run: _Run) -> list[DatasetScore]:
    scores = []
    for spec in run.captioned():
        started = time.time()
        images, texts, caption_image = run.captioned_features(spec)
        metrics = analysis.analyze(images, texts, caption_image, n_clusters=run.options.analysis_clusters)
        scores.append(DatasetScore(spec.name, metrics, spec.clip_benchmark_name, time.time() - started, len(images)))
    return scores


def _diagnostics(run: _Run) -> list[DatasetScore]:
    o = run.options
    scores = []
    for spec in run.captioned():
        started = time.time()
        dataset = spec.load(run.root, run.transform())
        data_key = f"{(run.root / spec.annotations).resolve()} {run.preprocess_key()}"
        metrics = diagnostics.evaluate(
            run.model,
            dataset,
            device=o.device,
            batch_size=o.batch_size,
            workers=o.workers,
            sample=o.diagnostics_sample,
            cache=o.cache,
            data_key=data_key,
            precision=run.precision,
        )
        images = min(len(dataset), o.diagnostics_sample)
        scores.append(DatasetScore(spec.name, metrics, spec.clip_benchmark_name, time.time() - started, images))
    return scores


def _sts(run: _Run) -> list[DatasetScore]:
    o = run.options
    started = time.time()
    metrics = sts.evaluate(
        run.model, run.root / "sts", device=o.device, batch_size=o.batch_size, precision=run.precision
    )
    by_task: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, metric = key.split("/", 1)
        by_task.setdefault(name, {})[metric] = value
    log.info("sts: %d tasks in %.1f s", len(by_task), time.time() - started)
    return [DatasetScore(name, values, name) for name, values in by_task.items()]


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task: its runner, the data it needs under the root, and CLIP_benchmark's name for it."""

    name: str
    run: Callable[[_Run], list[DatasetScore]]
    needs: Needs
    clip_benchmark_task: str


_TASK_LIST = (  # in the order they run and are printed
    EvalTask("zeroshot", _zeroshot, Needs.CLASSIFICATION, "zeroshot_classification"),
    EvalTask("linear", _linear, Needs.LABELLED_TRAIN, "linear_probe"),
    EvalTask("retrieval", _retrieval, Needs.CAPTIONS, "zeroshot_retrieval"),
    EvalTask("sts", _sts, Needs.STS, "sts"),
    EvalTask("analysis", _analysis, Needs.CAPTIONS, "feature_analysis"),
    EvalTask("diagnostics", _diagnostics, Needs.CAPTIONS, "representation_diagnostics"),
)
IMAGE_TASKS = frozenset({"zeroshot", "linear", "retrieval", "analysis"})  # the diagnostics run with any of these
TASKS: Registry[EvalTask] = Registry("evaluation task")
for _task in _TASK_LIST:
    TASKS.register(_task.name)(_task)
TASK_NAMES: tuple[str, ...] = tuple(task.name for task in _TASK_LIST)


def run_suite(
    model: torch.nn.Module, root: Path, *, tasks: list[str] | None = None, options: EvalOptions | None = None
) -> SuiteResult:
    """Run `tasks` (default: all) on the datasets under `root`; tasks without data are skipped, not failed."""
    options = options or EvalOptions()
    root = Path(root)
    chosen = list(tasks or TASK_NAMES)
    for name in chosen:
        TASKS.get(name)  # an unknown name is an error that lists the valid ones
    LINEAR_PROTOCOL_RUNNERS.get(options.linear_protocol)
    precision = options.precision
    if options.diagnostics_sample > 0 and IMAGE_TASKS.intersection(chosen) and "diagnostics" not in chosen:
        chosen.append("diagnostics")  # at every evaluation
    teacher = diagnostics.teacher_side(model)
    run = _Run(model, root, select(root, options.datasets), options, precision)
    result = SuiteResult(precision=precision.value)
    for task in _TASK_LIST:
        if task.name not in chosen:
            continue
        reason = run.missing(task.needs)
        if reason:
            result.skipped[task.name] = reason
            log.info("%s: skipped (%s)", task.name, reason)
            continue
        for score in task.run(run):
            if score.seconds:
                rate = f", {score.images / score.seconds:.0f} images/s" if score.images else ""
                log.info("%s %s: %.1f s%s", task.name, score.dataset, score.seconds, rate)
            for message in diagnostics.collapse_warnings(
                f"{task.name}/{score.dataset}", score.metrics, teacher=teacher
            ):
                log.warning(message)
            name, file_task, prefix = score.names or (task.name, task.clip_benchmark_task, "")
            result.results.append(
                TaskResult(
                    name,
                    score.dataset,
                    score.metrics,
                    file_task,
                    score.clip_benchmark_name,
                    score.seconds,
                    score.images,
                    prefix=prefix,
                    intervals=score.intervals,
                    per_class=score.per_class,
                    class_names=score.class_names,
                    precision=precision.value,
                    extra=score.extra,
                )
            )
    return result
