"""Turn downloaded bytes into a training JPEG: decode safely, filter, shrink, write atomically.

Runs in worker threads (Pillow releases the GIL while decoding, resampling and encoding), so the
download event loop never waits on an image. Every rejection is a short reason string that
`stats.json` counts: not_an_image, decode_error, too_many_pixels, too_small, bad_aspect.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageOps

from protorkd.data.images import DEFAULT_MAX_PIXELS, to_8bit
from protorkd.io import replace

__all__ = ["DEFAULT_MAX_PIXELS", "ImageOutcome", "decode_bytes_at_most", "process_image"]


def decode_bytes_at_most(max_pixels: int) -> int:
    """The memory one decode may take: Pillow holds a decoded RGB(A) image at 4 bytes a pixel, and the
    shrunk copies made from it are small (a JPEG is even decoded at a reduced scale); 10% on top."""
    return max_pixels * 4 * 11 // 10


@dataclass(frozen=True)
class ImageOutcome:
    """`reason` is "ok" or a rejection kind; sizes are (0, 0) when the header could not be read."""

    reason: str
    width: int = 0
    height: int = 0
    original_width: int = 0
    original_height: int = 0


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB (16-bit and float images scaled, not clipped), with transparent areas on white (logos and
    PNG cut-outs would otherwise turn black)."""
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def process_image(
    data: bytes,
    destination: Path,
    tmp_path: Path,
    *,
    max_side: int,
    min_side: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    quality: int = 90,
) -> ImageOutcome:
    """Decode `data`, reject or shrink it, and write `destination` as a JPEG via `tmp_path` + an fsynced rename.

    The size checks use the source image (after EXIF rotation): short side < `min_side` -> too_small,
    short side < long side / 3 -> bad_aspect (the original gather_cc.py rule). Accepted images are
    shrunk (never enlarged) so the longer side is at most `max_side`, with bicubic resampling.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `max_pixels` decides below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return ImageOutcome("too_many_pixels")
    except Exception:  # Pillow raises many types (UnidentifiedImageError, SyntaxError, struct.error) on garbage
        return ImageOutcome("not_an_image")
    with image:
        stored_width, stored_height = image.size
        if stored_width * stored_height > max_pixels:
            return ImageOutcome("too_many_pixels", original_width=stored_width, original_height=stored_height)
        width, height = (stored_height, stored_width) if _exif_rotates(image) else (stored_width, stored_height)
        short, long = min(width, height), max(width, height)
        if short < min_side:
            return ImageOutcome("too_small", original_width=width, original_height=height)
        if short * 3 < long:
            return ImageOutcome("bad_aspect", original_width=width, original_height=height)
        try:
            # JPEG only: decode at a reduced DCT scale, still >= 2x the final size (as Image.thumbnail does).
            scale = min(1.0, max_side / long)
            image.draft("RGB", (math.ceil(stored_width * scale) * 2, math.ceil(stored_height * scale) * 2))
            image = _upright(image)
            image.load()  # at the draft's scale, so thumbnail's own draft cannot reduce it further
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            image = _to_rgb(image)  # fully decoded from here on
        except Exception:  # truncated or corrupt pixel data: OSError, SyntaxError, ValueError, ...
            return ImageOutcome("decode_error", original_width=width, original_height=height)
    # Outside the try: a full disk or a missing folder must stop the run, not be counted as bad images.
    image.save(tmp_path, format="JPEG", quality=quality)
    replace(tmp_path, destination)  # fsync, rename, fsync the folder
    return ImageOutcome("ok", image.width, image.height, width, height)


def _exif_rotates(image: Image.Image) -> bool:
    """True when the EXIF orientation turns the image by 90 degrees (sides swap after exif_transpose)."""
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except Exception:  # a corrupt EXIF block does not make the pixels unusable
        return False


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the image as stored. The image itself when it
    needs no turn (Pillow's exif_transpose returns a full-size copy even then: twice the memory of a decode)."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except (ValueError, TypeError, KeyError, SyntaxError):
        return image
