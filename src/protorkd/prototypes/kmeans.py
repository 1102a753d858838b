"""k-means with faiss (GPU when faiss has GPUs, CPU otherwise), as ProtoCLIP clusters each episode.

Centroids are plain (non-spherical) means, labels the nearest centroid in L2, as in ProtoCLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KMeansResult:
    centroids: np.ndarray  # [k, d] float32
    labels: np.ndarray  # [N] int64, nearest centroid of each point
    objective: list[float]  # faiss's objective (sum of squared distances) per iteration of every redo
    error: float  # sum of squared distances to the nearest kept centroid (the final objective)


def _as_float32(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    array = np.ascontiguousarray(features, dtype=np.float32)
    return np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)


def kmeans(
    features: np.ndarray | torch.Tensor,
    k: int,
    *,
    max_iter: int = 20,
    nredo: int = 1,
    seed: int = 1234,
    gpu: bool | None = None,
) -> KMeansResult:
    """Cluster [N, d] features (NaN/inf -> 0) into k clusters; keeps the best of `nredo` runs.

    faiss may stop a run early once it converges, so `objective` has at most max_iter x nredo entries.

    gpu None: use faiss GPUs when the installed faiss has any. Raises ValueError when k > N.
    """
    import faiss  # imported here so that importing the losses does not load faiss

    points = _as_float32(features)
    n, d = points.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    use_gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    clustering = faiss.Kmeans(d, k, niter=max_iter, nredo=nredo, seed=seed, gpu=bool(use_gpu), verbose=False)
    clustering.train(points)
    distances, labels = clustering.index.search(points, 1)
    return KMeansResult(
        centroids=np.asarray(clustering.centroids, dtype=np.float32).reshape(k, d),
        labels=labels.reshape(-1).astype(np.int64),
        objective=[float(value) for value in clustering.obj],
        error=float(distances.astype(np.float64).sum()),
    )
