"""The in-memory decoded corpus gives the samples the file reader gives, and reports bad images the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from protorkd.config import DataConfig
from protorkd.data.corpus import ShardCorpus, open_corpus
from protorkd.data.decoded_corpus import DecodedCorpus, decode_images, decoded_bytes
from protorkd.data.transforms import image_transform
from protorkd.data.tsv import CsvCorpus
from protorkd.errors import UsageError
from protorkd.train.data import in_memory_image_size

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_decoded_bytes_is_rows_times_three_channels_of_side_squared():
    assert decoded_bytes(10_240, 64) == 125_829_120  # the demo corpus: 120 MiB


def _corpora(tiny_corpus: Path, transform, size: int, *, corrupt: Path | None = None):
    corpus = open_corpus(str(tiny_corpus / "train.tsv"))
    images = list(corpus.images)
    if corrupt is not None:
        images[5] = str(corrupt)
    decoded, failed = decode_images(images, size, progress=False)
    files = CsvCorpus(images, corpus.captions, transform, seed=7)
    memory = DecodedCorpus(images, corpus.captions, transform, decoded=decoded, failed=failed, seed=7)
    return files, memory


def test_without_augmentation_the_samples_equal_the_file_readers_bit_for_bit(tiny_corpus):
    size = Image.open(open_corpus(str(tiny_corpus / "train.tsv")).images[0]).size[0]
    transform = image_transform(size, MEAN, STD, train=False)
    files, memory = _corpora(tiny_corpus, transform, size)
    for key in [(0, 0, 0), (1, 3, 17), (2, 9, 95)]:
        assert torch.equal(files[key]["image"], memory[key]["image"])


def test_training_crops_are_the_crops_the_file_reader_draws(tiny_corpus):
    """Same (seed, epoch, position) -> same crop box; only the resampling differs (tensor vs PIL bicubic).
    A different crop of these scenes differs by far more than the resampling does (checked below)."""
    size = Image.open(open_corpus(str(tiny_corpus / "train.tsv")).images[0]).size[0]
    transform = image_transform(size, MEAN, STD, train=True)
    files, memory = _corpora(tiny_corpus, transform, size)
    for key in [(0, 0, 0), (1, 3, 17), (2, 9, 95)]:
        difference = (files[key]["image"] - memory[key]["image"]).abs().mean().item()
        assert difference < 0.02
        other_crop = (files[key]["image"] - memory[(key[0] + 5, key[1], key[2])]["image"]).abs().mean().item()
        assert other_crop > 5 * difference


def test_pad_crop_flip_samples_equal_the_file_readers_bit_for_bit(tiny_corpus):
    """No resampling in pad-crop-flip: the decoded corpus gives exactly the file reader's samples."""
    size = Image.open(open_corpus(str(tiny_corpus / "train.tsv")).images[0]).size[0]
    transform = image_transform(size, MEAN, STD, train=True, augmentation="pad-crop-flip")
    files, memory = _corpora(tiny_corpus, transform, size)
    for key in [(0, 0, 0), (1, 3, 17), (2, 9, 95)]:
        assert torch.equal(files[key]["image"], memory[key]["image"])
    assert not torch.equal(memory[(0, 0, 0)]["image"], memory[(5, 0, 0)]["image"])  # another epoch, another draw


def test_an_unreadable_image_is_a_bad_sample_with_the_file_readers_reason(tiny_corpus, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    size = 32
    transform = image_transform(size, MEAN, STD, train=False)
    files, memory = _corpora(tiny_corpus, transform, size, corrupt=corrupt)
    assert memory[5]["image"] is None
    assert memory[5]["bad"] == files[5]["bad"]
    assert memory[5]["bad"].startswith("unreadable image (UnidentifiedImageError")
    assert memory[6]["bad"] is None and tuple(memory[6]["image"].shape) == (3, size, size)


def test_images_of_another_size_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
    path = tmp_path / "wide.png"
    pixels = torch.zeros(3, 20, 40, dtype=torch.uint8)
    pixels[0, :, 10:30] = 255  # a red band exactly in the central 20 x 20 square
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
    decoded, failed = decode_images([str(path)], 10, progress=False)
    assert failed == {}
    assert decoded.shape == (1, 3, 10, 10)
    assert decoded[0, 0, :, 1:-1].min().item() >= 250  # all red after halving and cropping the centre
    assert decoded[0, 1:].max().item() <= 5


def test_a_path_listed_in_several_rows_is_decoded_once_and_copied_to_each(tmp_path, monkeypatch):
    import protorkd.data.decoded_corpus as memory

    red, blue, corrupt = tmp_path / "red.png", tmp_path / "blue.png", tmp_path / "corrupt.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(red)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(blue)
    corrupt.write_bytes(b"not an image")
    calls: list[str] = []
    decode = memory.decode_image
    monkeypatch.setattr(memory, "decode_image", lambda path, *args: calls.append(path) or decode(path, *args))
    paths = [str(p) for p in (red, blue, red, corrupt, blue, corrupt, red)]
    decoded, failed = decode_images(paths, 8, skip={6}, progress=False)
    assert sorted(calls) == sorted(map(str, (red, blue, corrupt)))  # each distinct path once; row 6 skipped
    assert [decoded[row, :, 0, 0].tolist() for row in (0, 1, 2, 4)] == [[255, 0, 0], [0, 0, 255]] * 2
    assert decoded[6].max().item() == 0  # a skipped row stays zero
    assert set(failed) == {3, 5} and failed[3] == failed[5]
    assert failed[3].startswith("unreadable image")


def test_in_memory_follows_the_flag_and_the_budget(tiny_corpus):
    corpus = open_corpus(str(tiny_corpus / "train.tsv"))  # 96 rows: 96 * 3 * 64 * 64 bytes = 1.125 MiB
    assert in_memory_image_size(DataConfig(in_memory="auto"), corpus, 64, loads_images=True) == 64
    assert in_memory_image_size(DataConfig(in_memory="off"), corpus, 64, loads_images=True) is None
    over_budget = DataConfig(in_memory="auto", in_memory_budget_mb=1)
    assert in_memory_image_size(over_budget, corpus, 64, loads_images=True) is None
    forced = DataConfig(in_memory="on", in_memory_budget_mb=1)
    assert in_memory_image_size(forced, corpus, 64, loads_images=True) == 64
    assert in_memory_image_size(DataConfig(in_memory="on"), corpus, 64, loads_images=False) is None


def test_in_memory_on_refuses_streamed_shards(tmp_path):
    shards = ShardCorpus(pattern=str(tmp_path / "shard-{000..001}.tar"), samples_per_epoch=10)
    with pytest.raises(UsageError, match="--in-memory on needs a TSV corpus"):
        in_memory_image_size(DataConfig(in_memory="on"), shards, 64, loads_images=True)
