"""Fixtures: tiny ELEVATER datasets in the published on-disk format, and a tiny trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_train_args
from tests.support.elevater_data import balanced, write_coco_dataset, write_iris_dataset


@pytest.fixture(scope="session")
def elevater_root(tmp_path_factory) -> Path:
    """cifar10 (accuracy), caltech101 (mean per class, unbalanced test), hateful-memes (COCO, ROC-AUC),
    voc2007 (multi-label, 11-point mAP), each under classification/<prefix>_<date>/ like the download."""
    root = tmp_path_factory.mktemp("elevater")
    base = root / "classification"
    write_iris_dataset(
        base / "cifar_10_20211007",
        ["red_thing", "green thing", "blue thing"],
        {"train": ("train.txt", "train.zip", balanced(3, 5)), "test": ("test.txt", "val.zip", balanced(3, 2))},
    )
    write_iris_dataset(
        base / "caltech_101_20211007",
        ["red", "green", "blue"],
        {
            "train": ("train.txt", "train.zip", balanced(3, 4)),
            "test": ("test.txt", "test.zip", [(0,)] * 4 + [(1,)] + [(2,)] * 2),
        },
    )
    write_coco_dataset(
        base / "hateful_memes_20211014",
        {1: "meme", 2: "hatespeech meme"},
        {"train_meta.json": [1] * 5 + [2] * 5, "test_meta.json": [1, 2, 1, 2, 1, 2]},
    )
    multi = [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2), (0,), (1,), (2,), (0, 1)]
    write_iris_dataset(
        base / "voc2007_20211007",
        ["aeroplane", "bicycle", "bird"],
        {
            "train": ("train_ic.txt", "train.zip", multi),
            "test": ("test_ic.txt", "test.zip", [(0,), (1,), (2,), (0, 2)]),
        },
    )
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 1-epoch checkpoint of the tiny towers, in <experiment>/checkpoints/."""
    from protorkd.cli import main
    from protorkd.data.demo import write_demo_corpus

    base = tmp_path_factory.mktemp("elevater_run")
    corpus = write_demo_corpus(base / "corpus", size=32, seed=3, eval_per_class=2, progress=False)
    code = main(
        tiny_train_args(corpus, base / "logs", "run", "--epochs", "1", "--zeroshot-frequency", "0", eval_data=False)
    )
    assert code == 0
    return base / "logs" / "run" / "checkpoints" / "epoch_1.pt"
