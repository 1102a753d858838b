"""What every loss receives and returns.

A loss is an `nn.Module` whose `forward(inputs: LossInputs)` returns a flat dict of *weighted* named
terms (`{"distill_loss": ..., "simcse_loss": ...}`); the training loop sums every value and logs every
key, so what is logged is what is optimised. A loss may own parameters (a learnable temperature,
prototypes) and buffers (queues, centres); the loop optimises the former and checkpoints both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn as nn

from protorkd import distributed
from protorkd.models.options import TeacherSide

if TYPE_CHECKING:
    from protorkd.prototypes.clustering import ClusterState


@dataclass
class LossInputs:
    """Joint-space features of one local batch, and what the run knows about its rows.

    image_features / text_features: [B, D], L2-normalised outputs of the projection heads.
    image_features_unnormalized / text_features_unnormalized: [B, D], the same before the normalisation (CLIP-KD
        projects these into a teacher space of another width); None where a caller has only normalised rows.
    teacher: which tower is the locked teacher (TEXT, IMAGE) or NONE (both towers train).
    indices: [B] corpus row of each sample (used by prototype / clustering losses).
    positions: [B] each sample's position in its episode (ProtoCLIP's "episodic index": a row drawn twice
        in one episode has two positions); None for streamed shards.
    image_features_view2: [B, D] a second augmented view of the images (BYOL; `LossNeeds.image_view2`).
    text_features_dropout: [B, D] a second dropout pass of the text tower (SimCSE; `LossNeeds.text_dropout_view`).
    image_proto_features / text_proto_features: [B, d] ProtoCLIP's projection-head features (None without heads).
    separate_teachers: separate locked teachers' features [B, D_t] (and 0-d scalars) under the keys of
        `teachers.keys`; a loss lists the keys it reads in `LossNeeds.teacher_features`.
    mixup_lams: [B] when the run mixes images (`protorkd.data.mixup`; 1 = this batch unmixed): image i is
        lam x_i + (1 - lam) x_{B-1-i}. Only losses whose `needs.accepts_mixup` are given mixed images.
    mixup_groups: the sizes of the consecutive slices of the B rows that were mixed separately (each reversed
        within itself): the micro-batches of an --accum-freq group; None = one slice of B.
    update_state: whether this call may update the loss's running state (queues, centres, priors, counters).
        Under --accum-freq the loss of the whole accumulated batch is computed once per micro-batch; only the
        last of those calls updates the state, so that it moves once per optimizer step, as one big batch's.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    teacher: TeacherSide = TeacherSide.TEXT
    indices: torch.Tensor | None = None
    epoch: int = 0
    positions: torch.Tensor | None = None
    image_features_view2: torch.Tensor | None = None
    text_features_dropout: torch.Tensor | None = None
    image_proto_features: torch.Tensor | None = None
    text_proto_features: torch.Tensor | None = None
    separate_teachers: dict[str, torch.Tensor] = field(default_factory=dict)
    mixup_lams: torch.Tensor | None = None
    image_features_unnormalized: torch.Tensor | None = None
    text_features_unnormalized: torch.Tensor | None = None
    mixup_groups: list[int] | None = None
    update_state: bool = True

    def __post_init__(self) -> None:
        self.teacher = TeacherSide(self.teacher)  # "text" / "image" / "none" are accepted too

    @property
    def teacher_features(self) -> torch.Tensor:
        """[B, D] features of the teacher tower (the text tower when teacher is NONE)."""
        return self.image_features if self.teacher is TeacherSide.IMAGE else self.text_features

    @property
    def student_features(self) -> torch.Tensor:
        """[B, D] features of the student tower (the image tower when teacher is NONE)."""
        return self.text_features if self.teacher is TeacherSide.IMAGE else self.image_features

    def required(self, name: str, loss_name: str) -> torch.Tensor:
        """The optional field `name` ([B, D]), or a KeyError saying which loss needed it and the run did not give."""
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"{loss_name} needs LossInputs.{name} ([B, D] features); the run did not provide it")
        return value


@dataclass(frozen=True)
class LossNeeds:
    """What a loss needs from the training run beyond the two towers' features, and what it can take; the run
    checks these capabilities (never a loss's name) and provides exactly what is asked for.

    row_ids: `LossInputs.indices` are corpus rows that mean the same thing every epoch (per-row state such
        as cluster labels), so the corpus must have addressable rows (a TSV, not streamed shards).
    teacher_features: keys of separate locked teachers' features the loss reads from `LossInputs.separate_teachers`.
    clustering: the run clusters each episode and installs the clusters (the loss is a `ClusteringLoss`).
    image_view2: a second augmented view of each image, as `LossInputs.image_features_view2`.
    text_dropout_view: a second dropout pass of a trainable text tower, as `LossInputs.text_features_dropout`.
    accepts_mixup: the loss's targets follow `LossInputs.mixup_lams`, so it may be given mixed images (a loss
        whose targets are per-sample features cannot: mixing the images would contradict them).
    """

    row_ids: bool = False
    teacher_features: frozenset[str] = frozenset()
    clustering: bool = False
    image_view2: bool = False
    text_dropout_view: bool = False
    accepts_mixup: bool = False

    def __or__(self, other: LossNeeds) -> LossNeeds:
        """The needs of two losses summed: each needs what either needs; mixup only if both accept it."""
        return LossNeeds(
            self.row_ids or other.row_ids,
            self.teacher_features | other.teacher_features,
            self.clustering or other.clustering,
            self.image_view2 or other.image_view2,
            self.text_dropout_view or other.text_dropout_view,
            self.accepts_mixup and other.accepts_mixup,
        )


@dataclass(frozen=True)
class Scope:
    """The rows a loss computes over under DDP, and how gradients cross the gather (`losses.common`'s docstring).

    global_batch: gather every rank's rows (else only the local ones). with_grad: gathered rows carry gradients
    back to the rank they came from (`--gather-with-grad`).
    """

    global_batch: bool = False
    with_grad: bool = False

    def trainable(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] local rows -> the rows this scope computes over ([N, D] global, or [B, D])."""
        if not self.global_batch:
            return features
        return distributed.all_gather_cat(features, with_grad=self.with_grad)

    def frozen(self, features: torch.Tensor) -> torch.Tensor:
        """The same rows, detached (teacher features, indices)."""
        if not self.global_batch:
            return features.detach()
        return distributed.all_gather_cat(features.detach(), with_grad=False)

    def all_rows(self, features: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `features` (already this scope's rows), detached: what a global statistic or a
        shared queue takes (a global scope holds them already)."""
        if self.global_batch:
            return features.detach()
        return distributed.all_gather_cat(features.detach(), with_grad=False)

    def summed(self, statistic: torch.Tensor) -> torch.Tensor:
        """A per-rank statistic summed over the ranks (a global scope's is already global). The gradient passes
        through this rank's own term only, as through an in-place all_reduce (Barlow Twins' and ITRA's code)."""
        if self.global_batch or not distributed.is_initialized():
            return statistic
        total = distributed.all_reduce_sum(statistic.detach().clone())
        return statistic + (total - statistic.detach())

    def rows(self, features: torch.Tensor) -> int:
        """How many rows `summed` statistics sum over: this scope's, on every rank."""
        local = int(features.shape[0])
        if self.global_batch or not distributed.is_initialized():
            return local
        return int(distributed.all_reduce_sum(torch.tensor(local, device=features.device)))


LOCAL = Scope(global_batch=False)
GLOBAL = Scope(global_batch=True)  # open_clip's default gather: gradients through a rank's own rows only


@runtime_checkable
class ClusteringLoss(Protocol):
    """A loss that trains against clusters of each episode (ProtoCLIP): the run clusters and installs them."""

    def set_clusters(self, state: ClusterState) -> None:
        """Install one episode's clusters (identical on every rank)."""

    def prototypes_active(self, epoch: int) -> bool:
        """Do the prototype terms count in `epoch` (0-based)? An epoch where they do not needs no clustering."""

    def label_coverage(self) -> tuple[int, int]:
        """(samples that had a cluster label, samples looked up) since the last call."""


@runtime_checkable
class Loss(Protocol):
    """What the training run asks of a loss: its terms, its needs, the scalars it logs, its clustering part."""

    needs: LossNeeds

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """A flat dict of weighted named terms; the run sums and logs every one."""

    def log_values(self) -> dict[str, float]:
        """Scalars worth logging beside the terms (temperatures, accuracies); {} when none."""

    def clustering(self) -> ClusteringLoss | None:
        """The part of the loss that trains against clusters (itself, or a component of a sum), else None."""


class LossModule(nn.Module):
    """The base of every loss: an `nn.Module` that implements `Loss` (needs nothing, logs nothing, no clusters,
    no weight decay of its own)."""

    needs: LossNeeds = LossNeeds()

    def log_values(self) -> dict[str, float]:
        return {}

    def clustering(self) -> ClusteringLoss | None:
        return None

    def own_weight_decay(self) -> dict[str, float]:
        """{parameter name (as in `self.named_parameters()`): weight decay} for the parameters whose decay the
        loss's method fixes whatever `--wd` says (CLIP-KD's: AdamW's default 0.01). The others follow `--wd` and
        the optimizer's no-decay rules."""
        return {}


def fixed_weight_decays(module: nn.Module) -> dict[int, float]:
    """{id(parameter): weight decay} declared by every `LossModule` inside `module` (itself included), so that
    a loss inside a sum or beside auxiliary terms keeps its decay."""
    decays: dict[int, float] = {}
    for loss in module.modules():
        if isinstance(loss, LossModule):
            parameters = dict(loss.named_parameters())
            decays.update({id(parameters[name]): decay for name, decay in loss.own_weight_decay().items()})
    return decays
