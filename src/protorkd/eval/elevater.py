"""ELEVATER image classification: zero-shot and (few-shot) linear probe, each dataset with its official metric.

The protocol is the ELEVATER toolkit's (Elevater_Toolkit_IC @ 00d0af7), read from its code:
- zero-shot: the toolkit's class names and templates (`prompts/elevater_prompts.json`, built from its
  `vision_benchmark/datasets/prompts.py`; a class given as synonyms uses the first, as the toolkit does),
  class embeddings by `zeroshot.build_zeroshot_classifier`, scores softmax(100 * cosine);
- linear probe: image features (normalised joint features by default, `features="backbone"` for the
  tower's), standardised with train statistics; the validation split is the toolkit's (`validation_split`:
  the first ceil(20%) of each class in dataset order, a greedy pass for multi-label); the L2 strength is
  searched with the toolkit's coarse-to-fine sweep (97 values in [1e-6, 1e6], `linear_probe.ELEVATER_GRID`)
  by the dataset's own metric on that split, then refitted on all of train and scored once on test.
  Multi-class: softmax logistic regression; multi-label (voc2007): one sigmoid classifier per class
  (the toolkit's BCE loss), scored, like the toolkit, on the softmax of the logits;
- few-shot: `num_shots` images per class per seed (`elevater_format.sample_few_shot`).
The metrics (accuracy, mean-per-class, roc_auc, 11point_mAP) are in `eval.elevater_metrics`. Deviations
from the toolkit (its SGD-trained head, its test-set epoch selection) are listed in docs/elevater.md.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections import Counter
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
from protorkd.eval.linear_probe import ELEVATER_GRID, L2Choice, L2Grid, WarmStarts, sweep_l2
from protorkd.eval.logistic import LogisticRegressionProblem, Params, fit_one_vs_rest, standardize
from protorkd.eval.zeroshot import build_zeroshot_classifier, packaged_prompts

log = logging.getLogger(__name__)
Transform = Callable[[Image.Image], torch.Tensor]
ELEVATER_PROMPTS_FILE = "elevater_prompts.json"  # in protorkd/eval/prompts/ (SOURCE.md there)
VAL_SPLIT = 0.2  # the toolkit's `val_split` in `construct_dataloader`

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


def toolkit_prompts(hub_name: str, n_classes: int) -> tuple[list[str], list[str]]:
    """(class names, templates) the toolkit uses for a dataset: its `class_map` entry with each synonym list
    reduced to its first name, and its `template_map` entry (default "a photo of a {}", its fallback)."""
    entry = packaged_prompts(ELEVATER_PROMPTS_FILE).get(hub_name)
    if entry is None:
        raise UsageError(f"no ELEVATER toolkit prompts for {hub_name!r}; give --zeroshot-metadata")
    classnames = [name[0] if isinstance(name, list) else name for name in entry["classes"]]
    if len(classnames) != n_classes:
        raise UsageError(
            f"the toolkit lists {len(classnames)} classes for {hub_name} but the dataset has {n_classes}; "
            "give --zeroshot-metadata with names in the dataset's label order"
        )
    return classnames, list(entry.get("templates") or ["a photo of a {}"])


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


def validation_split(targets: torch.Tensor, *, fraction: float = VAL_SPLIT) -> tuple[list[int], list[int]]:
    """(fit indices, validation indices) of a training set: the toolkit's split (`get_dataloader` in its
    `evaluation/feature.py`), deterministic.

    Multi-class targets [N]: per class, its first ceil(fraction * count) images in dataset order (a class
    with one image gives it to validation, as in the toolkit). Multi-label targets [N, C]: while some class
    still needs validation images (ceil of fraction * its count), the first remaining image of the lowest
    such class goes to validation and counts for each of its classes.
    """
    if targets.dim() == 1:
        labels = targets.tolist()
        val = []
        for label, count in Counter(labels).items():
            members = [i for i, x in enumerate(labels) if x == label]
            val += members[: math.ceil(count * fraction)]
    else:
        labels = targets.cpu().numpy().astype(np.float64).copy()
        needed = np.ceil(np.sum(labels, axis=0) * fraction)
        val = []
        while (needed > 0).any():
            target_class = np.where(needed > 0)[0][0]
            sample = int(np.where(labels[:, target_class] > 0)[0][0])
            val.append(sample)
            needed -= labels[sample]
            labels[sample] = 0
    chosen = set(val)
    return [i for i in range(len(targets)) if i not in chosen], sorted(chosen)


def probe_scores(
    train_features: torch.Tensor,
    train_targets: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    metric: str,
    multilabel: bool,
    grid: L2Grid = ELEVATER_GRID,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Test scores [M, C] (softmax of the logits) of the classifier whose L2 strength scored best (by
    `metric`) on the toolkit's validation split, refitted on all of train.

    train_features [N, D] in the order of the toolkit's training manifest, train_targets [N] or multi-hot
    [N, C]. Returns (scores on CPU, {"l2", "val_score"}).
    """
    x_train, x_test = standardize(train_features.float().to(device), test_features.float().to(device))
    y_train = train_targets.to(device).float() if multilabel else train_targets.to(device).long()
    score_of = METRICS.get(metric)

    def solve(x: torch.Tensor, y: torch.Tensor) -> WarmStarts:
        if multilabel:
            return WarmStarts(lambda l2, init=None: fit_one_vs_rest(x, y, l2, init=init))
        return WarmStarts(LogisticRegressionProblem(x, y, num_classes).fit)

    def probabilities(x: torch.Tensor, params: Params) -> torch.Tensor:
        return (x @ params[0].T + params[1]).softmax(dim=1).cpu()  # the toolkit's `validate`: softmax, always

    def validation_score(scores: torch.Tensor, targets: torch.Tensor) -> float:
        try:
            value = score_of(scores, targets)
        except ValueError:  # e.g. ROC-AUC on a validation split holding a single class
            value = float("nan")
        return accuracy(scores, targets) if math.isnan(value) and not multilabel else value

    fit_idx, val_idx = validation_split(train_targets.cpu())
    choice = L2Choice(len(grid.values) - 1, grid.values[-1], -math.inf)
    fits = None
    if val_idx and fit_idx:
        x_val, y_val = x_train[val_idx], train_targets[val_idx].cpu()
        fits = solve(x_train[fit_idx], y_train[fit_idx])
        choice = sweep_l2(lambda l2: validation_score(probabilities(x_val, fits(l2)), y_val), grid)
    init = fits.done.get(choice.l2) if fits is not None else None
    params = solve(x_train, y_train).fit(choice.l2, init)
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
    features: str = "joint",
    batch_size: int = 256,
    workers: int = 0,
) -> dict[str, float]:
    """Linear-probe metrics, averaged over `seeds` (each seed draws a few-shot subset; the validation split
    follows from the subset's order); features are extracted and the probe is fitted on `device`.

    `features`: "joint" (normalised `encode_image`, what the toolkit's CLIP models feed its linear head) or
    "backbone" (the image tower's output). Returns {"score", "score_std", <extra metrics averaged>,
    "seed<k>/score", "seed<k>/l2", "train_images"}. Features of the images any seed uses are extracted once.
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
        normalize=features == "joint",
        desc=f"{train.name} train images",
    )
    test_features, _ = image_features(
        model,
        ElevaterImages(test, transform),
        device=device,
        batch_size=batch_size,
        workers=workers,
        normalize=features == "joint",
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
