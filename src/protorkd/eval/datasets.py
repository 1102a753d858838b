"""Downstream datasets on disk: `ROOT/<name>/{train,test}/<class>/*` image folders and COCO-format captions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from protorkd.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}


class ImageFolderDataset(Dataset):
    """`folder/<class>/*` -> (image, label). Classes sorted by name; empty class folders are dropped
    together with their names (so labels and class names stay aligned), and reported in `empty_classes`."""

    def __init__(self, folder: Path, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise UsageError(f"dataset folder {folder} does not exist")
        self.transform = transform
        self.classes: list[str] = []
        self.empty_classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                self.empty_classes.append(class_dir.name)
                continue
            label = len(self.classes)
            self.classes.append(class_dir.name)
            self.samples.extend((path, label) for path in files)
        if not self.samples:
            raise UsageError(f"dataset folder {folder} holds no images in <class>/ subfolders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return self.transform(image), label
        except Exception as error:
            raise UsageError(f"cannot read image {path}: {error}") from error


class CaptionedImages(Dataset):
    """Images of a COCO-format captions file: (image, image position); captions in `captions`,
    `caption_image` [T] maps each caption to its image position."""

    def __init__(self, captions_file: Path, image_root: Path, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        captions_file = Path(captions_file)
        if not captions_file.is_file():
            raise UsageError(f"captions file {captions_file} does not exist")
        data = json.loads(captions_file.read_text())
        self.image_root = Path(image_root)
        self.transform = transform
        self.images = sorted(data["images"], key=lambda image: image["id"])
        position = {image["id"]: i for i, image in enumerate(self.images)}
        annotations = sorted(data["annotations"], key=lambda a: (position[a["image_id"]], a["id"]))
        self.captions = [a["caption"].strip() for a in annotations]
        self.caption_image = torch.tensor([position[a["image_id"]] for a in annotations], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.image_root / self.images[index]["file_name"]
        try:
            with Image.open(path) as image:
                return self.transform(image), index
        except Exception as error:
            raise UsageError(f"cannot read image {path}: {error}") from error


def load_zeroshot_metadata(path: Path) -> dict[str, dict[str, list[str]]]:
    """`{dataset: {"classes": [...], "templates": [...]}}` (the format of CLIP's prompt file)."""
    return json.loads(Path(path).read_text())
