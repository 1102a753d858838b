"""ELEVATER image classification: zero-shot and (few-shot) linear probe, each dataset with its official metric.

The protocol is the ELEVATER toolkit's (Elevater_Toolkit_IC @ 00d0af7), read from its code:
- zero-shot: the toolkit's class names and templates (`prompts/elevater_prompts.json`, built from its
  `vision_benchmark/datasets/prompts.py`; a class given as synonyms uses the first, as the toolkit does),
  class embeddings by `zeroshot.build_zeroshot_classifier`, scores softmax(100 * cosine);
- linear probe: image features (normalised joint features by default, `features="backbone"` for the
  tower's) of the (few-shot) training subset, then `elevater_probe`: the toolkit's validation split, search
  and final run, with its text-initialised SGD head (`probe="toolkit"`) or a converged L-BFGS solve
  (`probe="lbfgs"`), scored once on test;
- few-shot: `num_shots` images per class per seed (`elevater_format.sample_few_shot`), with the toolkit's
  1-shot rule (2 sampled, one for validation) and PatchCamelyon's 10,000-shot search subset.
The metrics (accuracy, mean-per-class, roc_auc, 11point_mAP) are in `eval.elevater_metrics`. Deviations
from the toolkit are listed in docs/elevater.md.
"""

from __future__ import annotations

import logging
import os
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
from protorkd.eval.elevater_metrics import METRICS, extra_metrics
from protorkd.eval.elevater_probe import ProbeData, lbfgs_probe, toolkit_probe
from protorkd.eval.features import image_features
from protorkd.eval.zeroshot import build_zeroshot_classifier, packaged_prompts
from protorkd.precision import Precision

log = logging.getLogger(__name__)
Transform = Callable[[Image.Image], torch.Tensor]
ELEVATER_PROMPTS_FILE = "elevater_prompts.json"  # in protorkd/eval/prompts/ (SOURCE.md there)

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
    precision: Precision = Precision.FP32,
) -> dict[str, float]:
    """Zero-shot metrics of `model` on a test split: {"score" (the official metric), top1 | map_11pt, ...}."""
    if len(classnames) != len(test.classnames):
        raise UsageError(f"{test.name}: {len(classnames)} class names for {len(test.classnames)} classes")
    classifier = build_zeroshot_classifier(
        model, classnames, templates, device=device, batch_size=batch_size, precision=precision
    )
    features, _ = image_features(
        model,
        ElevaterImages(test, transform),
        device=device,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        desc=f"{test.name} test images",
    )
    scores = zeroshot_scores(features, classifier.cpu())
    labels = targets_of(test)
    return {"score": METRICS.get(metric)(scores, labels), **extra_metrics(scores, labels, multilabel=test.multilabel)}


# ---------------------------------------------------------------------------------------------- linear probe

PROBES = ("toolkit", "lbfgs")  # --probe


def probe_subsets(
    labels: list[tuple[int, ...]], num_classes: int, num_shots: int, seed: int, *, full_search_shots: int | None
) -> tuple[list[int], list[int], bool]:
    """(search rows, final-run rows, whether the final run merges validation) of one seed, in the training
    manifest's order, as the toolkit's `commands/linear_probe.py` and `full_model_finetune` choose them:
    1 shot samples 2 per class and trains the final layer on the training half only; a dataset with
    `full_search_shots` (PatchCamelyon: 10,000) searches, with all shots, on a subset of that many per class
    and trains the final layer on the whole split."""
    everything = list(range(len(labels)))
    if num_shots == 1:
        subset = sample_few_shot(labels, num_classes, 2, seed)
        return subset, subset, False
    if num_shots > 0:
        subset = sample_few_shot(labels, num_classes, num_shots, seed)
        return subset, subset, True
    if full_search_shots is not None:
        return sample_few_shot(labels, num_classes, full_search_shots, seed), everything, True
    return everything, everything, True


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
    probe: str = "toolkit",
    text_prompts: tuple[list[str], list[str]] | None = None,
    full_search_shots: int | None = None,
    batch_size: int = 256,
    workers: int = 0,
    precision: Precision = Precision.FP32,
) -> dict[str, float]:
    """Linear-probe metrics, averaged over `seeds` (each seed draws a few-shot subset; the validation split
    follows from the subset's order); features are extracted and the probe is fitted on `device`.

    `features`: "joint" (normalised `encode_image`, what the toolkit's CLIP models feed its linear head) or
    "backbone" (the image tower's output). `probe`: "toolkit" (the toolkit's SGD head, initialised with the
    text embeddings of `text_prompts` = (class names, templates) when the features are joint) or "lbfgs".
    Returns {"score", "score_std", <extra metrics averaged>, "seed<k>/score", "seed<k>/l2", "train_images",
    ...}. Features of the images any seed uses are extracted once.
    """
    if len(train.classnames) != len(test.classnames):
        raise UsageError(f"{train.name}: train has {len(train.classnames)} classes, test {len(test.classnames)}")
    if probe not in PROBES:
        raise UsageError(f"ELEVATER probe {probe!r}: valid: {', '.join(PROBES)}")
    num_classes = len(train.classnames)
    subsets = {
        seed: probe_subsets(train.labels, num_classes, num_shots, seed, full_search_shots=full_search_shots)
        for seed in seeds
    }
    used = sorted(set().union(*(set(search) | set(final) for search, final, _ in subsets.values())))
    row_of = {index: row for row, index in enumerate(used)}

    def encode(split: ElevaterSplit, indices: list[int] | None, what: str) -> torch.Tensor:
        return image_features(
            model,
            ElevaterImages(split, transform, indices),
            device=device,
            batch_size=batch_size,
            workers=workers,
            normalize=features == "joint",
            precision=precision,
            desc=f"{split.name} {what} images",
        )[0]

    train_features, test_features = encode(train, used, "train"), encode(test, None, "test")
    text_head = None
    if probe == "toolkit" and features == "joint" and text_prompts is not None:
        classnames, templates = text_prompts
        classifier = build_zeroshot_classifier(
            model, classnames, templates, device=device, batch_size=batch_size, precision=precision
        )
        text_head = classifier.T.to(device)  # [C, D]: the toolkit's `zeroshot_weights.T`
    test_targets = targets_of(test)
    per_seed: list[dict[str, float]] = []
    for seed, (search, final, merge) in subsets.items():
        data = ProbeData(
            train_features[[row_of[i] for i in search]].to(device),
            targets_of(train, search).to(device),
            train_features[[row_of[i] for i in final]].to(device),
            targets_of(train, final).to(device),
            test_features.to(device),
            test_targets.to(device),
            merge_validation=merge,
        )
        options = {"metric": metric, "multilabel": train.multilabel, "num_classes": num_classes}
        if probe == "toolkit":
            outcome = toolkit_probe(data, text_head=text_head, **options)
        else:
            outcome = lbfgs_probe(data, **options)
        scores = outcome.test_probabilities
        metrics = {
            "score": METRICS.get(metric)(scores, test_targets),
            **extra_metrics(scores, test_targets, multilabel=test.multilabel),
            **outcome.info,
            "train_images": float(len(set(search) | set(final))),
        }
        log.info(
            "%s seed %d: %s %.2f (l2 %.0e, %d training images)",
            test.name,
            seed,
            metric,
            metrics["score"],
            outcome.info["l2"],
            metrics["train_images"],
        )
        per_seed.append(metrics)
    summary = {key: float(np.mean([m[key] for m in per_seed])) for key in per_seed[0] if key not in ("l2", "lr")}
    summary["score_std"] = float(np.std([m["score"] for m in per_seed]))
    for seed, metrics in zip(subsets, per_seed):
        summary[f"seed{seed}/score"] = metrics["score"]
        summary[f"seed{seed}/l2"] = metrics["l2"]
        if "lr" in metrics:
            summary[f"seed{seed}/lr"] = metrics["lr"]
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
