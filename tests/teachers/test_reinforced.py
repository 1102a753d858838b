"""The reinforced teacher cache (--teacher-views): the student replays exactly the view the teacher encoded, the
cached features are the online teacher's on that view, and kills during the fill or mid-epoch resume exactly."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from protorkd.cli import main
from protorkd.config import add_config_arguments, config_from_namespace
from protorkd.distributed import DistState
from protorkd.teachers.features import OnlineImageTeacher
from protorkd.teachers.reinforced import ReinforcedFeatures
from protorkd.train.run import build_run
from tests.commands.test_train import _assert_same_weights, _killed_at
from tests.commands.test_train_losses import clip_teacher_args
from tests.commands.test_train_losses import tiny_clip_checkpoint as _tiny_clip_checkpoint
from tests.conftest import tiny_train_args

tiny_clip_checkpoint = _tiny_clip_checkpoint  # the same session fixture: a CLIP teacher with weights from a file
VIEWS = 3


def kd_args(corpus, logs, name: str, checkpoint, *extra: str) -> list[str]:
    kd = ["--loss", "CLIP-KD", "--teacher", "none", *clip_teacher_args(checkpoint), "--teacher-views", str(VIEWS)]
    return tiny_train_args(corpus, logs, name, *kd, "--zeroshot-frequency", "0", *extra)


@pytest.mark.parametrize("in_memory", ["on", "off"])
def test_the_student_replays_the_view_the_teacher_encoded_and_the_cache_holds_the_online_feature(
    tiny_corpus, tiny_clip_checkpoint, tmp_path, monkeypatch, in_memory
):
    seen: list[torch.Tensor] = []  # what the teacher was given during the fill, in (image, view) order
    teachers: list[OnlineImageTeacher] = []
    call = OnlineImageTeacher.__call__

    def recording(self, images):
        seen.extend(images.clone())
        teachers.append(self)
        return call(self, images)

    monkeypatch.setattr(OnlineImageTeacher, "__call__", recording)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = kd_args(tiny_corpus, tmp_path, "run", tiny_clip_checkpoint, "--in-memory", in_memory)[1:]
    run = build_run(config_from_namespace(parser.parse_args(args)), DistState(), torch.device("cpu"))
    try:
        cache = run.task.teachers.extra["teacher_image_features"]
        assert isinstance(cache, ReinforcedFeatures) and cache.views == VIEWS and len(seen) == 96 * VIEWS
        teacher = teachers[0]  # the CLIP teacher's image tower, as the fill ran it
        dataset = run.batches.loader.dataset
        for epoch, position, row in ((0, 0, 5), (0, 1, 77), (3, 2, 5), (1, 9, 40)):
            sample = dataset[(epoch, position, row)]
            view, item = sample["view"], int(cache.rows[row])
            assert torch.equal(sample["image"], seen[item * VIEWS + view])  # bit for bit
            cached = cache.lookup(torch.tensor([row]), torch.tensor([view]))
            online = call(teacher, sample["image"][None])
            torch.testing.assert_close(cached, online, rtol=2e-3, atol=2e-3)  # fp16 storage
        picked = {dataset[(epoch, 0, 5)]["view"] for epoch in range(12)}
        assert picked == set(range(VIEWS))  # the view changes with the epoch
    finally:
        run.close()


@pytest.mark.slow
def test_kills_during_the_fill_and_mid_epoch_resume_to_the_uninterrupted_weights(
    tiny_corpus, tiny_clip_checkpoint, tmp_path
):
    common = ["--epochs", "2", "--in-memory", "on"]
    assert main(kd_args(tiny_corpus, tmp_path, "full", tiny_clip_checkpoint, *common)) == 0
    args = kd_args(tiny_corpus, tmp_path, "killed", tiny_clip_checkpoint, *common)
    root = tmp_path / "killed"
    _killed_at("teacher-cache-chunk=1", args)  # 64 of the 96 images' views stored
    (manifest,) = root.glob("cache/teacher-image-views-*/manifest.json")
    assert not json.loads(manifest.read_text())["complete"]
    assert [path.name for path in manifest.parent.glob("chunks/*.json")] == ["0.json"]
    _killed_at("train-step=8", [*args, "--resume", "latest"])  # epoch 2's second step
    assert "resuming reinforced teacher cache" in (root / "out.log").read_text()
    assert main([*args, "--resume", "latest"]) == 0
    for epoch in (1, 2):
        _assert_same_weights(
            root / "checkpoints" / f"epoch_{epoch}.pt", tmp_path / "full/checkpoints" / f"epoch_{epoch}.pt"
        )
    full = np.load(next((tmp_path / "full").glob("cache/teacher-image-views-*/features.npy")))
    assert np.array_equal(np.load(manifest.parent / "features.npy"), full)


@pytest.fixture(scope="module")
def micro_cnn_checkpoint(tmp_path_factory):
    """Weights of the image tower from a file: a locked image teacher that cache-teacher and train both rebuild."""
    from protorkd.models.tiny import CUSTOM_IMAGE_ARCHS

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("teachers") / "micro-cnn.pt"
    torch.save(CUSTOM_IMAGE_ARCHS.get("micro-cnn")()[0].state_dict(), path)
    return path


def test_a_cache_of_another_transform_is_refused_in_one_line(tiny_corpus, micro_cnn_checkpoint, tmp_path, capsys):
    image_teacher = ["--teacher", "image", "--image-model-tag", str(micro_cnn_checkpoint), "--zeroshot-frequency", "0"]
    cache = tmp_path / "cache"
    fill = tiny_train_args(tiny_corpus, tmp_path, "fill", *image_teacher, "--teacher-cache", str(cache))[1:]
    assert main(["cache-teacher", *fill, "--views", str(VIEWS)]) == 0
    (folder,) = cache.glob("teacher-image-views-*")
    flags = [*image_teacher, "--teacher-views", str(VIEWS), "--teacher-cache", str(folder)]
    assert main(tiny_train_args(tiny_corpus, tmp_path, "same", *flags, "--epochs", "1")) == 0  # the cache is read
    assert main(tiny_train_args(tiny_corpus, tmp_path, "other", *flags, "--augmentation", "pad-crop-flip")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"teacher cache {folder} does not match this run" in line and "pad-crop-flip" in line
    assert not (tmp_path / "other").exists()


def test_shards_fill_one_cache_side_by_side_as_one_process_does(
    tiny_corpus, micro_cnn_checkpoint, tmp_path, capsys, monkeypatch
):
    image_teacher = ["--teacher", "image", "--image-model-tag", str(micro_cnn_checkpoint), "--zeroshot-frequency", "0"]

    def fill(cache, *extra):
        args = tiny_train_args(tiny_corpus, tmp_path, "fill", *image_teacher, "--teacher-cache", str(cache))[1:]
        return main(["cache-teacher", *args, "--views", str(VIEWS), *extra])

    assert fill(tmp_path / "one") == 0
    with monkeypatch.context() as env:  # what torchrun sets for the second of two processes
        env.setenv("RANK", "1"), env.setenv("WORLD_SIZE", "2"), env.setenv("LOCAL_RANK", "1")
        assert fill(tmp_path / "sharded", "--shard", "auto") == 0  # chunk 1 (images 64-95) only
    assert "shard 1/2 filled; other shards' chunks are still missing" in capsys.readouterr().out
    (folder,) = (tmp_path / "sharded").glob("teacher-image-views-*")
    assert not json.loads((folder / "manifest.json").read_text())["complete"]
    assert fill(tmp_path / "sharded", "--shard", "0/2") == 0  # the last shard completes the cache
    assert json.loads((folder / "manifest.json").read_text())["complete"]
    (reference,) = (tmp_path / "one").glob("teacher-image-views-*")
    for name in ("views.npy", "features.npy", "rows.npy"):
        assert np.array_equal(np.load(folder / name), np.load(reference / name)), name
    assert fill(tmp_path / "x", "--shard", "2/2") == 2
    with pytest.raises(SystemExit, match="2"):  # argparse's range check
        fill(tmp_path / "x", "--shard", "0/2", "--views", "0")


def test_one_cache_serves_every_training_seed_and_another_view_seed_is_refused(
    tiny_corpus, micro_cnn_checkpoint, tmp_path, capsys
):
    """The views are drawn with --teacher-views-seed, the cache's own: runs of --seed 0 and 1 read one cache under
    one --teacher-cache root (the loss study's 3 seeds had been refused by a seed-0 cache)."""
    image_teacher = ["--teacher", "image", "--image-model-tag", str(micro_cnn_checkpoint), "--zeroshot-frequency", "0"]
    flags = [*image_teacher, "--teacher-views", str(VIEWS), "--teacher-cache", str(tmp_path / "cache"), "--epochs", "1"]
    assert main(tiny_train_args(tiny_corpus, tmp_path, "seed0", *flags)) == 0
    assert main(tiny_train_args(tiny_corpus, tmp_path, "seed1", *flags, "--seed", "1")) == 0
    (folder,) = (tmp_path / "cache").glob("teacher-image-views-*")  # no second fill
    assert main(tiny_train_args(tiny_corpus, tmp_path, "other", *flags, "--teacher-views-seed", "1")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"teacher cache {folder} does not match this run" in line and "seed: cache has 0, this run needs 1" in line
