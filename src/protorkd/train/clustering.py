"""ProtoCLIP's clustering phase in training: which features are clustered, when, and installing the clusters.

Once every `--clustering-frequency` epochs, at the start of the epoch, the episode's features are
clustered on the master (`prototypes.clustering.cluster_episode`: k-means per modality, back translation,
external teacher), broadcast to every rank (`broadcast_cluster_state`) and installed in the loss
(`loss.set_clusters`; they are buffers of the loss, so checkpoints and resume keep them). The features are
the projection heads' outputs (`--add-projection-head`, ProtoCLIP's clustering space), else the joint ones.

Which features (`--cluster-features`):

* episode (default; ProtoCLIP's method): the episode has been drawn (`data.sampling`), then one pass over
  exactly that episode extracts its features (`extract_episode_features`, through `Task.encode`), in eval
  mode, without gradients, from one snapshot of the model, before any training on it. Like the original it iterates
  the training data (so the training augmentation, its own draw of it), splits it across ranks the same
  way, and labels every sample by its position in the episode (ProtoCLIP's episodic index: a row drawn
  twice has two labels); with `--episode-size 0` the position is the corpus row, as in ProtoCLIP.
* previous-epoch (cheaper): the features the previous epoch's training forward passes computed (train
  mode, weights drifting over that epoch), keyed by corpus row; rows of this episode that the previous one
  did not draw get no label (-1, ignored by the loss). The first epoch runs one extraction pass.

The extraction pass, and how it keeps ProtoCLIP's `feature_extraction_one_epoch` cheap:

* the same episode and the same split across ranks as the training pass (`EpisodeSampler.extraction_pass`),
  through the training transform with its own augmentation draw (the original iterates its training
  DataLoader, i.e. the training augmentation, a second time); no sample is dropped (drop_last off);
* the model in eval mode, one snapshot (nothing trains during the pass), no gradients (`Task.encode`);
* bf16 autocast where the hardware computes in bf16 (`Precision.fastest_inference`): CUDA (fp16 on GPUs
  without bf16) and CPUs with AVX512-BF16 or AMX (a tiny-cnn forward 2.2x faster than fp32 there; elsewhere
  the CPU stays fp32). `benchmarks/bench_protoclip.py` measures what it changes: the k-means labels and
  back-translated centroids of one episode from bf16 against fp32 features;
* on CUDA: batches GPU_BATCH_FACTOR x the training batch (no activations are kept for a backward pass). On
  the CPU larger batches are slower (measured: a tiny-cnn forward over 256 images took 1.5-2x the time of 4
  batches of 64, the activations no longer fit the caches), so the pass keeps the training batch size there;
* a locked teacher tower is not run: its backbone features come from the feature cache and only its heads
  are applied (`Task.inputs`), so with `--teacher text` only the image tower runs.

Features stay on the CPU: each batch's are gathered to the master only (`EpisodeFeatures`), never onto
every rank's GPU. After each epoch the share of trained samples that had a label is logged
(`ClusteringPhase.report_label_coverage`), with a warning below 90 %.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from protorkd import distributed
from protorkd.data.corpus import TrainBatches
from protorkd.data.tsv import collate
from protorkd.errors import UsageError
from protorkd.losses import LossOptions
from protorkd.losses.base import ClusteringLoss
from protorkd.models.features import Features
from protorkd.precision import Precision
from protorkd.prototypes.clustering import broadcast_cluster_state, cluster_episode, load_external_teacher
from protorkd.train.logs import MetricWriter
from protorkd.train.task import Task

log = logging.getLogger(__name__)
GPU_BATCH_FACTOR = 4

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

    def add_batch(self, schedule: ClusteringSchedule, batch: dict, features: Features) -> None:
        """The clustering-space features (`Features.clustering_space`) of one forward of `batch`."""
        image, text = features.clustering_space()
        self.add(schedule.keys(batch), batch["indices"], image, text)

    def __len__(self) -> int:
        return sum(len(part) for part in self.keys)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [N], rows [N], image [N, D_i], text [N, D_t]) on the master; empty elsewhere."""
        if not self.keys:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)
        return torch.cat(self.keys), torch.cat(self.rows), torch.cat(self.image), torch.cat(self.text)


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
    loss: ClusteringLoss, schedule: ClusteringSchedule, collected: EpisodeFeatures, *, device: torch.device
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


def extraction_loader(batches: TrainBatches, batch_size: int, device: torch.device) -> DataLoader:
    """The episode's samples for this rank, in large batches, with the extraction pass's augmentation draw."""
    loader, sampler = batches.loader, batches.sampler
    if sampler is None or not isinstance(loader, DataLoader):
        raise ValueError("a feature-extraction pass needs a TSV corpus (an episode of addressable rows)")
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        batch_size=(GPU_BATCH_FACTOR if device.type == "cuda" else 1) * batch_size,
        sampler=sampler.extraction_pass(),
        num_workers=workers,
        collate_fn=collate,
        drop_last=False,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
    )


def extract_episode_features(
    task: Task, batches: TrainBatches, schedule: ClusteringSchedule, batch_size: int, *, low_precision: bool = True
) -> EpisodeFeatures:
    """Every rank's share of the episode through `Task.encode`, gathered on the master's CPU. `low_precision`
    False keeps fp32 (for measuring what bf16 changes)."""
    features = EpisodeFeatures()
    precision = None if low_precision else Precision.FP32
    for batch in extraction_loader(batches, batch_size, task.device):
        features.add_batch(schedule, batch, task.encode(batch, precision=precision))
    return features


@dataclass
class ClusteringPhase:
    """ProtoCLIP's clustering in a run: when and how (`schedule`), of which batches, into which loss."""

    schedule: ClusteringSchedule
    loss: ClusteringLoss
    batches: TrainBatches
    batch_size: int  # the training batch size per process (the extraction pass's, times a factor on CUDA)
    is_master: bool

    def run(self, task: Task, collected: EpisodeFeatures | None, epoch: int, writer: MetricWriter, step: int) -> None:
        """At the start of `epoch`: pick the features (module docstring), cluster, install in the loss, log the
        stats on the master at `step`."""
        schedule = self.schedule
        if not self.loss.prototypes_active(epoch):  # an InfoNCE-only epoch (warm-up, LiT) never reads the labels
            log.info(
                "epoch %d: no clustering (an InfoNCE-only epoch: --infonce-warmup-epoch or --lit-start-epoch)",
                epoch + 1,
            )
            return
        started = time.perf_counter()
        if schedule.features == EPISODE or collected is None:  # the same decision on every rank (it is collective)
            collected = extract_episode_features(task, self.batches, schedule, self.batch_size)
            source = "extraction pass over this episode"
        else:
            source = "previous epoch's training features"
        seconds_features = time.perf_counter() - started
        stats, sizes = cluster_and_install(self.loss, schedule, collected, device=task.device)
        if not self.is_master:
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
        writer.scalars(stats, step)
        if writer.tensorboard is not None:
            for name, counts in sizes.items():
                writer.tensorboard.add_histogram(f"clustering/{name}/cluster_sizes", counts, step)

    def report_label_coverage(self, epoch: int, writer: MetricWriter, step: int) -> float | None:
        """Log the share of this epoch's trained samples that had a prototype label (None: no prototype terms)."""
        labelled, looked_up = self.loss.label_coverage()
        if looked_up == 0:
            return None
        share = labelled / looked_up
        if self.is_master:
            log.info(
                "epoch %d: %.1f %% of the %d samples trained on had a prototype label (--cluster-features %s)",
                epoch + 1,
                100 * share,
                looked_up,
                self.schedule.features,
            )
            writer.scalars({"clustering/labelled_share": share}, step)
            if share < LOW_COVERAGE:
                log.warning(
                    "epoch %d: only %.1f %% of the samples had a prototype label; the prototype loss ignores the "
                    "rest (with --cluster-features previous-epoch, samples the previous episode did not draw have "
                    "none; --cluster-features episode labels every sample)",
                    epoch + 1,
                    100 * share,
                )
        return share
