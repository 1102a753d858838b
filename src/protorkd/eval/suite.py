"""The evaluation run during training: zero-shot, linear probe and retrieval on the data root's datasets.

Metric keys are flat: `zeroshot/<dataset>/top1`, `linear/<dataset>/top1`, `retrieval/<dataset>/mean_recall`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from protorkd.data.transforms import image_transform
from protorkd.errors import UsageError
from protorkd.eval.datasets import CaptionedImages, ImageFolderDataset, load_zeroshot_metadata
from protorkd.eval.features import image_features, text_features
from protorkd.eval.linear_probe import linear_probe
from protorkd.eval.retrieval import retrieval_metrics
from protorkd.eval.zeroshot import accuracy_metrics, build_zeroshot_classifier, zeroshot_scores

log = logging.getLogger(__name__)


def _val_transform(model):
    p = model.image_preprocess
    return image_transform(p.image_size, p.mean, p.std, train=False, interpolation=p.interpolation)


def folder_datasets(root: Path) -> list[str]:
    """Names of `ROOT/<name>/test/<class>/` datasets."""
    return sorted(p.parent.name for p in Path(root).glob("*/test") if p.is_dir())


def evaluate_zeroshot(model, root: Path, *, device, batch_size: int = 256, workers: int = 0) -> dict[str, float]:
    metadata_path = Path(root) / "zeroshot_metadata.json"
    metadata = load_zeroshot_metadata(metadata_path) if metadata_path.exists() else {}
    metrics = {}
    for name in folder_datasets(root):
        dataset = ImageFolderDataset(Path(root) / name / "test", _val_transform(model))
        entry = metadata.get(name, {})
        names = entry.get("classes")
        folders = sorted(dataset.classes + dataset.empty_classes)
        if names is None:
            names = [c.replace("_", " ") for c in dataset.classes]
        elif len(names) != len(folders):
            raise UsageError(f"{metadata_path}: {name} lists {len(names)} classes but {root}/{name}/test has "
                             f"{len(folders)} class folders")
        else:  # names follow the folder (label) order; drop those of empty folders so labels stay aligned
            names = [n for n, folder in zip(names, folders) if folder in dataset.classes]
        templates = entry.get("templates", ["a photo of a {}."])
        classifier = build_zeroshot_classifier(model, names, templates, device=device, batch_size=batch_size)
        features, labels = image_features(model, dataset, device=device, batch_size=batch_size, workers=workers)
        scores = zeroshot_scores(features, classifier.cpu())
        for key, value in accuracy_metrics(scores, labels).items():
            metrics[f"zeroshot/{name}/{key}"] = value
    return metrics


def evaluate_linear(model, root: Path, *, device, batch_size: int = 256, workers: int = 0) -> dict[str, float]:
    metrics = {}
    for name in folder_datasets(root):
        if not (Path(root) / name / "train").is_dir():
            continue
        transform = _val_transform(model)
        train = ImageFolderDataset(Path(root) / name / "train", transform)
        test = ImageFolderDataset(Path(root) / name / "test", transform)
        train_x, train_y = image_features(model, train, device=device, batch_size=batch_size, workers=workers,
                                          normalize=False)
        test_x, test_y = image_features(model, test, device=device, batch_size=batch_size, workers=workers,
                                        normalize=False)
        result = linear_probe(train_x, train_y, test_x, test_y)
        metrics[f"linear/{name}/top1"] = result["top1"]
    return metrics


def evaluate_retrieval(model, root: Path, *, device, batch_size: int = 256, workers: int = 0) -> dict[str, float]:
    metrics = {}
    for captions_file in sorted(Path(root).glob("*/captions_test.json")):
        name = captions_file.parent.name
        dataset = CaptionedImages(captions_file, captions_file.parent / "test", _val_transform(model))
        images, _ = image_features(model, dataset, device=device, batch_size=batch_size, workers=workers)
        texts = text_features(model, dataset.captions, device=device, batch_size=batch_size)
        for key, value in retrieval_metrics(images, texts, dataset.caption_image).items():
            metrics[f"retrieval/{name}/{key}"] = value
    return metrics


TASKS = {"zeroshot": evaluate_zeroshot, "linear": evaluate_linear, "retrieval": evaluate_retrieval}


def evaluate_during_training(
    model, root: Path | None, *, epoch: int, last_epoch: int, frequencies: dict[str, int], device: torch.device,
    batch_size: int = 256, workers: int = 0,
) -> dict[str, float]:
    """Run each task whose frequency divides `epoch` (or at the last epoch when the frequency is > 0)."""
    if root is None:
        return {}
    metrics: dict[str, float] = {}
    for task, function in TASKS.items():
        frequency = frequencies.get(task, 0)
        if frequency <= 0 or (epoch % frequency and epoch != last_epoch):
            continue
        metrics.update(function(model, Path(root), device=device, batch_size=batch_size, workers=workers))
    return metrics
