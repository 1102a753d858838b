"""An in-memory decoded corpus: every image decoded once into one uint8 tensor, augmented on tensors.

For a corpus that fits a memory budget (the built-in demo: 10,240 images of 64 x 64 are 126 MB), decoding
a JPEG per sample per epoch in loader workers costs more than the small student's step. Here each image is
decoded once (threads, at start-up), resized so its shorter side is the tower's input size and centre
cropped to a square, and kept as `[N, 3, S, S]` uint8. Each epoch the samples are augmented on tensors
with the same torchvision v2 transform objects the file reader uses, seeded by (seed, epoch, position)
exactly like `CsvCorpus`, so the random crop parameters are those the file reader would draw.

Differences from reading files (docs/data.md): the random crop is taken from the stored S x S image, not
from the original file (identical when the files are already S x S, as in the demo corpus), and tensor
resampling (bicubic, antialiased) is not bit-identical to PIL's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

log = logging.getLogger(__name__)


def decoded_bytes(rows: int, image_size: int) -> int:
    """Memory of `rows` decoded square uint8 RGB images of side `image_size`."""
    return rows * 3 * image_size * image_size


def _decode(path: str, size: int) -> torch.Tensor | str:
    """[3, size, size] uint8: shorter side resized to `size` (bicubic), centre crop; or the reason it failed."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError:
        return "missing image"
    except Exception as error:  # PIL raises many types for corrupt or truncated files
        return f"unreadable image ({type(error).__name__}: {error})"
    tensor = TF.pil_to_tensor(rgb)
    if tensor.shape[1:] != (size, size):
        tensor = TF.resize(tensor, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        tensor = TF.center_crop(tensor, [size, size])
    return tensor


def decode_images(
    paths: Sequence[str], size: int, *, threads: int = 2, progress: bool | None = None
) -> tuple[torch.Tensor, dict[int, str]]:
    """([N, 3, size, size] uint8 images, {row: reason} of the rows that could not be decoded, left zero)."""
    images = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    bad: dict[int, str] = {}
    with ThreadPoolExecutor(max(1, threads)) as pool:
        decoded = pool.map(lambda path: _decode(path, size), paths, chunksize=64)
        disable = None if progress is None else not progress  # None: a bar only on a terminal
        bar = tqdm(decoded, total=len(paths), desc="decoding images", disable=disable, unit="image", mininterval=1.0)
        for row, result in enumerate(bar):
            if isinstance(result, str):
                bad[row] = result
            else:
                images[row] = result
    return images, bad


class DecodedCorpus(Dataset):
    """Row or (epoch, position, row) -> the same sample dict `CsvCorpus` returns, from decoded images.

    images: [N, 3, S, S] uint8; `transform` takes a uint8 image tensor (torchvision v2 transforms accept
    tensors and PIL images alike). `bad_rows` maps rows that could not be decoded to the reason.
    """

    def __init__(
        self,
        images: torch.Tensor,
        captions: list[str],
        paths: list[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        source: str,
        bad_rows: dict[int, str] | None = None,
        views: int = 1,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.captions = captions
        self.paths = paths
        self.transform = transform
        self.source = source
        self.bad_rows = bad_rows or {}
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.captions)

    def describe(self, index: int) -> str:
        return f"{self.source} row {index + 1} (line {index + 2}): {self.paths[index]}"

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict:
        if isinstance(key, tuple):
            epoch, position, index = key
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + position)  # as CsvCorpus
        else:
            index = key
        sample = {"index": index, "caption": self.captions[index], "image": None, "bad": None}
        if not sample["caption"]:
            sample["bad"] = "empty caption"
        elif index in self.bad_rows:
            sample["bad"] = self.bad_rows[index]
        else:
            sample["image"] = self.transform(self.images[index])
            if self.views == 2:
                sample["image_view2"] = self.transform(self.images[index])
        return sample
