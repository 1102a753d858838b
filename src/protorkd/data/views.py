"""Augmented views as numbers: draw a view of an image from the training transform, store it, replay it exactly.

A reinforced teacher cache (MobileCLIP's dataset reinforcement, Vasu et al., CVPR 2024) stores, for every image,
the parameters of K random augmentations and the teacher's features of each. Training then picks one of the K
views, rebuilds exactly that augmented image for the student, and reads the teacher's features of it.

`draw_view(transform, image)` draws one view's parameters from the run's own training transform
(`data.transforms.train_transform`), in the order and with the generator calls the transform itself makes, and
encodes them as a fixed-width float32 vector; `apply_view(transform, image, params)` applies exactly those
parameters with the transform's own kernels. Drawn from the same generator state, `apply_view(t, x,
draw_view(t, x))` is `t(x)` bit for bit (tests/data/test_views.py), and every number a draw makes is a float32
value or a small integer, so the stored vector loses nothing.

The layout of a transform's vector (`view_width`): a random resized crop is (top, left, height, width); a random
flip or grayscale, (applied); a random-apply block, (applied) and its transforms' slots; a colour jitter, the
index of its order among the 24 permutations and its four factors; a Gaussian blur, its sigma; `PadCropFlip`,
its one draw. Deterministic steps (to RGB, to float, normalise) have none.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2._transform import _RandomApplyTransform

from protorkd.data.transforms import PadCropFlip

PERMUTATIONS = [list(order) for order in itertools.permutations(range(4))]
Image_ = Image.Image | torch.Tensor


def _steps(transform: Callable) -> list[Callable]:
    """The steps of a training transform, in order (a Compose is flattened one level)."""
    return list(transform.transforms) if isinstance(transform, T.Compose) else [transform]


def _width(step: Callable) -> int:
    if isinstance(step, T.RandomResizedCrop):
        return 4
    if isinstance(step, _RandomApplyTransform):
        return 1
    if isinstance(step, T.RandomApply):
        return 1 + sum(_width(inner) for inner in step.transforms)
    if isinstance(step, T.ColorJitter):
        return 5
    if isinstance(step, T.GaussianBlur):
        return 1
    if isinstance(step, PadCropFlip):
        return 1
    if isinstance(step, T.Transform) and _is_random(step):
        raise ValueError(f"{type(step).__name__} has no stored-view form; use another --augmentation")
    return 0


def _is_random(step: T.Transform) -> bool:
    """A v2 transform whose output depends on a draw (one this module does not know how to store)."""
    return type(step).make_params is not T.Transform.make_params


def view_width(transform: Callable) -> int:
    """The number of float32 values one view of `transform` takes; a ValueError for a transform that cannot be
    stored (a random step this module does not know)."""
    return sum(_width(step) for step in _steps(transform))


def _size(image: Image_) -> tuple[int, int]:
    """(height, width) of a PIL image or a [C, H, W] tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def _draw(step: Callable, image: Image_, out: list[float]) -> None:
    """Append `step`'s draw to `out`, drawing from torch's default generator exactly as `step` does itself."""
    if isinstance(step, T.RandomResizedCrop):
        params = step.make_params([image])
        out += [params["top"], params["left"], params["height"], params["width"]]
    elif isinstance(step, _RandomApplyTransform):
        out.append(float(not bool(torch.rand(1) >= step.p)))  # flips and grayscale draw nothing more
    elif isinstance(step, T.RandomApply):
        applied = not bool(torch.rand(1) >= step.p)
        out.append(float(applied))
        for inner in step.transforms:
            if applied:
                _draw(inner, image, out)
            else:
                out += [0.0] * _width(inner)
    elif isinstance(step, T.ColorJitter):
        params = step.make_params([image])
        out.append(float(PERMUTATIONS.index(params["fn_idx"].tolist())))
        keys = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        out += [params[key] if params[key] is not None else float("nan") for key in keys]
    elif isinstance(step, T.GaussianBlur):
        out.append(step.make_params([image])["sigma"][0])
    elif isinstance(step, PadCropFlip):
        out.append(float(step.draw()))


def draw_view(transform: Callable, image: Image_) -> np.ndarray:
    """[view_width] float32: one view of `image` under `transform`, drawn from torch's default generator (seed it
    first; the draws are those `transform(image)` would make)."""
    out: list[float] = []
    for step in _steps(transform):
        _draw(step, image, out)
    values = np.asarray(out, dtype=np.float32)
    if not np.array_equal(values.astype(np.float64), np.asarray(out, dtype=np.float64), equal_nan=True):
        raise AssertionError("a drawn value is not a float32 number; it cannot be stored exactly")
    return values


def _apply(step: Callable, image: Any, values: Iterator[float]) -> Any:
    if isinstance(step, T.RandomResizedCrop):
        top, left, height, width = (int(next(values)) for _ in range(4))
        return step.transform(image, dict(top=top, left=left, height=height, width=width))
    if isinstance(step, _RandomApplyTransform):
        applied = next(values) > 0.5
        if not applied:
            return image
        params = step.make_params([image]) if isinstance(step, T.RandomGrayscale) else {}
        return step.transform(image, params)
    if isinstance(step, T.RandomApply):
        applied = next(values) > 0.5
        for inner in step.transforms:
            if applied:
                image = _apply(inner, image, values)
            else:
                for _ in range(_width(inner)):
                    next(values)
        return image
    if isinstance(step, T.ColorJitter):
        order = torch.tensor(PERMUTATIONS[int(next(values))])
        factors = [next(values) for _ in range(4)]
        keys = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        params = {key: None if np.isnan(value) else float(value) for key, value in zip(keys, factors)}
        return step.transform(image, dict(fn_idx=order, **params))
    if isinstance(step, T.GaussianBlur):
        sigma = float(next(values))
        return step.transform(image, dict(sigma=[sigma, sigma]))
    if isinstance(step, PadCropFlip):
        return step.apply(image, int(next(values)))
    return step(image)  # a deterministic step


def apply_view(transform: Callable, image: Image_, params: np.ndarray) -> torch.Tensor:
    """`image` under `transform` with the draws in `params` (from `draw_view`) instead of new ones."""
    values = iter(float(value) for value in np.asarray(params, dtype=np.float32))
    for step in _steps(transform):
        image = _apply(step, image, values)
    return image


@dataclass(frozen=True)
class ViewReplay:
    """The stored views a run's images replay: `params(row, view)` -> [P] float32, `views` per image, and the
    run's seed, which with (epoch, row) picks the view (`view_of_row`)."""

    params: Callable[[int, int], np.ndarray]
    views: int
    seed: int

    def pick(self, epoch: int, row: int) -> tuple[int, np.ndarray]:
        """(the view row `row` trains on in `epoch`, its parameters)."""
        view = view_of_row(self.seed, epoch, row, self.views)
        return view, self.params(row, view)


def view_seed(seed: int, item: int, view: int) -> int:
    """The generator seed of view `view` of image `item` (within 64 bits, apart from every other seeding)."""
    return int(np.random.SeedSequence([seed, item, view, 0x76696577]).generate_state(1, dtype=np.uint64)[0] >> 1)


def view_of_row(seed: int, epoch: int, row: int, views: int) -> int:
    """Which of the `views` stored views corpus row `row` trains on in `epoch`: uniform, fixed by (seed, epoch,
    row), so a resumed run replays the same views."""
    return int(np.random.default_rng([seed, epoch, row, 0x726F77]).integers(views))


__all__ = ["ViewReplay", "apply_view", "draw_view", "view_of_row", "view_seed", "view_width"]
