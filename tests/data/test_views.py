"""Stored views replay the training transform exactly: apply_view(t, x, draw_view(t, x)) is t(x), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from protorkd.data.transforms import image_transform
from protorkd.data.views import apply_view, draw_view, view_of_row, view_seed, view_width

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def photo(height: int = 40, width: int = 56) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("augmentation", [None, "protoclip-light", "pad-crop-flip"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_replayed_view_is_the_training_transform_bit_for_bit(augmentation, as_tensor):
    transform = image_transform(32, MEAN, STD, train=True, augmentation=augmentation)
    image = photo()
    if as_tensor:  # the in-memory corpus hands the transform a decoded [3, H, W] uint8 tensor
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    applied = set()
    for seed in range(40):
        torch.random.default_generator.manual_seed(seed)
        expected = transform(image)
        after_transform = torch.random.get_rng_state()
        torch.random.default_generator.manual_seed(seed)
        params = draw_view(transform, image)
        assert torch.equal(torch.random.get_rng_state(), after_transform)  # the same draws, no more, no fewer
        assert params.dtype == np.float32 and params.shape == (view_width(transform),)
        replayed = apply_view(transform, image, params)
        assert torch.equal(replayed, expected), f"seed {seed}"
        applied.add(tuple(params[[4, 5, 12, 13]] > 0.5) if augmentation == "protoclip-light" else ())
    if augmentation == "protoclip-light":  # flips, jitter, grayscale and blur both applied and not, over 40 draws
        flags = np.array(sorted(applied))
        assert flags.any(axis=0).all() and (~flags).any(axis=0).all()


def test_view_widths_name_each_draw():
    assert view_width(image_transform(32, MEAN, STD, train=True)) == 4  # top, left, height, width
    assert view_width(image_transform(32, MEAN, STD, train=True, augmentation="pad-crop-flip")) == 1
    # crop 4, flip 1, jitter (applied, order, 4 factors) 6, grayscale 1, blur (applied, sigma) 2
    assert view_width(image_transform(32, MEAN, STD, train=True, augmentation="protoclip-light")) == 14


def test_views_and_view_choices_are_fixed_by_their_seeds():
    assert view_seed(0, 5, 1) == view_seed(0, 5, 1) and len({view_seed(0, 5, v) for v in range(10)}) == 10
    assert view_seed(0, 5, 1) != view_seed(1, 5, 1) and view_seed(0, 5, 1) != view_seed(0, 6, 1)
    picks = [view_of_row(3, epoch, row, 4) for epoch in range(50) for row in range(20)]
    assert picks == [view_of_row(3, epoch, row, 4) for epoch in range(50) for row in range(20)]
    counts = np.bincount(picks, minlength=4)
    assert counts.min() > 200  # 1,000 draws over 4 views: each near 250 (a uniform choice)
