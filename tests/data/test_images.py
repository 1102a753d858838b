"""High-depth images become 8-bit by scaling, in every reader; oversized images and members are bad samples."""

from __future__ import annotations

import io
import struct
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protorkd.data.gather_image import process_image
from protorkd.data.images import DEFAULT_MAX_PIXELS, to_rgb
from protorkd.data.transforms import image_transform
from protorkd.data.tsv import CsvCorpus
from protorkd.data.webdataset_corpus import webdataset_loader

# 16-bit value -> 8-bit value, by hand: round(v * 255 / 65535)
SIXTEEN_BIT = {0: 0, 257: 1, 25700: 100, 32768: 128, 65535: 255}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, *, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG written by hand (Pillow cannot write 48-bit RGB): `rows` yields each row's raw sample bytes."""
    compressor = zlib.compressobj()
    data = b"".join(compressor.compress(b"\0" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def rgb48(values: list[int]) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, one row, pixel i gray with 16-bit value values[i]."""
    row = b"".join(struct.pack(">HHH", v, v, v) for v in values)
    return png(len(values), 1, bit_depth=16, color_type=2, rows=[row])


def gray16(values: list[int]) -> bytes:
    """A 16-bit grayscale PNG, one row."""
    return png(len(values), 1, bit_depth=16, color_type=0, rows=[b"".join(struct.pack(">H", v) for v in values)])


def _first_channel(image: Image.Image) -> list[int]:
    return np.asarray(to_rgb(image))[0, :, 0].tolist()


@pytest.mark.parametrize("encode", [gray16, rgb48], ids=["16-bit gray PNG", "48-bit RGB PNG"])
def test_sixteen_bit_pngs_scale_to_eight_bits(encode):
    with Image.open(io.BytesIO(encode(list(SIXTEEN_BIT)))) as image:
        assert _first_channel(image) == list(SIXTEEN_BIT.values())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_modes_scale_to_eight_bits(mode):
    values = np.array([list(SIXTEEN_BIT)], dtype={"I;16B": ">u2", "I": "<i4"}.get(mode, "<u2"))
    image = Image.frombytes(mode, (values.shape[1], 1), values.tobytes())
    assert _first_channel(image) == list(SIXTEEN_BIT.values())
    assert image.convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # what Pillow alone does: clipped white


def test_float_and_wide_integer_images_scale_by_their_range():
    fractions = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert _first_channel(fractions) == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1000.0, 0.0, 1000.0]], dtype=np.float32), mode="F")
    assert _first_channel(wide) == [0, 128, 255]
    large = Image.frombytes("I", (3, 1), np.array([[0, 100_000, 200_000]], dtype="<i4").tobytes())
    assert _first_channel(large) == [0, 128, 255]


def _flat_transform(size: int):
    """Resize to `size` and nothing else: a flat image's pixel survives as value / 255."""
    return image_transform(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=False)


def test_training_reader_scales_a_sixteen_bit_photo(tmp_path):
    path = tmp_path / "scan.png"
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(path)
    corpus = CsvCorpus([str(path)], ["a scan"], _flat_transform(16))
    sample = corpus[0]
    assert sample["bad"] is None
    assert torch.allclose(sample["image"], torch.full((3, 16, 16), 128 / 255))


def test_gather_stores_a_sixteen_bit_photo_as_mid_gray(tmp_path):
    data = png(80, 80, bit_depth=16, color_type=2, rows=[struct.pack(">HHH", 32768, 32768, 32768) * 80] * 80)
    outcome = process_image(data, tmp_path / "out.jpg", tmp_path / "tmp.jpg", max_side=64, min_side=8)
    assert outcome.reason == "ok"
    with Image.open(tmp_path / "out.jpg") as stored:
        assert stored.getpixel((30, 30)) == (128, 128, 128)


def _huge_gray_png(path: Path, width: int, height: int) -> None:
    """A PNG of width x height black pixels, written row by row (a few hundred kB on disk)."""
    path.write_bytes(png(width, height, bit_depth=8, color_type=0, rows=(bytes(width) for _ in range(height))))


def test_training_reader_refuses_an_image_over_the_pixel_limit_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _huge_gray_png(path, 10_000, 9_000)  # 90 MP: just over the default limit (gather-cc's --max-pixels)
    assert path.stat().st_size < 1_000_000 and 10_000 * 9_000 > DEFAULT_MAX_PIXELS
    corpus = CsvCorpus([str(path)], ["a bomb"], _flat_transform(16))
    tracemalloc.start()
    sample = corpus[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sample["bad"] == f"too many pixels (10000x9000 > --max-image-pixels {DEFAULT_MAX_PIXELS})"
    assert peak < 20_000_000  # never decoded (90 MB of pixels)
    small = CsvCorpus([str(path)], ["a bomb"], _flat_transform(16), max_pixels=50)
    good = tmp_path / "small.png"
    Image.new("L", (10, 10)).save(good)
    small.images = [str(good)]
    assert small[0]["bad"] == "too many pixels (10x10 > --max-image-pixels 50)"


def _shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(value: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (value, value, value)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _all_batches(shard: Path, **limits) -> tuple[list[str], list]:
    loader = webdataset_loader(
        str(shard),
        image_transform=_flat_transform(8),
        batch_size=1,
        num_samples=8,
        resampled=False,
        drop_last=False,
        shuffle_buffer=0,
        **limits,
    )
    captions, bad = [], []
    for batch in loader:
        captions += batch["captions"]
        bad += batch["bad"]
    return captions, bad


def test_shard_reader_scales_sixteen_bits_and_skips_oversized_members_without_reading_them(tmp_path):
    big = 30_000_000
    _shard(
        tmp_path / "00000.tar",
        [
            ("000001.png", gray16([32768] * 16)),
            ("000001.txt", b"a scan"),
            ("000002.jpg", b"\xff" * big),
            ("000002.txt", b"a huge member"),
            ("000003.jpg", _jpeg()),
            ("000003.txt", b"caf\xe9 latin-1"),
            ("000004.jpg", _jpeg()),
            ("000004.txt", b"fine"),
        ],
    )
    tracemalloc.start()
    captions, bad = _all_batches(tmp_path / "00000.tar", max_member_bytes=1_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert captions == ["a scan", "fine"]
    assert bad == [
        ("shard 00000.tar key 000002", f"member .jpg of {big} bytes (> --max-member-bytes 1000000)"),
        ("shard 00000.tar key 000003", "caption not UTF-8 (byte 0xe9 at 4)"),
    ]
    assert peak < big // 3  # the 30 MB member was skipped, not read
    loader = webdataset_loader(
        str(tmp_path / "00000.tar"),
        image_transform=_flat_transform(8),
        batch_size=1,
        num_samples=1,
        resampled=False,
        shuffle_buffer=0,
    )
    scan = next(iter(loader))
    assert torch.allclose(scan["images"], torch.full((1, 3, 8, 8), 128 / 255))


def test_shard_reader_refuses_an_image_over_the_pixel_limit(tmp_path):
    small = io.BytesIO()
    Image.new("RGB", (5, 5)).save(small, format="PNG")
    members = [("000001.jpg", _jpeg()), ("000001.txt", b"twenty by twenty")]
    _shard(tmp_path / "00000.tar", [*members, ("000002.png", small.getvalue()), ("000002.txt", b"five by five")])
    captions, bad = _all_batches(tmp_path / "00000.tar", max_pixels=100)
    assert captions == ["five by five"]
    assert bad == [("shard 00000.tar key 000001", "too many pixels (20x20 > --max-image-pixels 100)")]


@pytest.fixture
def fails_after():
    """A deadline for code that used to hang: SIGALRM interrupts even a blocking open() (PEP 475 retries it
    only when the handler returns), so a regression fails in seconds instead of hanging the suite."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("still blocked after the deadline: a FIFO was opened for reading")

    previous = signal.signal(signal.SIGALRM, expired)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_in_a_tsv_row_is_a_bad_sample_with_its_reason_not_a_hang(tmp_path, fails_after):
    """Issue 25: a FIFO (or /dev/stdin with no writer) as an image path waited forever for a writer."""
    import os

    from protorkd.data.decoded_corpus import decode_image

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    fails_after(20)
    sample = CsvCorpus([str(fifo)], ["a red circle"], _flat_transform(32))[0]
    assert sample["bad"] == "not a regular file (a FIFO)" and sample["image"] is None
    assert decode_image(str(fifo), 32) == "not a regular file (a FIFO)"  # the in-memory corpus' reader
    assert CsvCorpus([str(tmp_path)], ["a folder"], _flat_transform(32))[0]["bad"] == ("not a regular file (a folder)")


def test_a_fifo_in_an_evaluation_root_is_unreadable_with_its_reason(tmp_path, fails_after):
    import os

    from protorkd.eval.datasets import UnreadableImage, load_image

    fifo = tmp_path / "cat_0001.jpg"
    os.mkfifo(fifo)
    fails_after(20)
    assert load_image(fifo, lambda image: image) == UnreadableImage(
        str(fifo), "NotARegularFile: not a regular file (a FIFO)"
    )


def test_a_decode_needs_no_copy_of_an_image_that_needs_no_turn(tmp_path):
    """gather-cc: exif_transpose copied every image (81 MP: 324 MB more); an upright one is now used as is."""
    from protorkd.data.gather_image import _upright

    path = tmp_path / "upright.jpg"
    Image.new("RGB", (40, 30)).save(path)
    with Image.open(path) as image:
        assert _upright(image) is image
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise
    Image.new("RGB", (40, 30)).save(path, exif=exif)
    with Image.open(path) as image:
        assert _upright(image).size == (30, 40)
