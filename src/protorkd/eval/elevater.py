"""ELEVATER image classification: zero-shot and (few-shot) linear probe, each dataset with its official metric.

The metrics (accuracy, mean-per-class, roc_auc, 11point_mAP) are in `eval.elevater_metrics`. Zero-shot
scores are softmax(100 * image features @ class embeddings), class embeddings built by
`zeroshot.build_zeroshot_classifier`. The linear probe fits the project's L-BFGS logistic regression
(softmax; one-vs-rest sigmoid for multi-label) on standardised image-tower features, chooses the L2
strength with `linear_probe.sweep_l2` on a class-balanced 20% validation split of train by the dataset's
own metric, refits on all of train and scores test once. Few-shot: `num_shots` images per class per seed
(`sample_few_shot`).
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
from PIL import Image
from torch.utils.data import Dataset

from protorkd.errors import UsageError
from protorkd.eval.datasets import UnreadableImage
from protorkd.eval.elevater_format import ElevaterSplit, sample_few_shot
from protorkd.eval.elevater_metrics import METRICS, accuracy, extra_metrics
from protorkd.eval.features import image_features
from protorkd.eval.linear_probe import (
    DEFAULT_L2_GRID,
    Fit,
    L2Choice,
    LogisticRegressionProblem,
    Params,
    fit_one_vs_rest,
    standardize,
    sweep_l2,
)
from protorkd.eval.zeroshot import build_zeroshot_classifier

log = logging.getLogger(__name__)
Transform = Callable[[Image.Image], torch.Tensor]

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
    model: torch.nn.Module,
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

    train_features [N, D], train_targets [N] or multi-hot [N, C]. The grid is walked by `sweep_l2` (strong
    to weak, warm-started, no refinement). Returns (scores on CPU, {"l2", "val_score"}).
    """
    x_train, x_test = standardize(train_features.float().to(device), test_features.float().to(device))
    y_train = train_targets.to(device).float() if multilabel else train_targets.to(device).long()
    score_of = METRICS.get(metric)

    def solve(x: torch.Tensor, y: torch.Tensor) -> Fit:
        if multilabel:
            return lambda l2, init=None: fit_one_vs_rest(x, y, l2, init=init)
        return LogisticRegressionProblem(x, y, num_classes).fit

    def probabilities(x: torch.Tensor, params: Params) -> torch.Tensor:
        logits = x @ params[0].T + params[1]
        return (logits.sigmoid() if multilabel else logits.softmax(dim=1)).cpu()

    def validation_score(scores: torch.Tensor, targets: torch.Tensor) -> float:
        try:
            value = score_of(scores, targets)
        except ValueError:  # e.g. ROC-AUC on a validation split holding a single class
            value = float("nan")
        return accuracy(scores, targets) if math.isnan(value) and not multilabel else value

    fit_idx, val_idx = validation_split(train_targets.cpu(), fraction=val_fraction, seed=seed)
    # one training image per class leaves nothing to validate on: the strongest L2 of the grid
    choice = L2Choice(max(l2_grid), None, -math.inf)
    if val_idx:
        x_val, y_val = x_train[val_idx], train_targets[val_idx].cpu()
        choice = sweep_l2(
            solve(x_train[fit_idx], y_train[fit_idx]),
            lambda params: validation_score(probabilities(x_val, params), y_val),
            l2_grid,
        )
    params = solve(x_train, y_train)(choice.l2, choice.params)
    val_score = choice.score if math.isfinite(choice.score) else float("nan")
    return probabilities(x_test, params), {"l2": choice.l2, "val_score": val_score}


def evaluate_linear_probe(
    model: torch.nn.Module,
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
) -> dict[str, float]:
    """Linear-probe metrics, averaged over `seeds` (few-shot subsets, and validation splits); features are
    extracted and the probe is fitted on `device`.

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
            device=device,
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
