"""Downstream data on disk: labelled image folders, torchvision's own formats, and captioned image sets.

Every image dataset yields `(image tensor, label)`; an image that cannot be decoded yields an
`UnreadableImage` instead of raising inside a worker, so the feature extractor can stop with one clear
message that names the file (see `features.collate_or_error`).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from protorkd.data.images import open_regular_file
from protorkd.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}
Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class UnreadableImage:
    """Returned by a dataset for an image that cannot be decoded (picklable, so it crosses worker processes)."""

    path: str
    error: str


def load_image(path: Path, transform: Transform) -> torch.Tensor | UnreadableImage:
    """The transformed image, or why it cannot be read (a FIFO or a device is refused without waiting on it)."""
    try:
        with open_regular_file(path) as handle, Image.open(handle) as image:
            return transform(image)
    except Exception as error:  # PIL raises many types for corrupt, truncated or missing files
        return UnreadableImage(str(path), f"{type(error).__name__}: {error}")


def natural_order(names: Sequence[str]) -> list[str]:
    """Folder names in label order: numerically when every name is an integer ("2" before "10"), else sorted
    as strings, which is torchvision ImageFolder's order (and the order of zero-padded names)."""
    if names and all(name.isdigit() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


class ImageFolderDataset(Dataset):
    """`folder/<class>/*` -> (image, label).

    Labels follow `class_folders` when it is given (a registered dataset's declared classes, e.g. ImageNet-R's
    200 WordNet ids: a folder outside it is an error, a listed one that is absent or empty keeps its label
    and has no images), else `natural_order` of the class folders found. Empty class folders keep their
    label with `keep_empty` (a registered dataset whose class list is fixed: the CLOOB copy of Birdsnap has
    nine empty folders and stays a 500-way task); otherwise they are dropped together with their names so
    labels and names stay aligned: `class_folders` lists every folder in label order, `classes` the
    classes that have a label (label i is `classes[i]`), `empty_classes` the folders without images.
    """

    def __init__(
        self,
        folder: Path,
        transform: Transform,
        *,
        class_folders: Sequence[str] | None = None,
        keep_empty: bool = False,
    ) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise UsageError(f"dataset folder {folder} does not exist")
        self.root = folder
        self.transform = transform
        found = [p.name for p in folder.iterdir() if p.is_dir()]
        if class_folders is not None:
            unknown = sorted(set(found) - set(class_folders))
            if unknown:
                raise UsageError(
                    f"{folder}: {len(unknown)} class folder(s) outside this dataset's {len(class_folders)} "
                    f"classes, e.g. {', '.join(unknown[:3])} (see docs/data.md for its layout)"
                )
            keep_empty = True
        self.class_folders = list(class_folders) if class_folders is not None else natural_order(found)
        self.classes: list[str] = []
        self.empty_classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        for name in self.class_folders:
            files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                self.empty_classes.append(name)
                if not keep_empty:
                    continue
            label = len(self.classes)
            self.classes.append(name)
            self.samples.extend((path, label) for path in files)
        if not self.samples:
            raise UsageError(f"dataset folder {folder} holds no images in <class>/ subfolders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | UnreadableImage, int]:
        path, label = self.samples[index]
        return load_image(path, self.transform), label


class TorchvisionDataset(Dataset):
    """A torchvision dataset read from its own on-disk format (never downloaded) -> (image, label)."""

    def __init__(self, name: str, root: Path, split: str, transform: Transform) -> None:
        import torchvision.datasets as tv

        self.root = Path(root)
        self.transform = transform
        try:
            if name in ("CIFAR10", "CIFAR100"):
                self.dataset = getattr(tv, name)(str(root), train=split == "train", download=False)
            elif name == "STL10":
                self.dataset = tv.STL10(str(root), split=split, download=False)
            else:
                raise ValueError(f"unsupported torchvision dataset {name}")
        except RuntimeError as error:  # "Dataset not found or corrupted"
            raise UsageError(f"{root}: not a readable torchvision {name} folder ({error})") from error
        self.classes = [str(c) for c in self.dataset.classes]
        self.class_folders = list(self.classes)
        self.empty_classes: list[str] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


class CaptionedImages(Dataset):
    """Images with several captions each -> (image, image position).

    `captions` [T] strings; `caption_image` [T] the position of each caption's image.
    """

    def __init__(
        self, image_paths: list[Path], captions: list[str], caption_image: list[int], transform: Transform
    ) -> None:
        self.image_paths = image_paths
        self.captions = captions
        self.caption_image = torch.tensor(caption_image, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | UnreadableImage, int]:
        return load_image(self.image_paths[index], self.transform), index


def _check_images_exist(paths: list[Path], described_by: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise UsageError(f"{described_by} names {len(missing)} image(s) that do not exist, e.g. {shown}")


def coco_captions(annotations_file: Path, image_root: Path, transform: Transform) -> CaptionedImages:
    """A COCO-format captions file (read with pycocotools): every image that has captions, all its captions."""
    from pycocotools.coco import COCO

    annotations_file = Path(annotations_file)
    if not annotations_file.is_file():
        raise UsageError(f"captions file {annotations_file} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = COCO(str(annotations_file))
    except Exception as error:
        raise UsageError(f"cannot read COCO captions file {annotations_file}: {error}") from error
    image_ids = sorted(image_id for image_id in coco.imgs if coco.imgToAnns.get(image_id))
    paths, captions, owners = [], [], []
    for position, image_id in enumerate(image_ids):
        paths.append(Path(image_root) / coco.imgs[image_id]["file_name"])
        for annotation in sorted(coco.imgToAnns[image_id], key=lambda a: a["id"]):
            captions.append(str(annotation["caption"]).strip())
            owners.append(position)
    if not paths:
        raise UsageError(f"captions file {annotations_file} holds no captioned images")
    _check_images_exist(paths, annotations_file)
    return CaptionedImages(paths, captions, owners, transform)


def karpathy_captions(split_file: Path, image_root: Path, split: str, transform: Transform) -> CaptionedImages:
    """Karpathy's split json (`dataset_flickr30k.json`: images[] with filename, split, sentences[].raw)."""
    split_file = Path(split_file)
    if not split_file.is_file():
        raise UsageError(f"split file {split_file} does not exist")
    try:
        images = json.loads(split_file.read_text())["images"]
    except (ValueError, KeyError) as error:
        raise UsageError(f"{split_file} is not a Karpathy split json (images[] expected): {error}") from error
    paths, captions, owners = [], [], []
    for image in images:
        if image.get("split") != split:
            continue
        position = len(paths)
        paths.append(Path(image_root) / image.get("filepath", "") / image["filename"])
        for sentence in image["sentences"]:
            captions.append(str(sentence["raw"]).strip())
            owners.append(position)
    if not paths:
        raise UsageError(f"{split_file} has no images in split {split!r}")
    _check_images_exist(paths, split_file)
    return CaptionedImages(paths, captions, owners, transform)


def load_zeroshot_metadata(path: Path) -> dict[str, dict[str, list]]:
    """`{dataset: {"classes": [...], "templates": ["a photo of a {}.", ...]}}` (the format of CLIP's prompt file)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"zero-shot metadata file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected {{dataset: {{classes, templates}}}}")
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("classes"), list):
            raise UsageError(f"{path}: entry {name!r} needs a 'classes' list")
        templates = entry.get("templates", ["a photo of a {}."])
        if not templates or any("{}" not in t and "{c}" not in t for t in templates):
            raise UsageError(f"{path}: every template of {name!r} needs a '{{}}' placeholder for the class name")
    return data
