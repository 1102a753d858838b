"""A weighted sum of registered losses: `--loss InfoNCE+RKD --loss-weights 1,0.5`.

ProtoRKD's own idea is relational and prototypical terms together; this is how any two (or more) registered
losses train one student. Each component keeps its own flags, parameters and buffers; its named terms are
multiplied by its weight and logged one by one under the component's name, like every loss's terms (what is
logged is what is optimised): `infonce/infonce_loss`, `rkd/distance_loss`, ...
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch
import torch.nn as nn

from protorkd.errors import UsageError
from protorkd.losses.base import ClusteringLoss, LossInputs, LossModule


def split_loss_name(name: str) -> list[str]:
    """Split a sum: `InfoNCE+RKD` -> ["InfoNCE", "RKD"]; a single name -> [name]."""
    parts = [part.strip() for part in name.split("+")]
    if any(not part for part in parts):
        raise UsageError(f"--loss {name!r}: an empty name in the sum; write it as A+B, e.g. InfoNCE+RKD")
    return parts


def parse_loss_weights(text: str, count: int, loss: str) -> list[float]:
    """`--loss-weights "1,0.5"` for `count` summed losses; empty -> 1 each. Weights are finite and >= 0."""
    if not text.strip():
        return [1.0] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--loss-weights {text!r}: not a comma-separated list of numbers, e.g. 1,0.5") from None
    if len(weights) != count:
        raise UsageError(f"--loss-weights {text!r}: {len(weights)} weights for the {count} losses of --loss {loss}")
    if any(not (weight >= 0.0 and weight != float("inf")) for weight in weights):
        raise UsageError(f"--loss-weights {text!r}: every weight must be a finite number >= 0")
    return weights


class WeightedLossSum(LossModule):
    """sum_i w_i * loss_i, term by term. At most one component may cluster (the run installs its clusters)."""

    def __init__(self, names: Sequence[str], losses: Sequence[LossModule], weights: Sequence[float]) -> None:
        super().__init__()
        if not (len(names) == len(losses) == len(weights)) or len(losses) < 2:
            raise ValueError("a weighted sum needs two or more losses, each with a name and a weight")
        self.names = list(names)
        self.components = nn.ModuleList(losses)
        self.weights = [float(weight) for weight in weights]
        self.needs = functools.reduce(operator.or_, (loss.needs for loss in losses))
        clustering = [loss for loss in losses if loss.clustering() is not None]
        if len(clustering) > 1:
            raise UsageError(f"--loss {'+'.join(names)}: at most one of the summed losses may use clusters")
        self._clustering = clustering[0].clustering() if clustering else None
        gathered = [loss.scope for loss in losses if loss.scope.global_batch]
        self.scope = gathered[0] if gathered else losses[0].scope  # auxiliaries gather if any component does

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, weight, loss in zip(self.names, self.weights, self.components):
            for key, value in loss(inputs).items():
                out[f"{name.lower()}/{key}"] = weight * value
        return out

    def log_values(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for loss in self.components:
            values.update(loss.log_values())
        return values

    def clustering(self) -> ClusteringLoss | None:
        """The one component that clusters (ProtoCLIP), which the run's clustering phase talks to."""
        return self._clustering
