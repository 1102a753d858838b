"""`protorkd embed`: one row per readable input, equal to the model's own `encode_*`; a parallel ids file; the
unreadable inputs skipped and counted as training counts them."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import protorkd
from protorkd.cli import main
from tests.conftest import TINY_TOWERS, write_checkpoint

DIM = 64  # the tiny towers' joint width


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """micro-cnn + tiny-text, random weights: embed reads any model protorkd.load reads."""
    return write_checkpoint(TINY_TOWERS, tmp_path_factory.mktemp("embed_model"))


def embed_cli(*args: str) -> int:
    return main(["embed", *args, "--device", "cpu", "--workers", "0"])


@pytest.fixture
def image_folder(tiny_corpus, tmp_path):
    """Three demo images in nested folders, a corrupt .jpg, and a file that is not an image."""
    folder = tmp_path / "images"
    sources = sorted((tiny_corpus / "eval" / "shapes" / "test").rglob("*.jpg"))[:3]
    for index, source in enumerate(sources):
        target = folder / ("a" if index < 2 else "b/c") / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (folder / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_image_rows_are_encode_image_of_each_file_and_the_broken_one_is_skipped_and_named(
    model_path, image_folder, tmp_path, caplog
):
    out = tmp_path / "out" / "images.npy"
    with caplog.at_level(logging.WARNING):
        assert embed_cli("--model", str(model_path), "--images", str(image_folder), "--out", str(out),
                         "--max-bad-fraction", "0.5") == 0  # fmt: skip
    rows = np.load(out)
    ids = out.with_suffix(".ids.txt").read_text().splitlines()
    good = sorted(p for p in image_folder.rglob("*.jpg") if p.name != "broken.jpg")
    assert ids == [p.relative_to(image_folder).as_posix() for p in good] and rows.shape == (3, DIM)
    model, preprocess, _ = protorkd.load(model_path)
    with torch.no_grad():
        expected = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in good]), normalize=True)
    assert np.abs(rows - expected.numpy()).max() <= 1e-6
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any("1 unreadable samples of 4" in m for m in skipped)
    assert any("broken.jpg" in m and "unreadable image" in m for m in skipped)


def test_more_unreadable_inputs_than_the_bad_fraction_stop_in_one_line(model_path, image_folder, tmp_path, capsys):
    out = tmp_path / "images.npy"
    assert embed_cli("--model", str(model_path), "--images", str(image_folder), "--out", str(out)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "1 of 4 samples" in error and "broken.jpg" in error
    assert not out.exists()


def test_text_rows_are_encode_text_of_each_line_and_empty_lines_are_skipped(model_path, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\ntwo green squares on a blue field\n")
    out = tmp_path / "texts.npy"
    assert embed_cli("--model", str(model_path), "--texts", str(texts), "--out", str(out),
                     "--max-bad-fraction", "0.5") == 0  # fmt: skip
    assert out.with_suffix(".ids.txt").read_text().splitlines() == ["1", "3"]  # line numbers
    model, _, tokenizer = protorkd.load(model_path)
    with torch.no_grad():
        expected = model.encode_text(tokenizer(["a red circle", "two green squares on a blue field"]), normalize=True)
    assert np.abs(np.load(out) - expected.numpy()).max() <= 1e-6


def test_a_corpus_tsv_is_embedded_by_row_with_its_missing_images_counted(model_path, tiny_corpus, tmp_path, caplog):
    rows = (tiny_corpus / "train.tsv").read_text().splitlines()
    table = tmp_path / "corpus.tsv"
    missing = "filepath\ttitle\n" + rows[1] + "\n" + "nowhere.jpg\ta lost image\n" + rows[2] + "\n"
    table.write_text(missing.replace("images/", str(tiny_corpus / "images") + "/"))
    out = tmp_path / "corpus.npy"
    with caplog.at_level(logging.WARNING):
        assert embed_cli("--model", str(model_path), "--images", str(table), "--out", str(out),
                         "--max-bad-fraction", "0.5") == 0  # fmt: skip
    assert out.with_suffix(".ids.txt").read_text().splitlines() == ["1", "3"]  # row numbers
    assert np.load(out).shape == (2, DIM)
    assert any("row 2 (line 3)" in r.getMessage() and "missing image" in r.getMessage() for r in caplog.records)
