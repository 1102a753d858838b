"""Image transforms for training and evaluation, built from a tower's preprocessing (size, mean, std).

Built from torchvision's v2 transforms, so one transform object serves a PIL image (read from a file) and a
`[3, H, W]` uint8 tensor (the in-memory decoded corpus, `data.memory`) alike: v1 and v2 draw the same random
crop parameters from torch's generator, and `ToImage` + `ToDtype(scale=True)` is v1's `ToTensor`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from protorkd.data.images import to_rgb

INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


class PreprocessSpec(Protocol):
    """What a tower says about its input images (`models.image_towers.Preprocess` is one)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def _to_rgb(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """8-bit RGB; 16-bit and float images are scaled, not clipped to white (`data.images.to_rgb`). A decoded
    tensor is already 8-bit RGB."""
    return image if isinstance(image, torch.Tensor) else to_rgb(image)


def _to_float(normalize: T.Normalize) -> list:
    """v1's ToTensor (uint8 -> float in [0, 1]) then the normalisation."""
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), normalize]


def image_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    train: bool,
    augmentation: str | None = None,
    interpolation: str = "bicubic",
) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """Train: RandomResizedCrop(scale 0.9-1), or ProtoCLIP's light augmentation. Eval: resize + centre crop."""
    mode = INTERPOLATIONS.get(interpolation, T.InterpolationMode.BICUBIC)
    normalize = T.Normalize(mean, std)
    if not train:
        return T.Compose(
            [T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size), _to_rgb, *_to_float(normalize)]
        )
    if augmentation in (None, "none"):
        crop = T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=mode)
        return T.Compose([crop, _to_rgb, *_to_float(normalize)])
    if augmentation == "protoclip-light":
        return T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=mode),
                _to_rgb,
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.2),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(kernel_size=21 if image_size >= 128 else 5)], p=0.2),
                *_to_float(normalize),
            ]
        )
    raise ValueError(f"unknown augmentation {augmentation!r}; valid: none, protoclip-light")


def eval_transform(preprocess: PreprocessSpec) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """The evaluation transform of a tower (resize + centre crop + normalise), from its own preprocessing.

    Every evaluation and teacher-feature path builds its transform here, so a model is always measured on
    images prepared the way its tower expects (`model.image_preprocess`, a teacher's `preprocess`).
    """
    return image_transform(
        preprocess.image_size, preprocess.mean, preprocess.std, train=False, interpolation=preprocess.interpolation
    )


def train_transform(
    preprocess: PreprocessSpec, augmentation: str | None = None
) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """The training transform of a tower (`--augmentation`: None or "protoclip-light"), from its preprocessing."""
    return image_transform(
        preprocess.image_size,
        preprocess.mean,
        preprocess.std,
        train=True,
        augmentation=augmentation,
        interpolation=preprocess.interpolation,
    )
