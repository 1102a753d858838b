"""An in-memory decoded corpus: every image decoded once into one uint8 tensor, augmented on tensors.

For a corpus that fits a memory budget (the built-in demo: 10,240 images of 64 x 64 are 126 MB), decoding
a JPEG per sample per epoch in loader workers costs more than a small student's step. Here each image is
decoded once at start-up (threads), brought to 8-bit RGB like the file reader does (`data.images.to_rgb`),
resized so its shorter side is the tower's input size and centre cropped to a square, and kept as
`[N, 3, S, S]` uint8. Every epoch the samples are augmented on tensors by the same transform object the
file reader applies to PIL images (`data.transforms`), seeded by (seed, epoch, position) exactly as
`CsvCorpus` seeds it, so the random crop parameters are the ones the file reader would draw.

Differences from reading the files (docs/training.md): the random crop is taken from the stored S x S image, not
from the original file (the same thing when the files are S x S already, as in the demo corpus), and tensor
resampling (bicubic, antialiased) is not bit-identical to PIL's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from protorkd.data.images import DEFAULT_MAX_PIXELS, NotARegularFile, TooManyPixels, read_image, to_rgb
from protorkd.data.tsv import CsvCorpus

log = logging.getLogger(__name__)


def decoded_bytes(rows: int, image_size: int) -> int:
    """Memory of `rows` decoded square uint8 RGB images of side `image_size`."""
    return rows * 3 * image_size * image_size


def decode_image(path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor | str:
    """[3, size, size] uint8 (shorter side resized to `size`, bicubic; centre crop), or why it cannot be read."""
    try:
        rgb = read_image(path, max_pixels, to_rgb)
    except (TooManyPixels, NotARegularFile) as reason:
        return str(reason)
    except FileNotFoundError:
        return "missing image"
    except Exception as error:  # PIL raises many types for corrupt or truncated files
        return f"unreadable image ({type(error).__name__}: {error})"
    tensor = TF.pil_to_tensor(rgb)
    if tuple(tensor.shape[1:]) != (size, size):
        tensor = TF.resize(tensor, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        tensor = TF.center_crop(tensor, [size, size])
    return tensor


def decode_images(
    paths: Sequence[str],
    size: int,
    *,
    skip: set[int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 2,
    progress: bool | None = None,
) -> tuple[torch.Tensor, dict[int, str]]:
    """([N, 3, size, size] uint8, {row: reason} for rows that could not be decoded; those stay zero).

    Rows in `skip` (already known to be bad) are not read. A path listed in several rows (an image with several
    captions) is decoded once and copied. `progress` None: a bar only on a terminal.
    """
    skip = skip or set()
    images = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    failed: dict[int, str] = {}
    first: dict[str, int] = {}  # path -> the first row that lists it
    copies = [(row, first.setdefault(paths[row], row)) for row in range(len(paths)) if row not in skip]
    rows = list(first.values())
    disable = None if progress is None else not progress
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL releases the GIL while decoding
        results = pool.map(lambda row: decode_image(paths[row], size, max_pixels), rows, chunksize=64)
        bar = tqdm(zip(rows, results), total=len(rows), desc="decoding images", disable=disable, mininterval=1.0)
        for row, result in bar:
            if isinstance(result, str):
                failed[row] = result
            else:
                images[row] = result
    copies = [(row, source) for row, source in copies if row != source]
    failed.update({row: failed[source] for row, source in copies if source in failed})
    if copies:
        targets, sources = (torch.tensor(column) for column in zip(*copies))
        images[targets] = images[sources]
    return images, failed


class DecodedCorpus(CsvCorpus):
    """`CsvCorpus` whose images come from `decoded` ([N, 3, S, S] uint8) instead of the files; `failed` maps
    the rows that could not be decoded to the reason, reported like the file reader reports them."""

    def __init__(self, *args, decoded: torch.Tensor, failed: dict[int, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decoded = decoded
        self.failed = failed

    def fill_images(self, sample: dict, index: int) -> None:
        if index in self.failed:
            sample["bad"] = self.failed[index]
            return
        sample["image"] = self.augment(self.decoded[index], sample)
        if self.views == 2:
            sample["image_view2"] = self.transform(self.decoded[index])
