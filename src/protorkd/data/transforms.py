"""Image transforms for training and evaluation, built from a tower's preprocessing (size, mean, std)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def image_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    train: bool,
    augmentation: str | None = None,
    interpolation: str = "bicubic",
) -> Callable[[Image.Image], torch.Tensor]:
    """Train: RandomResizedCrop(scale 0.9-1), or ProtoCLIP's light augmentation. Eval: resize + centre crop."""
    mode = INTERPOLATIONS.get(interpolation, T.InterpolationMode.BICUBIC)
    normalize = T.Normalize(mean, std)
    if not train:
        return T.Compose(
            [T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size), _to_rgb, T.ToTensor(), normalize]
        )
    if augmentation in (None, "none"):
        return T.Compose(
            [T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=mode), _to_rgb, T.ToTensor(), normalize]
        )
    if augmentation == "protoclip-light":
        return T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=mode),
                _to_rgb,
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.2),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(kernel_size=21 if image_size >= 128 else 5)], p=0.2),
                T.ToTensor(),
                normalize,
            ]
        )
    raise ValueError(f"unknown augmentation {augmentation!r}; valid: none, protoclip-light")
