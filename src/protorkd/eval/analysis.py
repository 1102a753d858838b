"""Feature analysis of paired image / text features (ProtoCLIP's analysis, plus cross-modal cluster agreement).

- modality_gap: ||mean image feature - mean text feature||_2 (Liang et al., 2203.02053).
- image_feature_std / text_feature_std: the mean over dimensions of the per-dimension std.
- image_avg_self_similarity / text_avg_self_similarity: the mean cosine similarity over all pairs of
  distinct items of one modality, computed from sums in O(N D) (no N x N matrix). ProtoCLIP instead
  averaged the positive entries of the full matrix, diagonal included.
- image_text_cluster_ari / _ami: k-means (faiss) on the image features and on the text features of the
  same pairs; the agreement of the two partitions (sklearn's ARI / AMI). 100 = same clusters.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F


def average_self_similarity(features: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs i != j of [N, D] features."""
    x = F.normalize(features.double(), dim=-1)
    n = x.shape[0]
    if n < 2:
        return float("nan")
    total = x.sum(dim=0).pow(2).sum() - x.pow(2).sum()
    return float(total / (n * (n - 1)))


def feature_statistics(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """Modality gap, per-dimension std and self-similarity of paired [N, D] image and text features."""
    image, text = image_features.double(), text_features.double()
    return {
        "modality_gap": float((image.mean(0) - text.mean(0)).norm()),
        "image_feature_std": float(image.std(0).mean()),
        "text_feature_std": float(text.std(0).mean()),
        "image_avg_self_similarity": average_self_similarity(image),
        "text_avg_self_similarity": average_self_similarity(text),
    }


def kmeans_labels(features: torch.Tensor, k: int, *, seed: int = 0) -> np.ndarray:
    """[N] nearest-centroid labels of faiss k-means (3 restarts) on L2-normalised [N, D] features."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news
    import faiss

    points = np.ascontiguousarray(F.normalize(features.float(), dim=-1).numpy())
    clustering = faiss.Kmeans(
        points.shape[1], k, niter=50, nredo=3, seed=seed, verbose=False, min_points_per_centroid=1
    )
    clustering.train(points)
    return clustering.index.search(points, 1)[1].reshape(-1)


def cluster_agreement(
    image_features: torch.Tensor, text_features: torch.Tensor, k: int, *, seed: int = 0
) -> dict[str, float]:
    """ARI and AMI (x 100) between k-means partitions of the image features and of the text features."""
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    if image_features.shape[0] < 2:  # faiss cannot cluster one point, and one point has no partition to compare
        logging.getLogger(__name__).warning("analysis: %d captioned image, no clusters to compare", len(image_features))
        return {}
    k = max(2, min(k, image_features.shape[0]))
    image_labels = kmeans_labels(image_features, k, seed=seed)
    text_labels = kmeans_labels(text_features, k, seed=seed)
    return {
        "image_text_cluster_ari": 100.0 * adjusted_rand_score(image_labels, text_labels),
        "image_text_cluster_ami": 100.0 * adjusted_mutual_info_score(image_labels, text_labels),
    }


def first_caption_features(
    text_features: torch.Tensor, caption_image: torch.Tensor, n_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([I', D] the feature of each image's first caption, [I] whether the image has one).

    ProtoCLIP pairs each image with one caption for the analysis.
    """
    first = torch.full((n_images,), -1, dtype=torch.long)
    positions = torch.arange(len(caption_image))
    first.scatter_reduce_(0, caption_image, positions, reduce="amin", include_self=False)
    return text_features[first[first >= 0]], first >= 0


def analyze(
    image_features: torch.Tensor, text_features: torch.Tensor, caption_image: torch.Tensor, *, n_clusters: int = 10
) -> dict[str, float]:
    """All analysis metrics from retrieval features: images [I, D], captions [T, D], caption_image [T]."""
    texts, has_caption = first_caption_features(text_features, caption_image, image_features.shape[0])
    images = image_features[has_caption]
    return {**feature_statistics(images, texts), **cluster_agreement(images, texts, n_clusters)}
