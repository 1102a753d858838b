"""ELEVATER image classification: zero-shot and (few-shot) linear probe, each dataset with its official metric.

Metrics (all in %), as the ELEVATER toolkit computes them from a score matrix [N, C]:
- accuracy: top-1;
- mean-per-class: the mean over the classes present in the test set of each class's top-1 recall
  (caltech101, fgvc-aircraft, oxford-flowers, oxford-pets);
- roc_auc: ROC-AUC of the class-1 score (hateful-memes, a binary task);
- 11point_mAP: per class, the precision interpolated at recall 0, 0.1, ..., 1 (the best precision at any
  operating point with at least that recall, sklearn's precision-recall curve with its (recall 0,
  precision 1) end point included, as vision-evaluation does), averaged over the 11 points, then over the
  classes that have a positive test image (voc2007, multi-label).

Zero-shot scores are softmax(100 * image features @ class embeddings), class embeddings built by
`zeroshot.build_zeroshot_classifier`. The linear probe fits the project's L-BFGS logistic regression
(softmax; one-vs-rest sigmoid for multi-label) on standardised image-tower features, chooses the L2
strength on a class-balanced 20% validation split of train by the dataset's own metric, refits on all of
train and scores test once. Few-shot: `num_shots` images per class per seed (`sample_few_shot`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from protorkd.errors import UsageError
from protorkd.eval.datasets import UnreadableImage
from protorkd.eval.elevater_format import ElevaterSplit, sample_few_shot
from protorkd.eval.features import image_features
from protorkd.eval.linear_probe import DEFAULT_L2_GRID, fit_logistic_regression, standardize
from protorkd.eval.zeroshot import build_zeroshot_classifier
from protorkd.registry import Registry

log = logging.getLogger(__name__)
Transform = Callable[[Image.Image], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]

# ---------------------------------------------------------------------------------------------- metrics

METRICS: Registry[MetricFn] = Registry("ELEVATER metric")


@METRICS.register("accuracy")
def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores [N, C], labels [N] -> top-1 accuracy in %."""
    return 100.0 * (scores.argmax(dim=1) == labels).double().mean().item()


@METRICS.register("mean-per-class")
def mean_per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores [N, C], labels [N] -> mean over the classes present in `labels` of their top-1 recall, in %."""
    correct = (scores.argmax(dim=1) == labels).double()
    recalls = [correct[labels == c].mean().item() for c in labels.unique().tolist()]
    return 100.0 * float(np.mean(recalls))


@METRICS.register("roc_auc")
def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores [N, 2], labels [N] in {0, 1} -> ROC-AUC of the class-1 score, in %."""
    from sklearn.metrics import roc_auc_score

    if scores.shape[1] != 2:
        raise ValueError(f"roc_auc needs a binary task; got {scores.shape[1]} classes")
    return 100.0 * float(roc_auc_score(labels.numpy(), scores[:, 1].double().numpy()))


@METRICS.register("11point_mAP")
def map_11_point(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """scores [N, C], multi-hot targets [N, C] -> 11-point interpolated mAP in % (see the module docstring)."""
    from sklearn.metrics import precision_recall_curve

    points = np.linspace(0.0, 1.0, 11)
    per_class = []
    for c in range(targets.shape[1]):
        positives = targets[:, c].numpy() > 0
        if not positives.any():
            continue
        precision, recall, _ = precision_recall_curve(positives, scores[:, c].double().numpy())
        per_class.append(np.mean([precision[recall >= t].max() for t in points]))
    return 100.0 * float(np.mean(per_class)) if per_class else float("nan")


def extra_metrics(scores: torch.Tensor, labels: torch.Tensor, *, multilabel: bool) -> dict[str, float]:
    """Every metric that applies to the task (the official one is reported as `score` besides)."""
    if multilabel:
        return {"map_11pt": map_11_point(scores, labels)}
    metrics = {"top1": accuracy(scores, labels), "mean_per_class_recall": mean_per_class_accuracy(scores, labels)}
    if scores.shape[1] == 2 and labels.unique().numel() == 2:
        metrics["roc_auc"] = roc_auc(scores, labels)
    return metrics


# ---------------------------------------------------------------------------------------------- images


class ElevaterImages(Dataset):
    """Images of a split (optionally a subset) -> (image tensor, label [] or multi-hot [C] float).

    Zip files are opened lazily once per process (DataLoader workers each open their own handle). An image
    that cannot be read yields `UnreadableImage`, so feature extraction stops with a message naming it.
    """

    def __init__(self, split: ElevaterSplit, transform: Transform, indices: list[int] | None = None) -> None:
        self.split = split
        self.transform = transform
        self.indices = list(range(len(split))) if indices is None else list(indices)
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zips": {}}

    def _open(self, location: str):
        if "@" not in location:
            return open(self.split.folder / location, "rb")
        if self._pid != os.getpid():  # a forked worker must not share the parent's file handles
            self._zips, self._pid = {}, os.getpid()
        zip_name, member = location.split("@", 1)
        if zip_name not in self._zips:
            self._zips[zip_name] = zipfile.ZipFile(self.split.folder / zip_name)
        return self._zips[zip_name].open(member)

    def __getitem__(self, position: int) -> tuple[torch.Tensor | UnreadableImage, int | torch.Tensor]:
        index = self.indices[position]
        location = self.split.locations[index]
        try:
            with self._open(location) as handle, Image.open(handle) as image:
                image.load()
                tensor = self.transform(image)
        except Exception as error:  # missing member, truncated or corrupt image
            return UnreadableImage(f"{self.split.folder / location}", f"{type(error).__name__}: {error}"), 0
        return tensor, target_of(self.split, index)


def target_of(split: ElevaterSplit, index: int) -> int | torch.Tensor:
    """The label of image `index` (multi-class), or its multi-hot target [C] (multi-label)."""
    labels = split.labels[index]
    if not split.multilabel:
        return labels[0]
    target = torch.zeros(len(split.classnames))
    target[list(labels)] = 1.0
    return target


def targets_of(split: ElevaterSplit, indices: list[int] | None = None) -> torch.Tensor:
    """Labels [N] (multi-class) or multi-hot targets [N, C] (multi-label), read from the index only."""
    targets = [target_of(split, i) for i in (range(len(split)) if indices is None else indices)]
    return torch.stack(targets) if split.multilabel else torch.tensor(targets, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- zero-shot


def zeroshot_scores(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Normalised image features [N, D] x class embeddings [D, C] -> softmax(100 * cosine) [N, C] (ELEVATER's)."""
    return (100.0 * image_features.float() @ classifier.float()).softmax(dim=1)


def evaluate_zeroshot(
    model,
    test: ElevaterSplit,
    *,
    classnames: list[str | list[str]],
    templates: list[str],
    metric: str,
    transform: Transform,
    device: torch.device | str,
    batch_size: int = 256,
    workers: int = 0,
) -> dict[str, float]:
    """Zero-shot metrics of `model` on a test split: {"score" (the official metric), top1 | map_11pt, ...}."""
    if len(classnames) != len(test.classnames):
        raise UsageError(f"{test.name}: {len(classnames)} class names for {len(test.classnames)} classes")
    classifier = build_zeroshot_classifier(model, classnames, templates, device=device, batch_size=batch_size)
    features, _ = image_features(
        model,
        ElevaterImages(test, transform),
        device=device,
        batch_size=batch_size,
        workers=workers,
        desc=f"{test.name} test images",
    )
    scores = zeroshot_scores(features, classifier.cpu())
    labels = targets_of(test)
    return {"score": METRICS.get(metric)(scores, labels), **extra_metrics(scores, labels, multilabel=test.multilabel)}


# ---------------------------------------------------------------------------------------------- linear probe


def fit_one_vs_rest(
    features: torch.Tensor,
    targets: torch.Tensor,
    l2: float,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 150,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C independent sigmoid classifiers in one L-BFGS run: features [N, D], multi-hot targets [N, C] ->
    (weight [C, D], bias [C]) minimising the per-image sum of binary cross-entropies + l2/2 * ||W||^2."""
    if init is None:
        weight = torch.zeros(targets.shape[1], features.shape[1], dtype=features.dtype, device=features.device)
        bias = torch.zeros(targets.shape[1], dtype=features.dtype, device=features.device)
    else:
        weight, bias = (t.detach().clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.addmm(bias, features, weight.T)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(features)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def validation_split(targets: torch.Tensor, *, fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit indices, validation indices) of the training set.

    Multi-class targets [N]: per class, ceil(fraction * count) random images go to validation (ELEVATER's
    class-balanced split), but never a class's only image. Multi-label targets [N, C]: a random `fraction`.
    """
    rng = random.Random(seed)
    if targets.dim() == 2:
        order = list(range(len(targets)))
        rng.shuffle(order)
        n_val = min(len(order) - 1, max(1, math.ceil(fraction * len(order))))
        return sorted(order[n_val:]), sorted(order[:n_val])
    fit, val = [], []
    for c in sorted(targets.unique().tolist()):
        members = (targets == c).nonzero().flatten().tolist()
        rng.shuffle(members)
        n_val = min(len(members) - 1, math.ceil(fraction * len(members)))
        val += members[:n_val]
        fit += members[n_val:]
    return sorted(fit), sorted(val)


def probe_scores(
    train_features: torch.Tensor,
    train_targets: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    metric: str,
    multilabel: bool,
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Test probabilities [M, C] of the classifier whose L2 strength scored best (by `metric`) on validation.

    train_features [N, D], train_targets [N] or multi-hot [N, C]. The grid is walked from strong to weak
    L2, each fit warm-started from the previous one. Returns (scores on CPU, {"l2", "val_score"}).
    """
    x_train, x_test = standardize(train_features.float().to(device), test_features.float().to(device))
    y_train = train_targets.to(device).float() if multilabel else train_targets.to(device).long()
    score_of = METRICS.get(metric)

    def fit(x, y, l2, init=None):
        if multilabel:
            return fit_one_vs_rest(x, y, l2, init=init)
        return fit_logistic_regression(x, y, num_classes, l2, init=init)

    def probabilities(x, params):
        logits = x @ params[0].T + params[1]
        return (logits.sigmoid() if multilabel else logits.softmax(dim=1)).cpu()

    def validation_score(scores, targets) -> float:
        try:
            value = score_of(scores, targets)
        except ValueError:  # e.g. ROC-AUC on a validation split holding a single class
            value = float("nan")
        return accuracy(scores, targets) if math.isnan(value) and not multilabel else value

    fit_idx, val_idx = validation_split(train_targets.cpu(), fraction=val_fraction, seed=seed)
    best_l2, best_score, best_params, params = max(l2_grid), -math.inf, None, None
    if val_idx:
        for l2 in sorted(l2_grid, reverse=True):
            params = fit(x_train[fit_idx], y_train[fit_idx], l2, params)
            score = validation_score(probabilities(x_train[val_idx], params), train_targets[val_idx].cpu())
            if score > best_score:
                best_l2, best_score, best_params = l2, score, params
    # else one training image per class: nothing to validate on, so the strongest L2 of the grid
    params = fit(x_train, y_train, best_l2, best_params)
    val_score = best_score if math.isfinite(best_score) else float("nan")
    return probabilities(x_test, params), {"l2": best_l2, "val_score": val_score}


def evaluate_linear_probe(
    model,
    train: ElevaterSplit,
    test: ElevaterSplit,
    *,
    metric: str,
    transform: Transform,
    device: torch.device | str,
    num_shots: int = -1,
    seeds: tuple[int, ...] = (0,),
    batch_size: int = 256,
    workers: int = 0,
    probe_device: torch.device | str | None = None,
) -> dict[str, float]:
    """Linear-probe metrics, averaged over `seeds` (few-shot subsets, and validation splits).

    Returns {"score", "score_std", <extra metrics averaged>, "seed<k>/score", "seed<k>/l2", "train_images"}.
    Image features of the images any seed uses are extracted once.
    """
    if len(train.classnames) != len(test.classnames):
        raise UsageError(f"{train.name}: train has {len(train.classnames)} classes, test {len(test.classnames)}")
    subsets = {
        seed: (
            sample_few_shot(train.labels, len(train.classnames), num_shots, seed)
            if num_shots > 0
            else list(range(len(train)))
        )
        for seed in seeds
    }
    used = sorted(set().union(*subsets.values()))
    row_of = {index: row for row, index in enumerate(used)}
    train_features, _ = image_features(
        model,
        ElevaterImages(train, transform, used),
        device=device,
        batch_size=batch_size,
        workers=workers,
        normalize=False,
        desc=f"{train.name} train images",
    )
    test_features, _ = image_features(
        model,
        ElevaterImages(test, transform),
        device=device,
        batch_size=batch_size,
        workers=workers,
        normalize=False,
        desc=f"{test.name} test images",
    )
    test_targets = targets_of(test)
    if probe_device is None:
        probe_device = "cuda" if torch.cuda.is_available() else "cpu"
    per_seed: list[dict[str, float]] = []
    for seed, subset in subsets.items():
        rows = torch.tensor([row_of[i] for i in subset])
        scores, info = probe_scores(
            train_features[rows],
            targets_of(train, subset),
            test_features,
            num_classes=len(train.classnames),
            metric=metric,
            multilabel=train.multilabel,
            seed=seed,
            device=probe_device,
        )
        metrics = {
            "score": METRICS.get(metric)(scores, test_targets),
            **extra_metrics(scores, test_targets, multilabel=test.multilabel),
            **info,
            "train_images": float(len(subset)),
        }
        log.info(
            "%s seed %d: %s %.2f (l2 %.0e, %d training images)",
            test.name,
            seed,
            metric,
            metrics["score"],
            info["l2"],
            len(subset),
        )
        per_seed.append(metrics)
    summary = {key: float(np.mean([m[key] for m in per_seed])) for key in per_seed[0] if key not in ("l2",)}
    summary["score_std"] = float(np.std([m["score"] for m in per_seed]))
    for seed, metrics in zip(subsets, per_seed):
        summary[f"seed{seed}/score"] = metrics["score"]
        summary[f"seed{seed}/l2"] = metrics["l2"]
    return summary


def summary_rows(results: dict[str, dict[str, float]], metric_of: dict[str, str]) -> list[list[str]]:
    """CSV rows: header, one row per dataset (official score, std over seeds), then the average of the scores."""
    rows = [["dataset", "metric", "score", "std", "seeds"]]
    for name, metrics in results.items():
        seeds = sum(1 for key in metrics if key.startswith("seed") and key.endswith("/score")) or 1
        rows.append(
            [name, metric_of[name], f"{metrics['score']:.2f}", f"{metrics.get('score_std', 0.0):.2f}", str(seeds)]
        )
    if results:
        average = float(np.mean([m["score"] for m in results.values()]))
        rows.append(["Average", f"mean of {len(results)} datasets", f"{average:.2f}", "", ""])
    return rows


def results_folder(experiment: Path, mode: str, num_shots: int) -> Path:
    """`<experiment>/ELEVATER_evaluation/{zeroshot | linear_probe | <N>-shot}` (the original's layout)."""
    name = mode if mode == "zeroshot" or num_shots <= 0 else f"{num_shots}-shot"
    return Path(experiment) / "ELEVATER_evaluation" / name
