"""webdataset round trip: gather-cc --format webdataset writes shards, webdataset_loader reads them back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from protorkd.data.gather_cc import gather_cc
from protorkd.data.webdataset_corpus import webdataset_loader
from protorkd.errors import BadDataError, UsageError
from tests.support.gather_server import LOCAL, write_tsv


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A tiny deterministic transform: 16x16, [3, 16, 16] floats in [0, 1]."""
    data = torch.frombuffer(bytearray(image.resize((16, 16)).tobytes()), dtype=torch.uint8)
    return data.view(16, 16, 3).permute(2, 0, 1).float() / 255


CAPTIONS = [f"photo number {i}" for i in range(10)]


@pytest.fixture(scope="module")
def shards(image_server, tmp_path_factory) -> tuple[Path, dict]:
    """10 good rows and 2 dead ones, 4 input rows per shard -> 00000.tar .. 00002.tar."""
    rows = [(caption, f"/jpg/{600 + i}x{400 + i}") for i, caption in enumerate(CAPTIONS)]
    rows.insert(3, ("a dead link", "/status/404"))
    rows.insert(7, ("a tracking pixel", "/jpg/4x4"))
    tmp = tmp_path_factory.mktemp("wds")
    tsv = write_tsv(tmp / "cc.tsv", image_server, rows)
    stats = gather_cc(tsv, tmp / "out", output_format="webdataset", shard_size=4, **{**LOCAL, "max_bytes": 20_000_000})
    return tmp / "out", stats


def test_gather_cc_writes_shards_in_input_order_with_jpg_txt_json(shards):
    out, stats = shards
    assert stats["outputs"] == {
        "shards": "{00000..00002}.tar",
        "num_shards": 3,
        "num_samples": 10,
        "sizes": "sizes.json",
    }
    assert stats["failures"] == {"http_404": 1, "too_small": 1}
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 4}
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000001.json").read())
        image = Image.open(io.BytesIO(tar.extractfile("000000001.jpg").read()))
        caption = tar.extractfile("000000001.txt").read().decode()
    assert names == [f"00000000{row}.{ext}" for row in (0, 1, 2) for ext in ("jpg", "json", "txt")]
    assert caption == CAPTIONS[1] and image.format == "JPEG" and image.size == (512, 342)
    assert meta["row"] == 1 and meta["caption"] == CAPTIONS[1] and meta["url"].endswith("/jpg/601x401")
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (512, 342, 601, 401)


def test_reader_yields_every_sample_once_per_epoch_without_resampling(shards):
    out, _ = shards
    loader = webdataset_loader(
        str(out / "{00000..00002}.tar"),
        image_transform=to_tensor,
        batch_size=4,
        num_samples=10,
        resampled=False,
        drop_last=False,
        seed=1,
    )
    batches = list(loader)
    assert len(loader) == 3 and [len(b["captions"]) for b in batches] == [4, 4, 2]
    assert sorted(c for b in batches for c in b["captions"]) == sorted(CAPTIONS)
    assert all(
        b["images"].shape == (len(b["captions"]), 3, 16, 16) and b["images"].dtype == torch.float32 for b in batches
    )
    indices = torch.cat([b["indices"] for b in batches])
    assert indices.dtype == torch.long and sorted(indices.tolist()) == list(range(10))
    assert all(b["bad"] == [] for b in batches)


def test_set_epoch_reshuffles_and_the_same_epoch_repeats(shards):
    out, _ = shards
    loader = webdataset_loader(
        str(out / "{00000..00002}.tar"),
        image_transform=to_tensor,
        batch_size=10,
        num_samples=10,
        resampled=False,
        drop_last=False,
        seed=1,
    )
    first = [c for b in loader for c in b["captions"]]
    assert [c for b in loader for c in b["captions"]] == first
    loader.set_epoch(1)
    assert [c for b in loader for c in b["captions"]] != first


def test_resampled_ranks_get_full_batches_and_different_streams(shards):
    out, _ = shards
    streams = []
    for rank in (0, 1):
        loader = webdataset_loader(
            str(out / "{00000..00002}.tar"),
            image_transform=to_tensor,
            batch_size=3,
            num_samples=30,
            rank=rank,
            world_size=2,
            resampled=True,
            seed=0,
        )
        batches = list(loader)
        assert len(loader) == len(batches) == 5  # ceil(30 / (3 * 2))
        assert all(len(b["captions"]) == 3 for b in batches)
        streams.append([c for b in batches for c in b["captions"]])
    assert streams[0] != streams[1]


def test_two_workers_split_the_stream_and_indices_stay_unique(shards):
    out, _ = shards
    loader = webdataset_loader(
        str(out / "{00000..00002}.tar"),
        image_transform=to_tensor,
        batch_size=2,
        num_samples=12,
        workers=2,
        resampled=True,
        seed=0,
    )
    batches = list(loader)
    assert len(loader) == len(batches) == 6
    indices = torch.cat([b["indices"] for b in batches]).tolist()
    assert len(set(indices)) == 12


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def test_corrupt_samples_are_skipped_and_reported_with_shard_and_key(shards, tmp_path):
    out, _ = shards
    with tarfile.open(out / "00000.tar") as tar:
        good = tar.extractfile("000000000.jpg").read()
    _write_shard(
        tmp_path / "00007.tar",
        [
            {"__key__": "000000070", "jpg": good, "txt": "fine"},
            {"__key__": "000000071", "jpg": good[: len(good) // 3], "txt": "truncated image"},
            {"__key__": "000000072", "jpg": b"<html>not an image</html>", "txt": "html"},
            {"__key__": "000000073", "jpg": good, "txt": "   "},
            {"__key__": "000000074", "txt": "no image at all"},
            {"__key__": "000000075", "jpg": good, "txt": "also fine"},
        ],
    )
    loader = webdataset_loader(
        str(tmp_path / "00007.tar"),
        image_transform=to_tensor,
        batch_size=2,
        num_samples=2,
        resampled=False,
        shuffle_buffer=0,
    )
    (batch,) = list(loader)
    assert batch["captions"] == ["fine", "also fine"] and batch["images"].shape == (2, 3, 16, 16)
    reasons = dict(batch["bad"])
    assert list(reasons) == [f"shard 00007.tar key 00000007{k}" for k in (1, 2, 3, 4)]
    assert reasons["shard 00007.tar key 000000071"].startswith("unreadable image (OSError")
    assert reasons["shard 00007.tar key 000000072"].startswith("unreadable image (UnidentifiedImageError")
    assert reasons["shard 00007.tar key 000000073"] == "empty caption"
    assert reasons["shard 00007.tar key 000000074"] == "missing image"


def test_a_truncated_shard_is_reported_and_the_next_shard_still_read(shards, tmp_path):
    out, _ = shards
    data = (out / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "00001.tar").write_bytes((out / "00001.tar").read_bytes())
    loader = webdataset_loader(
        [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")],
        image_transform=to_tensor,
        batch_size=20,
        num_samples=20,
        resampled=False,
        drop_last=False,
        shuffle_buffer=0,
    )
    (batch,) = list(loader)
    assert set(CAPTIONS[3:6]) <= set(batch["captions"])
    assert any(source == "shard 00000.tar" and reason.startswith("unreadable shard") for source, reason in batch["bad"])


def test_resampling_only_unreadable_shards_raises_instead_of_hanging(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"this is not a tar file" * 100)
    loader = webdataset_loader(
        str(tmp_path / "00000.tar"), image_transform=to_tensor, batch_size=2, num_samples=4, resampled=True
    )
    with pytest.raises(BadDataError, match="shards in a row gave no sample"):
        list(loader)


def test_missing_shards_are_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="2 of 2 shards do not exist"):
        webdataset_loader(str(tmp_path / "{00000..00001}.tar"), image_transform=to_tensor, batch_size=2, num_samples=4)


def test_a_shard_caption_over_the_byte_limit_is_cut_and_logged(shards, tmp_path, caplog):
    out, _ = shards
    with tarfile.open(out / "00000.tar") as tar:
        good = tar.extractfile("000000000.jpg").read()
    long_caption = "ü" * 5000  # 10,000 bytes
    samples = [{"__key__": "000000080", "jpg": good, "txt": long_caption}, {"__key__": "1", "jpg": good, "txt": "ok"}]
    _write_shard(tmp_path / "00008.tar", samples)
    loader = webdataset_loader(
        str(tmp_path / "00008.tar"),
        image_transform=to_tensor,
        batch_size=2,
        num_samples=2,
        resampled=False,
        shuffle_buffer=0,
        max_caption_bytes=100,
    )
    (batch,) = list(loader)
    assert batch["captions"] == ["ü" * 50, "ok"]  # 100 bytes of 2-byte characters
    assert "1 captions longer than 100 bytes cut to that length" in caplog.text and "key 000000080" in caplog.text
