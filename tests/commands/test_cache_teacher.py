"""`protorkd cache-teacher`: fills the cache training reads, resumes, refuses a mismatch, exports for ProtoCLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protorkd.cli import main
from protorkd.models.tiny import CUSTOM_TEXT_ARCHS, HashedBagOfWords
from tests.commands.test_train_losses import clip_teacher_args, last_step_line
from tests.commands.test_train_losses import tiny_clip_checkpoint as _tiny_clip_checkpoint
from tests.conftest import TINY_MODEL_ARGS

tiny_clip_checkpoint = _tiny_clip_checkpoint  # the same session fixture


@pytest.fixture(scope="session")
def tiny_text_checkpoint(tmp_path_factory) -> Path:
    """Pretrained-style weights for the tiny text teacher: a file, so caches are keyed by its digest."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teachers") / "tiny-text.pt"
    torch.save(CUSTOM_TEXT_ARCHS.get("tiny-text")().state_dict(), path)
    return path


def data_args(corpus: Path, text_checkpoint: Path) -> list[str]:
    return [
        "--train-data",
        str(corpus / "train.tsv"),
        *TINY_MODEL_ARGS,
        "--zeroshot-frequency",
        "0",
        "--text-model-tag",
        str(text_checkpoint),
    ]


def train(corpus, text_checkpoint, logs: Path, name: str, *extra: str) -> int:
    args = ["train", *data_args(corpus, text_checkpoint), "--logs", str(logs), "--name", name, "--batch-size", "16"]
    return main([*args, "--epochs", "1", *extra])


def test_training_reads_the_cache_instead_of_running_the_teachers(
    tiny_corpus, tiny_text_checkpoint, tiny_clip_checkpoint, tmp_path, capsys
):
    cache = tmp_path / "cache"
    teachers = [*clip_teacher_args(tiny_clip_checkpoint), "--clip-teacher-images", "cached"]
    assert (
        main(["cache-teacher", *data_args(tiny_corpus, tiny_text_checkpoint), "--teacher-cache", str(cache), *teachers])
        == 0
    )
    printed = capsys.readouterr().out
    assert all(f"{name}: {cache}" in printed for name in ("text", "clip-image", "clip-text"))
    assert len(list(cache.glob("*/manifest.json"))) == 3

    extra = ["--teacher-cache", str(cache), "--loss", "CLIP-KD", *teachers]
    assert train(tiny_corpus, tiny_text_checkpoint, tmp_path, "run", *extra) == 0
    log_text = (tmp_path / "run" / "out.log").read_text()
    assert "building teacher" not in log_text  # every teacher's features came from the cache
    assert f"teacher clip-image features: {cache}" in log_text and f"teacher text features: {cache}" in log_text
    assert " clip_kd_fd_loss " in last_step_line(log_text)


def test_interrupted_cache_teacher_resumes_where_it_stopped(tiny_corpus, tiny_text_checkpoint, tmp_path, monkeypatch):
    import protorkd.teachers.cache as teacher_cache

    args = ["cache-teacher", *data_args(tiny_corpus, tiny_text_checkpoint), "--cache-batch-size", "16"]
    assert main([*args, "--teacher-cache", str(tmp_path / "whole")]) == 0

    monkeypatch.setattr(teacher_cache, "CHUNK", 32)
    original, calls = HashedBagOfWords.forward, []

    def interrupted_after_two_chunks(self, tokens):
        calls.append(len(tokens["input_ids"]))
        if sum(calls) > 64:
            raise KeyboardInterrupt
        return original(self, tokens)

    monkeypatch.setattr(HashedBagOfWords, "forward", interrupted_after_two_chunks)
    assert main([*args, "--teacher-cache", str(tmp_path / "parts")]) == 130
    (folder,) = (tmp_path / "parts").glob("teacher-text-*")
    assert json.loads((folder / "manifest.json").read_text())["done"] == 64

    calls.clear()
    monkeypatch.setattr(HashedBagOfWords, "forward", lambda self, tokens: calls.append(1) or original(self, tokens))
    assert main([*args, "--teacher-cache", str(tmp_path / "parts")]) == 0
    assert len(calls) == 2  # only the last 32 captions, in two batches of 16
    (whole,) = (tmp_path / "whole").glob("teacher-text-*")
    assert whole.name == folder.name
    assert np.array_equal(np.load(whole / "features.npy"), np.load(folder / "features.npy"))


def test_a_cache_that_does_not_match_the_run_is_refused_with_the_reason(
    tiny_corpus, tiny_text_checkpoint, tmp_path, capsys
):
    assert (
        main(["cache-teacher", *data_args(tiny_corpus, tiny_text_checkpoint), "--teacher-cache", str(tmp_path / "c")])
        == 0
    )
    (folder,) = (tmp_path / "c").glob("teacher-text-*")
    capsys.readouterr()

    other_weights = tmp_path / "other.pt"
    torch.save({k: v + 1 for k, v in torch.load(tiny_text_checkpoint, weights_only=True).items()}, other_weights)
    args = ["--teacher-cache", str(folder), "--text-model-tag", str(other_weights)]
    assert train(tiny_corpus, tiny_text_checkpoint, tmp_path, "weights", *args) == 2
    err = capsys.readouterr().err
    assert f"teacher cache {folder} does not match this run (teacher: cache has" in err and "file:" in err
    assert not (tmp_path / "weights").exists()

    args = ["--teacher-cache", str(folder), "--dataset-size", "50"]
    assert train(tiny_corpus, tiny_text_checkpoint, tmp_path, "corpus", *args) == 2
    assert "corpus_sha256: cache has" in capsys.readouterr().err


def test_exported_pca_features_feed_protoclip_external_teacher(tiny_corpus, tiny_text_checkpoint, tmp_path, capsys):
    exported = tmp_path / "external.npy"
    args = ["cache-teacher", *data_args(tiny_corpus, tiny_text_checkpoint), "--teacher-cache", str(tmp_path / "c")]
    assert main([*args, "--export-npy", str(exported), "--pca-dim", "8"]) == 0
    features = np.load(exported)
    assert features.shape == (96, 8) and features.dtype == np.float32
    variances = features.var(axis=0)  # the PCA is fitted on every corpus row's normalised feature
    assert np.allclose(features.mean(axis=0), 0, atol=1e-4) and np.all(np.diff(variances) <= 1e-6)
    (folder,) = (tmp_path / "c").glob("teacher-text-*")
    assert json.loads((folder / "manifest.json").read_text())["pca"]["8"]["normalized"] is True

    protoclip = ["--loss", "ProtoCLIP", "--k", "8", "--PBT", "--external-teacher", str(exported)]
    assert train(tiny_corpus, tiny_text_checkpoint, tmp_path, "run", *protoclip, "--external-teacher-dim", "8") == 0
    log_text = (tmp_path / "run" / "out.log").read_text()
    assert "clustering of 96 samples (extraction pass over this episode)" in log_text
    assert " external/kmeans_error " in log_text and " text_external_ami " in log_text
    assert " proto_external_loss 0 " not in last_step_line(log_text)

    capsys.readouterr()
    assert train(tiny_corpus, tiny_text_checkpoint, tmp_path, "wide", *protoclip, "--external-teacher-dim", "64") == 2
    assert "shape (96, 8), this run needs (96, 64)" in capsys.readouterr().err
