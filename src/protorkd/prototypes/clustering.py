"""One episode's clustering for ProtoCLIP: k-means per modality, back translation, external teacher, statistics.

The training loop calls, once every `--clustering-frequency` epochs:

    state = cluster_episode(image_feats, text_feats, k, ...) if is_master else None   # features of the episode
    state = broadcast_cluster_state(state, device=device)                            # tensors only, no files
    loss.set_clusters(state)                                                          # ProtoCLIP loss

Row i of the features must belong to the sample whose key is `indices[i]` (default: i): its
`LossInputs.positions` value (its position in the episode) with `keyed_by_position`, else its
`LossInputs.indices` value (its corpus row). `state.stats` holds flat scalars to log (k-means error,
empty clusters, cluster sizes, ARI/AMI between the image and text clusterings, seconds) on the master.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from protorkd import distributed
from protorkd.prototypes.back_translation import translated_centroids
from protorkd.prototypes.kmeans import KMeansResult, kmeans

logger = logging.getLogger(__name__)

AMI_MAX_CLUSTERS = 2000  # sklearn's expected mutual information is too slow beyond this (NMI is always logged)

# (field, dtype, ndim) of every tensor in a ClusterState, in broadcast order
TENSOR_FIELDS: tuple[tuple[str, torch.dtype, int], ...] = (
    ("image_labels", torch.long, 1),
    ("text_labels", torch.long, 1),
    ("image_centroids", torch.float32, 2),
    ("text_centroids", torch.float32, 2),
    ("image_centroids_from_text", torch.float32, 2),
    ("text_centroids_from_image", torch.float32, 2),
    ("external_labels", torch.long, 1),
    ("external_centroids", torch.float32, 2),
    ("image_centroids_from_external", torch.float32, 2),
    ("text_centroids_from_external", torch.float32, 2),
)


@dataclass
class ClusterState:
    """Clusters of one episode. Labels: [R] long indexed by each sample's key (-1: not clustered): its
    position in the episode (`LossInputs.positions`) when `keyed_by_position`, else its corpus row.

    `*_centroids`: [k, d] k-means centroids in their own space. PBT (optional): image-space centroids
    of the text clusters (`image_centroids_from_text`), text-space centroids of the image clusters,
    and image-/text-space centroids of the external teacher's clusters.
    """

    image_labels: torch.Tensor
    text_labels: torch.Tensor
    image_centroids: torch.Tensor
    text_centroids: torch.Tensor
    image_centroids_from_text: torch.Tensor | None = None
    text_centroids_from_image: torch.Tensor | None = None
    external_labels: torch.Tensor | None = None
    external_centroids: torch.Tensor | None = None
    image_centroids_from_external: torch.Tensor | None = None
    text_centroids_from_external: torch.Tensor | None = None
    keyed_by_position: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    objectives: dict[str, list[float]] = field(default_factory=dict)
    cluster_sizes: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.image_centroids.shape[0]


def size_statistics(labels: np.ndarray, k: int, prefix: str) -> tuple[dict[str, float], np.ndarray]:
    """Flat stats of cluster sizes (empty clusters, min/median/max size) and the [k] size array."""
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    stats = {
        f"{prefix}/empty_clusters": float((sizes == 0).sum()),
        f"{prefix}/size_min": float(sizes.min()),
        f"{prefix}/size_median": float(np.median(sizes)),
        f"{prefix}/size_max": float(sizes.max()),
    }
    return stats, sizes


def agreement_statistics(labels_a: np.ndarray, labels_b: np.ndarray, k: int, prefix: str) -> dict[str, float]:
    """ARI and NMI between two clusterings of the same rows, AMI too when k <= AMI_MAX_CLUSTERS."""
    # imported here: sklearn.metrics costs about a second and only the clustering step needs it
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

    stats = {
        f"{prefix}_ari": float(adjusted_rand_score(labels_a, labels_b)),
        f"{prefix}_nmi": float(normalized_mutual_info_score(labels_a, labels_b)),
    }
    if k <= AMI_MAX_CLUSTERS:
        stats[f"{prefix}_ami"] = float(adjusted_mutual_info_score(labels_a, labels_b))
    return stats


def _label_table(labels: np.ndarray, indices: np.ndarray | None) -> torch.Tensor:
    if indices is None:
        return torch.from_numpy(labels).long()
    table = torch.full((int(indices.max()) + 1,), -1, dtype=torch.long)
    table[torch.from_numpy(indices).long()] = torch.from_numpy(labels).long()
    return table


def _to_numpy(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return features.detach().float().cpu().numpy()
    return np.asarray(features, dtype=np.float32)


def cluster_episode(
    image_features: np.ndarray | torch.Tensor,
    text_features: np.ndarray | torch.Tensor,
    k: int,
    *,
    max_iter: int = 20,
    nredo: int = 1,
    pbt: bool = False,
    external: np.ndarray | torch.Tensor | None = None,
    indices: np.ndarray | torch.Tensor | None = None,
    keyed_by_position: bool = False,
    seed: int = 1234,
    gpu: bool | None = None,
) -> ClusterState:
    """k-means of the episode's image and text features ([N, d] each), PBT, optional external teacher.

    external: [N, d_ext] external-teacher features of the same rows (ProtoCLIP: RoBERTa PCA-64); it is
    clustered with the same k and, with `pbt`, back-translated into both spaces (without `pbt` it is
    skipped with a warning, as in ProtoCLIP). indices: [N] the key of each row (its episode position when
    `keyed_by_position`, else its corpus row).
    """
    start = time.perf_counter()
    image = np.nan_to_num(_to_numpy(image_features))
    text = np.nan_to_num(_to_numpy(text_features))
    index_array = None if indices is None else np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64)
    runs: dict[str, KMeansResult] = {
        "image": kmeans(image, k, max_iter=max_iter, nredo=nredo, seed=seed, gpu=gpu),
        "text": kmeans(text, k, max_iter=max_iter, nredo=nredo, seed=seed, gpu=gpu),
    }
    if external is not None and not pbt:
        logger.warning("an external teacher needs prototypical back translation (--PBT); ignoring it")
        external = None
    if external is not None:
        runs["external"] = kmeans(
            np.nan_to_num(_to_numpy(external)), k, max_iter=max_iter, nredo=nredo, seed=seed, gpu=gpu
        )
    kmeans_seconds = time.perf_counter() - start

    state = ClusterState(
        image_labels=_label_table(runs["image"].labels, index_array),
        text_labels=_label_table(runs["text"].labels, index_array),
        image_centroids=torch.from_numpy(runs["image"].centroids),
        text_centroids=torch.from_numpy(runs["text"].centroids),
        keyed_by_position=keyed_by_position,
    )
    pbt_start = time.perf_counter()
    if pbt:
        state.image_centroids_from_text = translated_centroids(runs["text"].labels, image, k)
        state.text_centroids_from_image = translated_centroids(runs["image"].labels, text, k)
    if "external" in runs:
        state.external_labels = _label_table(runs["external"].labels, index_array)
        state.external_centroids = torch.from_numpy(runs["external"].centroids)
        state.image_centroids_from_external = translated_centroids(runs["external"].labels, image, k)
        state.text_centroids_from_external = translated_centroids(runs["external"].labels, text, k)
    pbt_seconds = time.perf_counter() - pbt_start

    for name, run in runs.items():
        state.objectives[name] = run.objective
        state.stats[f"clustering/{name}/kmeans_error"] = run.error
        sizes_stats, sizes = size_statistics(run.labels, k, f"clustering/{name}")
        state.stats.update(sizes_stats)
        state.cluster_sizes[name] = sizes
    state.stats.update(agreement_statistics(runs["image"].labels, runs["text"].labels, k, "clustering/image_text"))
    if "external" in runs:
        for name in ("image", "text"):
            state.stats.update(
                agreement_statistics(runs[name].labels, runs["external"].labels, k, f"clustering/{name}_external")
            )
    state.stats["clustering/seconds_kmeans"] = kmeans_seconds
    state.stats["clustering/seconds_pbt"] = pbt_seconds
    state.stats["clustering/seconds_total"] = time.perf_counter() - start
    return state


def broadcast_cluster_state(
    state: ClusterState | None, *, src: int = 0, device: torch.device | str = "cpu"
) -> ClusterState:
    """Give every rank `src`'s cluster tensors (via `distributed.broadcast`); returns CPU tensors.

    Non-source ranks pass None and get empty stats/objectives (log them on the source). `device` is
    where the collective runs: "cuda" for NCCL, "cpu" for gloo. Without a process group: identity.
    """
    if distributed.world_size() == 1:
        if state is None:
            raise ValueError("broadcast_cluster_state needs a state when there is a single process")
        return state
    is_source = distributed.rank() == src
    if is_source and state is None:
        raise ValueError("the source rank must provide the cluster state")
    header = torch.full((len(TENSOR_FIELDS) + 1, 3), -1, dtype=torch.long, device=device)
    if is_source:
        for row, (name, _, _) in enumerate(TENSOR_FIELDS):
            tensor = getattr(state, name)
            if tensor is not None:
                header[row, 0] = 1
                header[row, 1 : 1 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.long)
        header[-1, 0] = int(state.keyed_by_position)
    distributed.broadcast(header, src=src)
    received: dict[str, torch.Tensor | None] = {}
    for row, (name, dtype, ndim) in enumerate(TENSOR_FIELDS):
        if int(header[row, 0]) != 1:
            received[name] = None
            continue
        shape = [int(size) for size in header[row, 1 : 1 + ndim]]
        if is_source:
            tensor = getattr(state, name).to(device=device, dtype=dtype).contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        received[name] = distributed.broadcast(tensor, src=src).cpu()
    if is_source:
        return state
    return ClusterState(**received, keyed_by_position=bool(header[-1, 0]))


def load_external_teacher(
    path: str, rows: np.ndarray | torch.Tensor | None = None, expected_dim: int | None = 64
) -> np.ndarray:
    """[len(rows), d_ext] float32 rows of an external-teacher .npy ([corpus rows, d_ext], memory-mapped)."""
    array = np.load(path, mmap_mode="r")
    if array.ndim != 2:
        raise ValueError(f"{path}: external teacher features must be 2-D [rows, dim], got shape {array.shape}")
    if expected_dim is not None and array.shape[1] != expected_dim:
        raise ValueError(
            f"{path}: external teacher width is {array.shape[1]}, --external-teacher-dim is {expected_dim}"
        )
    if rows is not None:
        array = array[np.asarray(torch.as_tensor(rows).cpu().numpy(), dtype=np.int64)]
    return np.ascontiguousarray(array, dtype=np.float32)
