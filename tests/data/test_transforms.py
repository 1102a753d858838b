"""Training augmentations checked against their definition on a known image."""

from __future__ import annotations

import pytest
import torch

from protorkd.data.transforms import AUGMENTATIONS, image_transform


def _shifted(image: torch.Tensor, dx: int, dy: int, pad: int) -> torch.Tensor:
    """The crop at offset (dx, dy) of the zero-padded image: a translation by (pad - dx, pad - dy)."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    side = image.shape[-1]
    return padded[:, dy : dy + side, dx : dx + side]


def test_pad_crop_flip_is_a_translation_by_at_most_an_eighth_and_maybe_a_flip():
    torch.manual_seed(0)
    image = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    transform = image_transform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=True, augmentation="pad-crop-flip")
    candidates = {
        (dx, dy, flip): (_shifted(image, dx, dy, 4).flip(-1) if flip else _shifted(image, dx, dy, 4)).float() / 255
        for dx in range(9)
        for dy in range(9)
        for flip in (False, True)
    }
    seen = set()
    for _ in range(200):
        out = transform(image)
        matches = [key for key, expected in candidates.items() if torch.allclose(out, expected)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert {flip for _, _, flip in seen} == {False, True}
    assert {dx for dx, _, _ in seen} == set(range(9))  # every offset is drawn, no larger one ever


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_every_listed_augmentation_builds_and_keeps_the_size(augmentation):
    transform = image_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, augmentation=augmentation)
    assert transform(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape == (3, 32, 32)


def test_pad_crop_flip_gives_a_file_and_its_decoded_tensor_the_same_sample():
    """The file reader passes PIL images, the in-memory corpus uint8 tensors: the same seed, the same sample."""
    from PIL import Image

    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    transform = image_transform(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), train=True, augmentation="pad-crop-flip")
    for seed in range(5):
        torch.manual_seed(seed)
        from_file = transform(image)
        torch.manual_seed(seed)
        assert torch.equal(from_file, transform(pixels))
