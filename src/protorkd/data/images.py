"""Decoded images as 8-bit RGB, whatever their bit depth, and the limits that keep untrusted images cheap.

Pillow's `convert("RGB")` clips instead of scaling high-depth images: a 16-bit grayscale PNG (mode
`I;16`) with value 32768 becomes 255, so every such photo turns pure white. `to_rgb` scales them first:

| mode | read as | 8-bit value |
|---|---|---|
| `I;16`, `I;16L`, `I;16B`, `I;16N` | 16-bit unsigned | round(v * 255 / 65535) |
| `I` (32-bit) within [0, 65535] | 16-bit (Pillow opens some 16-bit PNG / TIFF so) | round(v * 255 / 65535) |
| `I` outside [0, 65535] | its own range | round((v - min) * 255 / (max - min)) |
| `F` within [0, 1] | a fraction | round(v * 255) |
| `F` outside [0, 1] | its own range | round((v - min) * 255 / (max - min)) |

16-bit RGB(A) PNGs (48/64-bit) need nothing: Pillow opens them as 8-bit `RGB`/`RGBA` with the high byte of
each sample (65535 -> 255, 32768 -> 128). Every other mode goes through Pillow's own `convert("RGB")`.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")

# Pillow's own decompression-bomb warning threshold (~89.5 MP); gather-cc's --max-pixels and the training
# reader's --max-image-pixels default to it. Pillow itself refuses images above twice this.
DEFAULT_MAX_PIXELS = 89_478_485
# Pillow raises DecompressionBombError above twice its warning threshold: no larger limit can be honoured.
PILLOW_MAX_PIXELS = 2 * DEFAULT_MAX_PIXELS
# The largest webdataset member (image or caption) the training reader reads: gather-cc's --max-bytes.
DEFAULT_MAX_MEMBER_BYTES = 20_000_000

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(image: Image.Image) -> Image.Image:
    """Scale an `I;16*`, `I` or `F` image to an 8-bit `L` image (see the module table); others unchanged."""
    if image.mode not in (*SIXTEEN_BIT_MODES, "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = (0.0, 1.0) if values.size == 0 or (values.min() >= 0 and values.max() <= 1) else _range(values)
    elif image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        low, high = _range(values)
    else:
        low, high = 0.0, 65535.0
    scaled = np.nan_to_num(np.floor((values - low) * (255.0 / max(high - low, 1e-12)) + 0.5), nan=0.0)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def _range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: high-depth modes scaled (`to_8bit`), everything else through Pillow's `convert("RGB")`."""
    return to_8bit(image).convert("RGB")


def too_many_pixels(image: Image.Image, max_pixels: int) -> str | None:
    """A bad-sample reason when the (not yet decoded) image has more than `max_pixels` pixels, else None."""
    width, height = image.size
    if width * height > max_pixels:
        return f"too many pixels ({width}x{height} > --max-image-pixels {max_pixels})"
    return None


class TooManyPixels(ValueError):
    """An image over the pixel limit, refused from its header before it is decoded (the reason is the text)."""


class NotARegularFile(OSError):
    """A path that is a FIFO, a device, a socket or a folder: reading it could wait forever (the reason is the text)."""


_FILE_TYPES = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
               stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}  # fmt: skip


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """`open(path, "rb")` for a regular file only; anything else raises NotARegularFile without blocking.

    The file is opened with O_NONBLOCK (opening a FIFO for reading otherwise waits for a writer, and reading
    /dev/stdin or a terminal waits for input), its type checked on the open descriptor (no race with a rename),
    then switched back to blocking reads."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_TYPES.items() if test(mode)), "not a regular file")
            raise NotARegularFile(f"not a regular file ({kind})")
        os.set_blocking(fd, True)
        raw = io.FileIO(fd, "rb", closefd=True)
        raw.name = os.fspath(path)  # errors name the file, not a descriptor number that differs from call to call
        return io.BufferedReader(raw)
    except BaseException:
        os.close(fd)
        raise


def read_image(path: str, max_pixels: int, use: Callable[[Image.Image], T]) -> T:
    """`use(image)` on the decoded image at `path` while it is open. Raises TooManyPixels (checked from the
    header, Pillow's own bomb warning silenced), NotARegularFile (a FIFO, a device: never waited on) and whatever
    Pillow raises for missing or corrupt files."""
    handle = open_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides below
            image = Image.open(handle)
    except BaseException:
        handle.close()
        raise
    with handle, image:
        reason = too_many_pixels(image, max_pixels)
        if reason is not None:
            raise TooManyPixels(reason)
        image.load()
        return use(image)
