import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from protorkd.prototypes.back_translation import translated_centroids
from protorkd.prototypes.kmeans import kmeans


def blobs(n_per_blob: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.array([[10.0, 0, 0, 0, 0, 0], [0, 10.0, 0, 0, 0, 0], [0, 0, 10.0, 0, 0, 0], [-10.0, -10.0, 0, 0, 0, 0]])
    labels = np.repeat(np.arange(len(means)), n_per_blob)
    points = means[labels] + rng.normal(scale=0.3, size=(len(labels), means.shape[1]))
    return points.astype(np.float32), labels, means


def test_kmeans_recovers_well_separated_blobs():
    points, truth, means = blobs()
    result = kmeans(points, 4, max_iter=20, nredo=3, seed=0)
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.centroids.shape == (4, 6) and result.labels.dtype == np.int64
    recovered = result.centroids[result.labels[::100]]  # the centroid of each blob, in blob order
    blob_means = points.reshape(4, 100, 6).mean(axis=1)
    np.testing.assert_allclose(recovered, blob_means, atol=1e-4)
    np.testing.assert_allclose(recovered, means, atol=0.2)
    assert 3 <= len(result.objective) <= 20 * 3  # per iteration of every redo (faiss may stop early)
    squared_distances = ((points - result.centroids[result.labels]) ** 2).sum()
    assert result.error == pytest.approx(float(squared_distances), rel=1e-4)


def test_kmeans_accepts_torch_features_and_zeroes_nans():
    points, truth, _ = blobs(50)
    points[0, :] = np.nan
    result = kmeans(torch.from_numpy(points), 4, max_iter=10, seed=0)
    assert result.labels.shape == (200,)
    assert adjusted_rand_score(truth[1:], result.labels[1:]) == 1.0


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="k <= number of points"):
        kmeans(np.zeros((3, 2), dtype=np.float32), 4)


def test_back_translation_averages_student_features_per_teacher_cluster():
    labels = torch.tensor([0, 2, 0, 3, -1])  # cluster 1 is empty, the last row is unlabelled
    features = torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, 4.0], [-1.0, 0.0], [100.0, 100.0]])
    centroids = translated_centroids(labels, features, k=4)
    expected = torch.tensor([[2.0, 3.0], [0.0, 0.0], [5.0, 5.0], [-1.0, 0.0]])
    torch.testing.assert_close(centroids, expected)


def test_back_translation_gives_zero_vectors_for_empty_clusters():
    centroids = translated_centroids(np.array([1, 1]), np.ones((2, 3), dtype=np.float32), k=3)
    assert centroids[0].tolist() == [0.0, 0.0, 0.0] and centroids[2].tolist() == [0.0, 0.0, 0.0]
    assert centroids[1].tolist() == [1.0, 1.0, 1.0]
