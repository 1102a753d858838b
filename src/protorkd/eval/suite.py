"""The evaluation suite: each task finds its datasets under the data root and runs its `evaluate`.

Used by `protorkd eval` (`run_suite`) and by the training loop (`evaluate_during_training`), so both
report the same numbers. Metric keys are flat `task/dataset/metric`: `zeroshot/cifar10/top1`,
`linear/cifar10/top1`, `retrieval/coco2017/image_to_text_R@5`, `sts/STSB/spearman`,
`analysis/coco2017/modality_gap`. A task whose data is absent is skipped, with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from protorkd.data.transforms import image_transform
from protorkd.errors import UsageError
from protorkd.eval import analysis, retrieval, sts, zeroshot
from protorkd.eval.catalog import ClassificationSpec, RetrievalSpec, select
from protorkd.eval.features import FeatureCache, image_features, weights_fingerprint
from protorkd.eval.linear_probe import linear_probe
from protorkd.registry import Registry

log = logging.getLogger(__name__)
TASK_NAMES = ("zeroshot", "linear", "retrieval", "sts", "analysis")
METADATA_FILE = "zeroshot_metadata.json"  # a data root's own class names / templates (the demo writes one)


@dataclass
class EvalOptions:
    device: torch.device | str = "cpu"
    batch_size: int = 256
    workers: int = 0
    datasets: list[str] | None = None  # None: every dataset present
    zeroshot_metadata: Path | None = None
    linear_solver: str = "torch"
    analysis_clusters: int = 10
    cache: FeatureCache | None = None


@dataclass
class TaskResult:
    task: str
    dataset: str
    metrics: dict[str, float]
    clip_benchmark_name: str = ""
    seconds: float = 0.0
    images: int = 0


@dataclass
class SuiteResult:
    results: list[TaskResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why

    @property
    def metrics(self) -> dict[str, float]:
        return {f"{r.task}/{r.dataset}/{key}": value for r in self.results for key, value in r.metrics.items()}


@dataclass
class _Run:
    """What one suite run shares between tasks: data root, datasets present, options, memoised features."""

    model: torch.nn.Module
    root: Path
    specs: list
    options: EvalOptions
    memo: dict = field(default_factory=dict)

    def transform(self):
        p = self.model.image_preprocess
        return image_transform(p.image_size, p.mean, p.std, train=False, interpolation=p.interpolation)

    def preprocess_key(self) -> list:
        p = self.model.image_preprocess
        return [p.image_size, list(p.mean), list(p.std), p.interpolation]

    def image_fingerprint(self) -> str:
        if "image_fingerprint" not in self.memo:
            self.memo["image_fingerprint"] = weights_fingerprint(self.model.image_tower)
        return self.memo["image_fingerprint"]

    def classification(self, *, with_train: bool = False) -> list[ClassificationSpec]:
        return [
            s
            for s in self.specs
            if isinstance(s, ClassificationSpec) and (not with_train or s.has_split(self.root, s.train_split))
        ]

    def captioned(self) -> list[RetrievalSpec]:
        return [s for s in self.specs if isinstance(s, RetrievalSpec)]

    def captioned_features(self, spec: RetrievalSpec):
        """(image features, caption features, caption_image) of a retrieval dataset, encoded once per run."""
        key = ("captioned", spec.name)
        if key not in self.memo:
            dataset = spec.load(self.root, self.transform())
            o = self.options
            images, texts = retrieval.encode_captioned_images(
                self.model, dataset, device=o.device, batch_size=o.batch_size, workers=o.workers
            )
            self.memo[key] = (images, texts, dataset.caption_image)
        return self.memo[key]


TASKS: Registry = Registry("evaluation task")
TaskRunner = Callable[[_Run], list[TaskResult]]


@TASKS.register("zeroshot")
def _zeroshot(run: _Run) -> list[TaskResult]:
    o = run.options
    metadata_files = [p for p in (o.zeroshot_metadata, run.root / METADATA_FILE) if p is not None and Path(p).exists()]
    if o.zeroshot_metadata is not None and not Path(o.zeroshot_metadata).exists():
        raise UsageError(f"--zeroshot-metadata {o.zeroshot_metadata}: no such file")
    results = []
    for spec in run.classification():
        started = time.time()
        dataset = spec.load(run.root, spec.test_split, run.transform())
        if dataset.empty_classes:
            log.warning(
                "%s: %d empty class folders dropped with their class names: %s",
                spec.name,
                len(dataset.empty_classes),
                ", ".join(dataset.empty_classes),
            )
        prompts = zeroshot.resolve_prompts(
            (*spec.prompt_names, spec.name), dataset.class_folders, dataset.classes, metadata_files=metadata_files
        )
        log.info(
            "zero-shot %s: %d classes, %d templates from %s",
            spec.name,
            len(prompts.classnames),
            len(prompts.templates),
            prompts.source,
        )
        metrics = zeroshot.evaluate(
            run.model,
            dataset,
            prompts,
            device=o.device,
            batch_size=o.batch_size,
            workers=o.workers,
            mean_per_class=spec.mean_per_class,
            cache=o.cache,
        )
        results.append(
            TaskResult("zeroshot", spec.name, metrics, spec.clip_benchmark_name, time.time() - started, len(dataset))
        )
    return results


@TASKS.register("linear")
def _linear(run: _Run) -> list[TaskResult]:
    o = run.options
    results = []
    for spec in run.classification(with_train=True):
        started = time.time()
        features = {}
        for split in (spec.train_split, spec.test_split):
            dataset = spec.load(run.root, split, run.transform())

            def compute(dataset=dataset, split=split) -> dict[str, torch.Tensor]:
                x, y = image_features(
                    run.model,
                    dataset,
                    device=o.device,
                    batch_size=o.batch_size,
                    workers=o.workers,
                    normalize=False,
                    desc=f"linear-probe {split} images",
                )
                return {"features": x, "labels": y}

            if o.cache is None:
                features[split] = compute()
            else:
                description = {
                    "kind": "linear_features",
                    "image_weights": run.image_fingerprint(),
                    "preprocess": run.preprocess_key(),
                    "data": str(spec.split_path(run.root, split).resolve()),
                    "split": split,
                    "size": len(dataset),
                    "classes": dataset.classes,
                }
                features[split] = o.cache.get_or_compute(description, compute)
        train, test = features[spec.train_split], features[spec.test_split]
        metrics = linear_probe(
            train["features"],
            train["labels"],
            test["features"],
            test["labels"],
            solver=o.linear_solver,
            mean_per_class=spec.mean_per_class,
        )
        results.append(
            TaskResult(
                "linear",
                spec.name,
                metrics,
                spec.clip_benchmark_name,
                time.time() - started,
                len(train["labels"]) + len(test["labels"]),
            )
        )
    return results


@TASKS.register("retrieval")
def _retrieval(run: _Run) -> list[TaskResult]:
    results = []
    for spec in run.captioned():
        started = time.time()
        images, texts, caption_image = run.captioned_features(spec)
        metrics = retrieval.retrieval_metrics(images, texts, caption_image)
        results.append(
            TaskResult("retrieval", spec.name, metrics, spec.clip_benchmark_name, time.time() - started, len(images))
        )
    return results


@TASKS.register("analysis")
def _analysis(run: _Run) -> list[TaskResult]:
    results = []
    for spec in run.captioned():
        started = time.time()
        images, texts, caption_image = run.captioned_features(spec)
        metrics = analysis.analyze(images, texts, caption_image, n_clusters=run.options.analysis_clusters)
        results.append(
            TaskResult("analysis", spec.name, metrics, spec.clip_benchmark_name, time.time() - started, len(images))
        )
    return results


@TASKS.register("sts")
def _sts(run: _Run) -> list[TaskResult]:
    o = run.options
    started = time.time()
    metrics = sts.evaluate(run.model, run.root / "sts", device=o.device, batch_size=o.batch_size)
    by_task: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, metric = key.split("/", 1)
        by_task.setdefault(name, {})[metric] = value
    log.info("sts: %d tasks in %.1f s", len(by_task), time.time() - started)
    return [TaskResult("sts", name, values, name) for name, values in by_task.items()]


def _missing_data(run: _Run, task: str) -> str | None:
    """Why `task` has nothing to run on, or None when it has data."""
    if task == "zeroshot" and not run.classification():
        return f"no classification dataset under {run.root} (ROOT/<name>/test/<class>/, see docs/data.md)"
    if task == "linear" and not run.classification(with_train=True):
        return f"no classification dataset with a train split under {run.root}"
    if task in ("retrieval", "analysis") and not run.captioned():
        return f"no captions file under {run.root} (coco2017/annotations/captions_val2017.json, ...)"
    if task == "sts" and not sts.present_tasks(run.root / "sts"):
        return f"no SentEval STS folders under {run.root / 'sts'}"
    return None


def run_suite(model, root: Path, *, tasks: list[str] | None = None, options: EvalOptions | None = None) -> SuiteResult:
    """Run `tasks` (default: all) on the datasets under `root`; tasks without data are skipped, not failed."""
    options = options or EvalOptions()
    root = Path(root)
    chosen = tasks or list(TASK_NAMES)
    for task in chosen:
        TASKS.get(task)  # an unknown name is an error that lists the valid ones
    run = _Run(model, root, select(root, options.datasets), options)
    result = SuiteResult()
    for task in TASK_NAMES:
        if task not in chosen:
            continue
        reason = _missing_data(run, task)
        if reason:
            result.skipped[task] = reason
            log.info("%s: skipped (%s)", task, reason)
            continue
        for record in TASKS.get(task)(run):
            if record.seconds:
                rate = f", {record.images / record.seconds:.0f} images/s" if record.images else ""
                log.info("%s %s: %.1f s%s", task, record.dataset, record.seconds, rate)
            result.results.append(record)
    return result


_TRAINING_CACHE = FeatureCache()  # zero-shot classifiers survive across epochs when the text side is frozen


def evaluate_during_training(
    model,
    root: Path | None,
    *,
    epoch: int,
    last_epoch: int,
    frequencies: dict[str, int],
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    zeroshot_metadata: Path | None = None,
    cache_dir: Path | None = None,
) -> dict[str, float]:
    """Run each task whose frequency divides `epoch` (or at the last epoch when the frequency is > 0).

    `frequencies` keys: zeroshot, linear, retrieval, sts, analysis (missing = 0 = never). Zero-shot
    classifiers are cached in memory, keyed by the text tower's weights; `cache_dir` also keeps
    linear-probe features on disk (worth it only when the image tower is locked).
    """
    if root is None:
        return {}
    due = [
        task
        for task in TASK_NAMES
        if frequencies.get(task, 0) > 0 and (epoch % frequencies[task] == 0 or epoch == last_epoch)
    ]
    if not due:
        return {}
    cache = _TRAINING_CACHE if cache_dir is None else FeatureCache(cache_dir)
    options = EvalOptions(
        device=device, batch_size=batch_size, workers=workers, zeroshot_metadata=zeroshot_metadata, cache=cache
    )
    return run_suite(model, Path(root), tasks=due, options=options).metrics
