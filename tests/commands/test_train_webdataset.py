"""Training streams webdataset shards with the same flags and bad-sample accounting as the TSV corpus."""

from __future__ import annotations

from pathlib import Path

import torch
import webdataset as wds

from protorkd.cli import main
from tests.conftest import TINY_MODEL_ARGS


def _write_shards(corpus: Path, folder: Path, *, corrupt: int | None = None) -> str:
    lines = (corpus / "train.tsv").read_text().splitlines()[1:]
    folder.mkdir()
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=48, verbose=0) as sink:
        for i, line in enumerate(lines):
            path, caption = line.split("\t")
            image = b"not an image" if i == corrupt else (corpus / path).read_bytes()
            sink.write({"__key__": f"{i:09d}", "jpg": image, "txt": caption})
    return str(folder / "{00000..00001}.tar")


def test_training_from_webdataset_shards(tiny_corpus, tmp_path):
    shards = _write_shards(tiny_corpus, tmp_path / "shards", corrupt=5)
    args = [
        "train",
        "--train-data",
        shards,
        "--train-num-samples",
        "96",
        "--eval-data-dir",
        str(tiny_corpus / "eval"),
        "--logs",
        str(tmp_path),
        "--name",
        "wds",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--max-bad-fraction",
        "0.05",
        *TINY_MODEL_ARGS,
    ]
    assert main(args) == 0
    log_text = (tmp_path / "wds" / "out.log").read_text()
    assert "webdataset shards, 96 samples per epoch" in log_text
    assert "skipped shard 00000.tar key 000000005: unreadable image" in log_text
    checkpoint = torch.load(tmp_path / "wds" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert checkpoint["optimizer"]["state"][0]["step"] == 12  # 96 samples / 16 per batch x 2 epochs
    assert "zeroshot/shapes/top1" in (tmp_path / "wds" / "results.jsonl").read_text()


def test_webdataset_needs_a_sample_count(tiny_corpus, tmp_path, capsys):
    shards = _write_shards(tiny_corpus, tmp_path / "shards")
    args = [
        "train",
        "--train-data",
        shards,
        "--logs",
        str(tmp_path),
        "--name",
        "wds",
        "--batch-size",
        "16",
        *TINY_MODEL_ARGS,
    ]
    assert main(args) == 2
    assert "--train-num-samples" in capsys.readouterr().err
    assert not (tmp_path / "wds").exists()
