"""Zero-shot classification: class embeddings from prompt templates, images scored against them.

Class names and templates come, in this order, from a metadata file (`--zeroshot-metadata`, then the data
root's `zeroshot_metadata.json`), from the CLIP prompts shipped with the package for the registered
dataset (`prompts/clip_zeroshot_prompts.json`: OpenAI CLIP's names and templates, named by the dataset's
registry entry), or, for a generic folder dataset only, from its folder names with "a photo of a {}." and
a warning. Names always follow the dataset's label order; names of empty class folders are dropped with
them. Metrics: `ranking.accuracy_metrics` (top1, top5 with >= 5 classes, mean per-class recall), and
`diagnostics.prediction_diagnostics` of the predicted classes (prediction_entropy, top_class_share).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from protorkd.errors import UsageError
from protorkd.eval.datasets import ImageFolderDataset, TorchvisionDataset, load_zeroshot_metadata
from protorkd.eval.diagnostics import prediction_diagnostics
from protorkd.eval.features import FeatureCache, image_features, text_features, weights_fingerprint
from protorkd.eval.ranking import accuracy_metrics
from protorkd.precision import Precision

log = logging.getLogger(__name__)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CLIP_PROMPTS_FILE = "clip_zeroshot_prompts.json"  # in protorkd/eval/prompts/ (SOURCE.md there)
ClassName = str | list[str]  # a list holds synonyms whose prompts are averaged together


@dataclass
class ZeroShotPrompts:
    classnames: list[ClassName]  # one per label, in label order
    templates: list[str]
    source: str  # where they came from, for the log


@functools.cache
def packaged_prompts(file: str) -> dict[str, dict[str, list]]:
    """{dataset: {"classes", "templates"}} of a prompt file shipped in `protorkd/eval/prompts/`."""
    return json.loads(resources.files("protorkd.eval").joinpath("prompts", file).read_text(encoding="utf-8"))


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_metadata_entry(metadata: dict, names: tuple[str, ...]) -> dict | None:
    """The entry of the first of `names` in `metadata`, ignoring case, '_' and '-'."""
    by_norm = {_norm(key): value for key, value in metadata.items()}
    for name in names:
        if _norm(name) in by_norm:
            return by_norm[_norm(name)]
    return None


def align_classnames(class_folders: list[str], kept: list[str], names: list[ClassName], source: str) -> list[ClassName]:
    """Names for the kept (non-empty) classes, from `names` listed in label order over all `class_folders`.

    When the folders are themselves the class names (in another order), names are matched by name.
    """
    if len(names) != len(class_folders):
        raise UsageError(
            f"{source} lists {len(names)} classes but the dataset has {len(class_folders)} class "
            "folders (empty ones included); class names must follow the dataset's label order"
        )
    flat = [n if isinstance(n, str) else n[0] for n in names]
    if {_norm(n) for n in flat} == {_norm(f) for f in class_folders} and len(set(map(_norm, flat))) == len(flat):
        by_norm = {_norm(f): n for f, n in zip(flat, names)}
        return [by_norm[_norm(folder)] for folder in kept]
    by_folder = dict(zip(class_folders, names))
    return [by_folder[folder] for folder in kept]


def resolve_prompts(
    dataset: str,
    class_folders: list[str],
    kept_classes: list[str],
    *,
    packaged_key: str | None = None,
    subset: Sequence[int] | None = None,
    metadata_files: Sequence[Path] = (),
) -> ZeroShotPrompts:
    """Class names and templates for `dataset` (see the module docstring for the order of sources).

    `packaged_key` is the dataset's entry in the shipped CLIP prompts (its registry entry's `prompts`);
    a metadata file is searched for `dataset` and `packaged_key`, ignoring case, '_' and '-'. `subset`
    (ImageNet-A/-R: their 200 of ImageNet's 1000) picks the dataset's classes from a list of the packaged
    entry's length; a metadata list of the dataset's own length is taken as it is.
    """

    def chosen(classes: list[ClassName]) -> list[ClassName]:
        if subset is not None and len(classes) != len(class_folders) and len(classes) > max(subset):
            return [classes[i] for i in subset]
        return classes

    names = (dataset, packaged_key) if packaged_key else (dataset,)
    for path in metadata_files:
        entry = find_metadata_entry(load_zeroshot_metadata(path), names)
        if entry is not None:
            source = f"{path} [{dataset}]"
            classnames = align_classnames(class_folders, kept_classes, chosen(entry["classes"]), source)
            return ZeroShotPrompts(classnames, list(entry.get("templates", DEFAULT_TEMPLATES)), source)
    if packaged_key is not None:
        entry = packaged_prompts(CLIP_PROMPTS_FILE)[packaged_key]
        source = f"OpenAI CLIP's prompts for {packaged_key} (protorkd/eval/prompts/{CLIP_PROMPTS_FILE})"
        classnames = align_classnames(class_folders, kept_classes, chosen(entry["classes"]), source)
        return ZeroShotPrompts(classnames, list(entry["templates"]), source)
    log.warning(
        "zero-shot %s: no class names for this dataset (not a registered dataset, and no %s entry in a "
        "metadata file): prompting with its folder names and %r; give --zeroshot-metadata to fix",
        dataset,
        dataset,
        DEFAULT_TEMPLATES[0],
    )
    classnames = [folder.replace("_", " ") for folder in kept_classes]
    return ZeroShotPrompts(classnames, list(DEFAULT_TEMPLATES), "the dataset's folder names")


def build_zeroshot_classifier(
    model: torch.nn.Module,
    classnames: list[ClassName],
    templates: list[str],
    *,
    device: torch.device | str,
    batch_size: int = 256,
    precision: Precision = Precision.FP32,
) -> torch.Tensor:
    """[D, C]: per class, the normalised mean of its normalised template embeddings (CLIP's recipe).

    A class given as a list of synonyms averages the prompts of all its synonyms.
    """
    prompts, owners = [], []
    for index, entry in enumerate(classnames):
        for name in [entry] if isinstance(entry, str) else entry:
            for template in templates:
                prompts.append(template.replace("{c}", name).replace("{}", name))
                owners.append(index)
    embeddings = F.normalize(
        text_features(model, prompts, device=device, batch_size=batch_size, precision=precision), dim=-1
    )
    owner = torch.tensor(owners)
    sums = torch.zeros(len(classnames), embeddings.shape[1]).index_add_(0, owner, embeddings)
    return F.normalize(sums / torch.bincount(owner, minlength=len(classnames))[:, None], dim=-1).T


def text_side_fingerprint(model: torch.nn.Module) -> str:
    return weights_fingerprint(model.text_tower, model.text_head)


def cached_classifier(
    model: torch.nn.Module,
    prompts: ZeroShotPrompts,
    *,
    device: torch.device | str,
    batch_size: int,
    cache: FeatureCache | None,
    precision: Precision = Precision.FP32,
) -> torch.Tensor:
    """The classifier, reused from `cache` when the same text tower + head already embedded the same prompts
    in the same precision."""

    def compute() -> dict[str, torch.Tensor]:
        return {
            "classifier": build_zeroshot_classifier(
                model, prompts.classnames, prompts.templates, device=device, batch_size=batch_size, precision=precision
            )
        }

    if cache is None:
        return compute()["classifier"]
    description = {
        "kind": "zeroshot_classifier",
        "text_weights": text_side_fingerprint(model),
        "classnames": prompts.classnames,
        "templates": prompts.templates,
        "precision": precision.value,
    }
    return cache.get_or_compute(description, compute)["classifier"]


def zeroshot_scores(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[N, D] normalised image features x [D, C] classifier -> [N, C] logits (scaled by 100 like CLIP)."""
    return 100.0 * image_features @ classifier


def logits_and_labels(
    model: torch.nn.Module,
    dataset: ImageFolderDataset | TorchvisionDataset,
    prompts: ZeroShotPrompts,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    workers: int = 0,
    cache: FeatureCache | None = None,
    precision: Precision = Precision.FP32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero-shot logits [N, C], labels [N]) of `model` on a labelled image dataset."""
    if len(prompts.classnames) != len(dataset.classes):
        raise UsageError(f"{len(prompts.classnames)} class names for {len(dataset.classes)} classes")
    classifier = cached_classifier(
        model, prompts, device=device, batch_size=batch_size, cache=cache, precision=precision
    )
    features, labels = image_features(
        model,
        dataset,
        device=device,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        desc="zero-shot images",
    )
    return zeroshot_scores(features, classifier.cpu()), labels


def evaluate(
    model: torch.nn.Module,
    dataset: ImageFolderDataset | TorchvisionDataset,
    prompts: ZeroShotPrompts,
    **options,
) -> dict[str, float]:
    """Zero-shot metrics of `model` on a labelled image dataset: {"top1", ["top5"], "mean_per_class_recall",
    "prediction_entropy", "top_class_share"}; `options` are `logits_and_labels`'s (device, batch_size, workers,
    cache, precision)."""
    return zeroshot_metrics(*logits_and_labels(model, dataset, prompts, **options))


def zeroshot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{"top1", ["top5"], "mean_per_class_recall", "prediction_entropy", "top_class_share"} of zero-shot logits
    [N, C] against labels [N]."""
    return {**accuracy_metrics(logits, labels), **prediction_diagnostics(logits)}
