"""ProtoCLIP's clustering phase in a real run: what is extracted, how it is labelled, what back translation makes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protorkd.config import add_config_arguments, config_from_namespace
from protorkd.data.sampling import EXTRACTION_STREAM, episode_indices
from protorkd.distributed import DistState
from protorkd.errors import UsageError
from protorkd.losses import main_loss
from protorkd.train.run import build_run
from tests.conftest import tiny_train_args

EPISODE = 40
K = 4


def tiny_run(corpus, logs, *flags: str):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = tiny_train_args(corpus, logs, "run", "--batch-size", "8", "--epochs", "1", *flags, eval_data=False)
    return build_run(config_from_namespace(parser.parse_args(args[1:])), DistState(), torch.device("cpu"))


def original_pbt(k: int, teacher_labels: np.ndarray, student_features: torch.Tensor) -> torch.Tensor:
    """megvii-research/protoclip src/training/clustering.py `Clustering.PBT`, transcribed."""
    n_sample, feature_dim = student_features.size()
    teacher_labels = teacher_labels[:n_sample]
    centroids = torch.zeros(k, feature_dim)
    for cluster in np.unique(teacher_labels):
        members = np.where(teacher_labels == cluster)[0]
        centroids[cluster] = torch.mean(student_features[members], dim=0)
    return centroids


@pytest.fixture
def locked_teacher_run(tiny_corpus, tmp_path):
    run = tiny_run(
        tiny_corpus,
        tmp_path,
        *["--loss", "ProtoCLIP", "--teacher", "text", "--PBT", "--k", str(K), "--episode-size", str(EPISODE)],
        *["--add-projection-head", "--projection-dim", "8", "--projection-hidden-dim", "16"],
    )
    yield run
    run.close()


def test_back_translation_with_a_locked_teacher_averages_the_students_own_features(locked_teacher_run, monkeypatch):
    import protorkd.precision as precision_module

    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: False)  # fp32: compare exactly
    run = locked_teacher_run
    loss, model = main_loss(run.task.loss), run.task.model
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    run.batches.set_epoch(0)
    run.clustering.run(run.task, None, 0, run.writer, step=0)
    assert model.training  # back in train mode, and the pass left BatchNorm statistics alone
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())

    # What ProtoCLIP's code clusters, computed here without the extraction code: every position of the episode,
    # through the training transform with the extraction pass's draw, the model in eval mode; the locked text
    # teacher's side from its feature cache through the (trainable) heads
    rows = episode_indices(96, EPISODE, seed=0, epoch=0)
    dataset = run.batches.loader.dataset
    images = torch.stack([dataset[(EXTRACTION_STREAM, p, int(rows[p]))]["image"] for p in range(EPISODE)])
    model.eval()
    with torch.no_grad():
        image = F.normalize(model.image_projection_head(model.image_head(model.image_tower(images))), dim=1)
        cached = run.task.teachers.tower.lookup(rows).float()
        text = F.normalize(model.text_projection_head(model.text_head(cached)), dim=1)
    model.train()

    assert bool(loss.keyed_by_position) and loss.text_labels.shape == (EPISODE,)  # one label per position
    text_labels, image_labels = loss.text_labels.numpy(), loss.image_labels.numpy()
    expected_image_space = original_pbt(K, text_labels, image)  # student IMAGE features over each TEXT cluster
    expected_text_space = original_pbt(K, image_labels, text)  # student TEXT features over each IMAGE cluster
    torch.testing.assert_close(loss.image_centroids_from_text, expected_image_space, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss.text_centroids_from_image, expected_text_space, atol=2e-5, rtol=1e-4)
    # the text clusters are clusters of the teacher's features, and translating them moves them into the image space
    distances = torch.cdist(text, loss.text_centroids)
    assert torch.equal(distances.argmin(dim=1), loss.text_labels)
    assert (loss.image_centroids_from_text - loss.text_centroids).norm(dim=1).min() > 0.1


def test_clustering_every_other_episode_with_position_keys_is_refused(tiny_corpus, tmp_path):
    with pytest.raises(UsageError, match="--clustering-frequency 2 with --episode-size"):
        tiny_run(
            tiny_corpus,
            tmp_path,
            "--loss",
            "ProtoCLIP",
            "--k",
            "4",
            "--episode-size",
            "40",
            "--clustering-frequency",
            "2",
        )


def test_projection_heads_without_a_clustering_loss_are_refused(tiny_corpus, tmp_path):
    with pytest.raises(UsageError, match="--add-projection-head: --loss InfoNCE"):
        tiny_run(tiny_corpus, tmp_path, "--loss", "InfoNCE", "--add-projection-head")


def _gather_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from protorkd import distributed
    from protorkd.train.clustering import EpisodeFeatures

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        features = EpisodeFeatures()
        for sizes in ((3, 0), (2, 4)):  # rank 1 has no readable sample in the first batch
            start = sum(sizes[:rank]) + (0 if sizes == (3, 0) else 10)
            keys = torch.arange(start, start + sizes[rank])
            image = keys.float()[:, None].repeat(1, 2)
            features.add(keys, keys + 100, image, -image[:, :1])
        torch.save({"length": len(features), "tensors": features.tensors()}, f"{out}/rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_clustering_features_are_gathered_onto_the_master_only(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    master, other = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2))
    keys, rows, image, text = master["tensors"]
    assert keys.tolist() == [0, 1, 2, 10, 11, 12, 13, 14, 15]  # batch by batch, rank order within a batch
    assert rows.tolist() == [k + 100 for k in keys.tolist()]
    assert image.tolist() == [[float(k)] * 2 for k in keys.tolist()] and text[:, 0].tolist() == (-keys.float()).tolist()
    assert other["length"] == 0 and other["tensors"][0].numel() == 0  # nothing kept on the other rank
