"""Image transforms for training and evaluation, built from a tower's preprocessing (size, mean, std).

Built from torchvision's v2 transforms (and `PadCropFlip`, written out on the tensor), so one transform object
serves a PIL image (read from a file) and a `[3, H, W]` uint8 tensor (the in-memory decoded corpus,
`data.decoded_corpus`) alike: v1 and v2 draw the same random crop parameters from torch's generator, and `ToImage` +
`ToDtype(scale=True)` is v1's `ToTensor`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from protorkd.data.images import to_rgb

AUGMENTATIONS = ("none", "protoclip-light", "pad-crop-flip")

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
    """Train: RandomResizedCrop(scale 0.9-1), ProtoCLIP's light augmentation, or pad-crop-flip. Eval: resize +
    centre crop."""
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
    if augmentation == "pad-crop-flip":
        fit = T.Compose([T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size), _to_rgb, T.ToImage()])
        return PadCropFlip(image_size, max(1, image_size // 8), mean, std, fit)
    raise ValueError(f"unknown augmentation {augmentation!r}; valid: {', '.join(AUGMENTATIONS)}")


class PadCropFlip:
    """The standard small-image augmentation (CIFAR ResNets, Page's ResNet-9): a random translation by up to
    `pad` pixels with zero fill (torchvision's RandomCrop(size, padding=pad)), a horizontal flip with
    probability 1/2, then uint8 -> float in [0, 1] and the normalisation.

    Written out with slicing on a [C, S, S] uint8 tensor: the same steps as torchvision v2 transforms (Resize,
    CenterCrop, RandomCrop, RandomHorizontalFlip, ToDtype, Normalize) took 152 us a 32 px sample on this
    project's 2-core CPU, mostly dispatch, against 19 us here; 0.6 s of each 5,000-photo epoch of resnet9-tiny
    (about 6.5 s). The offsets and the flip are drawn from torch's default generator, so the corpus's
    per-sample seeding makes them reproducible. A PIL image or a tensor of another size is first brought to
    [C, S, S] uint8 by `fit` (resize the shorter side, centre crop).
    """

    def __init__(
        self,
        size: int,
        pad: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        fit: Callable[[Image.Image | torch.Tensor], torch.Tensor],
    ) -> None:
        self.size, self.pad = size, pad
        self.offset = 255.0 * torch.tensor(mean).view(-1, 1, 1)  # (x / 255 - mean) / std = (x - offset) * scale
        self.scale = 1.0 / (255.0 * torch.tensor(std).view(-1, 1, 1))
        self.fit = fit  # to a [C, size, size] uint8 tensor (a decoded tensor of that size skips it)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.apply(image, self.draw())

    def draw(self) -> int:
        """One draw from torch's default generator: (dx, dy, flip) uniform, as one integer."""
        offsets = 2 * self.pad + 1
        return int(torch.randint(0, 2 * offsets * offsets, ()))

    def apply(self, image: Image.Image | torch.Tensor, draw: int) -> torch.Tensor:
        """The translation and flip that `draw` encodes."""
        if not (isinstance(image, torch.Tensor) and tuple(image.shape[-2:]) == (self.size, self.size)):
            image = self.fit(image)
        pad, offsets = self.pad, 2 * self.pad + 1
        flip, dx, dy = draw % 2, draw // 2 % offsets, draw // 2 // offsets
        shift_x, shift_y = dx - pad, dy - pad  # out[y, x] = image[y + shift_y, x + shift_x], zero outside
        _, height, width = image.shape
        out = torch.zeros(image.shape, dtype=torch.float32)
        y0, y1 = max(0, -shift_y), min(height, height - shift_y)
        x0, x1 = max(0, -shift_x), min(width, width - shift_x)
        out[:, y0:y1, x0:x1] = image[:, y0 + shift_y : y1 + shift_y, x0 + shift_x : x1 + shift_x]
        if flip:
            out = out.flip(-1)
        return (out - self.offset) * self.scale


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
    """The training transform of a tower (`--augmentation`: None or one of AUGMENTATIONS), from its preprocessing."""
    return image_transform(
        preprocess.image_size,
        preprocess.mean,
        preprocess.std,
        train=True,
        augmentation=augmentation,
        interpolation=preprocess.interpolation,
    )
