import logging

import numpy as np
import pytest
import torch

from protorkd.prototypes.back_translation import translated_centroids
from protorkd.prototypes.clustering import (
    ClusterState,
    broadcast_cluster_state,
    cluster_episode,
    load_external_teacher,
)


def paired_blobs(n_per_blob: int = 40, seed: int = 0):
    """Image and text features of the same 3 concepts (different spaces), and an external 4-d view."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), n_per_blob)
    image = np.eye(3, 5)[truth] * 8 + rng.normal(scale=0.2, size=(len(truth), 5))
    text = np.eye(3, 4)[truth][:, ::-1] * 8 + rng.normal(scale=0.2, size=(len(truth), 4))
    external = np.eye(3, 4)[truth] * 5 + rng.normal(scale=0.2, size=(len(truth), 4))
    return image.astype(np.float32), text.astype(np.float32), external.astype(np.float32), truth


def test_cluster_episode_clusters_both_modalities_back_translates_and_reports_statistics():
    image, text, external, _ = paired_blobs()
    indices = np.arange(len(image)) * 2 + 1  # the batch indices of the rows: odd numbers
    state = cluster_episode(image, text, 3, max_iter=10, nredo=2, pbt=True, external=external, indices=indices, seed=0)
    assert state.k == 3 and state.image_centroids.shape == (3, 5) and state.text_centroids.shape == (3, 4)
    assert state.image_labels.shape == (indices.max() + 1,)
    assert torch.all(state.image_labels[0::2] == -1)  # rows the episode did not contain
    image_labels = state.image_labels[torch.from_numpy(indices)]
    text_labels = state.text_labels[torch.from_numpy(indices)]
    torch.testing.assert_close(state.image_centroids_from_text, translated_centroids(text_labels, image, 3))
    torch.testing.assert_close(state.text_centroids_from_image, translated_centroids(image_labels, text, 3))
    assert state.external_centroids.shape == (3, 4) and state.image_centroids_from_external.shape == (3, 5)
    stats = state.stats
    assert stats["clustering/image_text_ari"] == 1.0 and stats["clustering/image_text_ami"] == pytest.approx(1.0)
    assert stats["clustering/image_external_ari"] == 1.0
    assert stats["clustering/image/empty_clusters"] == 0.0 and stats["clustering/text/size_median"] == 40.0
    assert stats["clustering/seconds_total"] >= stats["clustering/seconds_kmeans"] >= 0
    assert stats["clustering/image/kmeans_error"] == pytest.approx(min(state.objectives["image"]), rel=1e-4)
    assert 1 <= len(state.objectives["text"]) <= 20 and state.cluster_sizes["external"].sum() == len(image)


def test_cluster_episode_ignores_an_external_teacher_without_back_translation(caplog):
    image, text, external, _ = paired_blobs(10)
    with caplog.at_level(logging.WARNING):
        state = cluster_episode(image, text, 3, max_iter=5, external=external)
    assert "PBT" in caplog.text
    assert state.external_labels is None and state.image_centroids_from_text is None
    assert state.image_labels.tolist() == state.image_labels[: len(image)].tolist()


def test_broadcast_cluster_state_is_the_identity_in_a_single_process():
    image, text, _, _ = paired_blobs(10)
    state = cluster_episode(image, text, 3, max_iter=5)
    assert broadcast_cluster_state(state) is state
    with pytest.raises(ValueError):
        broadcast_cluster_state(None)


def test_load_external_teacher_takes_the_episode_rows_and_checks_the_width(tmp_path):
    features = np.arange(24, dtype=np.float64).reshape(6, 4)
    path = tmp_path / "teacher.npy"
    np.save(path, features)
    rows = load_external_teacher(str(path), rows=np.array([5, 0, 5]), expected_dim=4)
    assert rows.dtype == np.float32 and rows.tolist() == features[[5, 0, 5]].tolist()
    with pytest.raises(ValueError, match="--external-teacher-dim is 64"):
        load_external_teacher(str(path), expected_dim=64)


def test_cluster_state_fields_are_all_tensors_or_none():
    image, text, external, _ = paired_blobs(10)
    state = cluster_episode(image, text, 3, max_iter=5, pbt=True, external=external)
    assert isinstance(state, ClusterState)
    assert state.image_labels.dtype == torch.long and state.text_centroids.dtype == torch.float32
