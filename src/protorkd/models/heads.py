"""Heads: from a tower's features into the joint embedding space, and ProtoCLIP's projection heads on top of it."""

from __future__ import annotations

import torch.nn as nn


def make_head(in_dim: int, out_dim: int, n_layers: int, hidden_dim: int = 2048) -> nn.Module:
    """0 layers: identity (needs in_dim == out_dim); 1: Linear; >=2: MLP (Linear-GELU)x(n-1) + Linear."""
    if n_layers < 0:
        raise ValueError(f"head layers must be >= 0, got {n_layers}")
    if n_layers == 0:
        if in_dim != out_dim:
            raise ValueError(
                f"an identity head (0 layers) keeps the tower width {in_dim}, but the joint width is {out_dim}; "
                "add a head layer or set --joint-projection-dim to the tower width"
            )
        return nn.Identity()
    if n_layers == 1:
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(n_layers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)


def make_projection_head(in_dim: int, out_dim: int, hidden_dim: int = 2048, n_layers: int = 1) -> nn.Sequential:
    """ProtoCLIP's projection head (megvii-research/protoclip `open_clip/model.py`), in_dim -> out_dim.

    n_layers 0: Linear(in, out). n_layers n >= 1: Linear(in, hidden)+BN+ReLU, (n - 1) x
    [Linear(hidden, hidden)+BN+ReLU], Linear(hidden, out). ProtoCLIP builds the text head this way and
    the image head as a deep copy of it (identical initial weights); `build_dual_encoder` does the same.
    """
    if n_layers < 0:
        raise ValueError(f"projection head layers must be >= 0, got {n_layers}")
    if n_layers == 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
    for _ in range(n_layers - 1):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)
