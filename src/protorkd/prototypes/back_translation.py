"""Prototypical back translation (PBT; ProtoCLIP, Chen et al. 2022).

Cluster labels found in one space (the teacher's: text, image or an external model) are turned
into centroids in another space (the student's) by averaging the student features of each
cluster's members. Empty clusters get the zero vector (no member to average).
"""

from __future__ import annotations

import numpy as np
import torch


def translated_centroids(
    labels: torch.Tensor | np.ndarray, features: torch.Tensor | np.ndarray, k: int
) -> torch.Tensor:
    """[k, d] centroid c_j = mean of features[i] over i with labels[i] == j; zeros for empty clusters.

    labels: [N] in [0, k) (negative labels are ignored); features: [N, d]. Returns float32.
    """
    labels = torch.as_tensor(labels).long()
    features = torch.as_tensor(features).float()
    keep = labels >= 0
    labels, features = labels[keep], features[keep]
    sums = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels.to(features.device), features)
    counts = torch.bincount(labels, minlength=k).to(features.device, features.dtype)
    return sums / counts.clamp(min=1).unsqueeze(1)
