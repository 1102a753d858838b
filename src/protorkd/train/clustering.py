"""ProtoCLIP's clustering phase in training: which features are clustered, when, and installing the clusters.

Once every `--clustering-frequency` epochs, at the start of the epoch, the episode's features are
clustered on the master (`prototypes.clustering.cluster_episode`: k-means per modality, back translation,
external teacher), broadcast to every rank (`broadcast_cluster_state`) and installed in the loss
(`loss.set_clusters`; they are buffers of the loss, so checkpoints and resume keep them). The features are
the projection heads' outputs (`--add-projection-head`, ProtoCLIP's clustering space), else the joint ones.

Which features (`--cluster-features`):

* episode (default; ProtoCLIP's method): the episode has been drawn (`data.sampling`), then one pass over
  exactly that episode extracts its features (`train.protoclip_extraction`), in eval mode, without
  gradients, from one snapshot of the model, before any training on it. Like the original it iterates
  the training data (so the training augmentation, its own draw of it), splits it across ranks the same
  way, and labels every sample by its position in the episode (ProtoCLIP's episodic index: a row drawn
  twice has two labels); with `--episode-size 0` the position is the corpus row, as in ProtoCLIP.
* previous-epoch (cheaper): the features the previous epoch's training forward passes computed (train
  mode, weights drifting over that epoch), keyed by corpus row; rows of this episode that the previous one
  did not draw get no label (-1, ignored by the loss). The first epoch runs one extraction pass.

Features stay on the CPU: each batch's are gathered to the master only (`EpisodeFeatures`), never onto
every rank's GPU. After each epoch the share of trained samples that had a label is logged
(`report_label_coverage`), with a warning below 90 %.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from protorkd import distributed
from protorkd.errors import UsageError
from protorkd.losses import LossOptions
from protorkd.prototypes.clustering import broadcast_cluster_state, cluster_episode, load_external_teacher

if TYPE_CHECKING:
    from protorkd.train.run import Run

log = logging.getLogger(__name__)

EPISODE, PREVIOUS_EPOCH = "episode", "previous-epoch"
LOW_COVERAGE = 0.9  # warn when fewer trained samples than this had a prototype label


@dataclass(frozen=True)
class ClusteringSchedule:
    """When and how to cluster (the --k, --kmeans-*, --clustering-frequency, --cluster-features, --PBT and
    external-teacher flags). `keyed_by_position`: labels are keyed by episode position, else by corpus row."""

    frequency: int
    k: int
    max_iter: int
    nredo: int
    pbt: bool
    features: str = EPISODE
    keyed_by_position: bool = False
    external_teacher: str | None = None
    external_teacher_dim: int = 64
    seed: int = 1234

    def due(self, epoch: int) -> bool:
        """Cluster at the start of `epoch`?"""
        return self.frequency > 0 and epoch % self.frequency == 0

    def collect_during(self, epoch: int, epochs: int) -> bool:
        """Keep this epoch's training features for the clustering at the start of the next one?"""
        return self.features == PREVIOUS_EPOCH and epoch + 1 < epochs and self.due(epoch + 1)

    def keys(self, batch: dict) -> torch.Tensor:
        """[b] what this clustering keys a batch's samples by: episode positions or corpus rows."""
        return batch["positions"] if self.keyed_by_position else batch["indices"]


@dataclass
class EpisodeFeatures:
    """Features to cluster, gathered batch by batch onto the master's CPU (the other ranks keep nothing).

    keys [N] (episode positions or corpus rows: what the labels are keyed by), rows [N] (corpus rows, for the
    external teacher), image / text [N, D] float32.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    image: list[torch.Tensor] = field(default_factory=list)
    text: list[torch.Tensor] = field(default_factory=list)

    def add(self, keys: torch.Tensor, rows: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> None:
        """One local batch: keys / rows [B], image [B, D_i], text [B, D_t] on the run's device. Every rank calls
        it for every batch (it is a collective), with B = 0 when all of its samples were unreadable."""
        device, width = image.device, image.shape[1]
        ids = distributed.gather_cat(torch.stack([keys.to(device), rows.to(device)], dim=1).long())
        features = distributed.gather_cat(torch.cat([image.detach().float(), text.detach().float()], dim=1))
        if ids is None or features is None:  # not the master
            return
        ids, features = ids.cpu(), features.cpu()
        self.keys.append(ids[:, 0])
        self.rows.append(ids[:, 1])
        self.image.append(features[:, :width])
        self.text.append(features[:, width:])

    def add_batch(self, schedule: ClusteringSchedule, batch: dict, features: dict[str, torch.Tensor]) -> None:
        """The clustering-space features of one forward (`DualEncoder.forward`'s output) of `batch`."""
        image, text = clustering_space(features)
        self.add(schedule.keys(batch), batch["indices"], image, text)

    def __len__(self) -> int:
        return sum(len(part) for part in self.keys)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [N], rows [N], image [N, D_i], text [N, D_t]) on the master; empty elsewhere."""
        if not self.keys:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)
        return torch.cat(self.keys), torch.cat(self.rows), torch.cat(self.image), torch.cat(self.text)


def clustering_space(features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The features ProtoCLIP clusters: the projection heads' outputs when the model has them, else the joint ones."""
    image = features.get("image_proto_features", features["image_features"])
    text = features.get("text_proto_features", features["text_features"])
    return image, text


def clustering_schedule(cfg: LossOptions, *, episode_size: int, seed: int) -> ClusteringSchedule:
    """When and how to cluster for a loss that needs clustering (ProtoCLIP)."""
    return ClusteringSchedule(
        frequency=cfg.clustering_frequency,
        k=cfg.k,
        max_iter=cfg.kmeans_max_iter,
        nredo=cfg.kmeans_nredo,
        pbt=cfg.pbt,
        features=cfg.cluster_features,
        keyed_by_position=cfg.cluster_features == EPISODE and episode_size > 0,
        external_teacher=cfg.external_teacher,
        external_teacher_dim=cfg.external_teacher_dim,
        seed=seed + 1234,
    )


def check_clustering_inputs(schedule: ClusteringSchedule, rows_clustered: int, corpus_rows: int) -> None:
    """Refuse a k larger than the samples clustered, labels that would belong to another episode's samples,
    and an external teacher that does not fit the corpus."""
    if schedule.frequency <= 0:
        return
    if schedule.k > rows_clustered:
        raise UsageError(f"--k {schedule.k}: an episode clusters only {rows_clustered} samples; lower --k")
    if schedule.keyed_by_position and schedule.frequency > 1:
        raise UsageError(
            f"--clustering-frequency {schedule.frequency} with --episode-size: labels are keyed by position in the "
            "episode, and the episodes between two clusterings hold other samples at those positions (ProtoCLIP's "
            "code would use them anyway); use --clustering-frequency 1, --episode-size 0, or --cluster-features "
            "previous-epoch"
        )
    if schedule.external_teacher:
        try:
            array = np.load(schedule.external_teacher, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise UsageError(f"--external-teacher {schedule.external_teacher}: cannot read ({error})") from error
        if array.ndim != 2 or array.shape[0] != corpus_rows or array.shape[1] != schedule.external_teacher_dim:
            raise UsageError(
                f"--external-teacher {schedule.external_teacher}: shape {tuple(array.shape)}, this run needs "
                f"({corpus_rows}, {schedule.external_teacher_dim}) (corpus rows, --external-teacher-dim); "
                "write it with `protorkd cache-teacher --export-npy FILE --pca-dim D` on the same corpus"
            )
        if not schedule.pbt:
            log.warning("--external-teacher needs --PBT; it is ignored")


def cluster_and_install(
    loss: torch.nn.Module, schedule: ClusteringSchedule, collected: EpisodeFeatures, *, device: torch.device
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """k-means on the master, broadcast, `loss.set_clusters`.

    Returns (flat stats, {modality: [k] cluster sizes}) on the master, empty dicts elsewhere.
    """
    state = None
    if distributed.rank() == 0:
        keys, rows, image, text = collected.tensors()
        external = None
        if schedule.external_teacher and schedule.pbt:
            external = load_external_teacher(schedule.external_teacher, rows, schedule.external_teacher_dim)
        state = cluster_episode(
            image,
            text,
            schedule.k,
            max_iter=schedule.max_iter,
            nredo=schedule.nredo,
            pbt=schedule.pbt,
            external=external,
            indices=keys,
            keyed_by_position=schedule.keyed_by_position,
            seed=schedule.seed,
        )
    started = time.perf_counter()
    loss.set_clusters(broadcast_cluster_state(state, device=device))
    if state is None:
        return {}, {}
    stats = dict(state.stats)
    stats["clustering/seconds_broadcast"] = time.perf_counter() - started
    stats["clustering/samples"] = float(len(collected))
    return stats, state.cluster_sizes


def clustering_phase(run: Run, loss: torch.nn.Module, collected: EpisodeFeatures | None, epoch: int) -> None:
    """Pick the features (module docstring), cluster, install in `loss`, log the stats on the master."""
    from protorkd.train.protoclip_extraction import extract_episode_features  # it imports this module

    schedule = run.clustering
    if not loss.prototypes_active(epoch):  # an InfoNCE-only epoch (warm-up, LiT) never reads the labels
        log.info(
            "epoch %d: no clustering (an InfoNCE-only epoch: --infonce-warmup-epoch or --lit-start-epoch)", epoch + 1
        )
        return
    started = time.perf_counter()
    if schedule.features == EPISODE or collected is None:  # the same decision on every rank (it is collective)
        collected = extract_episode_features(run, schedule)
        source = "extraction pass over this episode"
    else:
        source = "previous epoch's training features"
    seconds_features = time.perf_counter() - started
    stats, sizes = cluster_and_install(loss, schedule, collected, device=run.device)
    if not run.state.is_master:
        return
    stats["clustering/seconds_features"] = seconds_features
    log.info(
        "epoch %d clustering of %d samples (%s), k %d: %s",
        epoch + 1,
        len(collected),
        source,
        schedule.k,
        "  ".join(f"{k.removeprefix('clustering/')} {v:.4g}" for k, v in stats.items()),
    )
    step = epoch * run.steps_per_epoch
    run.writer.scalars(stats, step)
    if run.writer.tensorboard is not None:
        for name, counts in sizes.items():
            run.writer.tensorboard.add_histogram(f"clustering/{name}/cluster_sizes", counts, step)


def report_label_coverage(run: Run, loss: torch.nn.Module, epoch: int) -> float | None:
    """Log the share of this epoch's trained samples that had a prototype label (None: no prototype terms)."""
    labelled, looked_up = loss.label_coverage()
    if looked_up == 0:
        return None
    share = labelled / looked_up
    if run.state.is_master:
        log.info(
            "epoch %d: %.1f %% of the %d samples trained on had a prototype label (--cluster-features %s)",
            epoch + 1,
            100 * share,
            looked_up,
            run.clustering.features,
        )
        run.writer.scalars({"clustering/labelled_share": share}, (epoch + 1) * run.steps_per_epoch)
        if share < LOW_COVERAGE:
            log.warning(
                "epoch %d: only %.1f %% of the samples had a prototype label; the prototype loss ignores the rest "
                "(with --cluster-features previous-epoch, samples the previous episode did not draw have none; "
                "--cluster-features episode labels every sample)",
                epoch + 1,
                100 * share,
            )
    return share
