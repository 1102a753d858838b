"""ProtoCLIP's clustering phase in training: which features are clustered, when, and installing the clusters.

Once every `--clustering-frequency` epochs, at the start of the epoch, the episode's joint-space
features are clustered on the master (`prototypes.clustering.cluster_episode`), broadcast to every
rank (`broadcast_cluster_state`) and installed in the loss (`loss.set_clusters`; they are buffers of
the loss, so checkpoints and resume keep them).

Which features, without a separate extraction pass where possible:

* Both towers train (or the teacher's head does): the features the training forward passes of the
  previous epoch computed anyway, collected by corpus row (`EpisodeFeatures`, fp16 on the CPU) and
  gathered from every rank. They are up to one epoch stale (a memory bank), and rows of this episode
  that the previous one did not draw stay unlabelled (-1, ignored by the loss). Only when no previous
  epoch exists (the first epoch, or a resumed run) is one no-grad extraction pass run over the episode.
* The teacher tower is locked and its head has no parameters: its joint features never change, so
  the cached teacher features (projected by the head) of every corpus row are clustered once and the
  clusters are reused for the rest of the run. They serve both directions (the locked teacher's own
  clusters would only ever be targets for the locked teacher).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from protorkd import distributed
from protorkd.distributed import DistState
from protorkd.errors import UsageError
from protorkd.losses import LossOptions
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import TeacherSide
from protorkd.prototypes.clustering import broadcast_cluster_state, cluster_episode, load_external_teacher
from protorkd.teachers.cache import TeacherFeatures
from protorkd.train.logs import MetricWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusteringSchedule:
    """When and how to cluster (the --k, --kmeans-*, --clustering-frequency, --PBT and external-teacher flags)."""

    frequency: int
    k: int
    max_iter: int
    nredo: int
    pbt: bool
    teacher_fixed: bool
    external_teacher: str | None = None
    external_teacher_dim: int = 64
    seed: int = 1234

    def due(self, epoch: int, has_clusters: bool) -> bool:
        """Cluster at the start of `epoch`? (Fixed teacher features: once, whenever no clusters exist yet.)"""
        if self.frequency <= 0:
            return False
        if self.teacher_fixed:
            return not has_clusters
        return epoch % self.frequency == 0

    def collect_during(self, epoch: int, epochs: int) -> bool:
        """Keep this epoch's training features for the clustering at the start of the next one?"""
        return (
            not self.teacher_fixed and self.frequency > 0 and epoch + 1 < epochs and (epoch + 1) % self.frequency == 0
        )


@dataclass
class EpisodeFeatures:
    """Joint-space features computed during one epoch's forward passes, by corpus row (fp16, CPU)."""

    indices: list[torch.Tensor] = field(default_factory=list)
    image: list[torch.Tensor] = field(default_factory=list)
    text: list[torch.Tensor] = field(default_factory=list)

    def add(self, indices: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> None:
        """indices [B], image / text [B, D] of one local batch."""
        self.indices.append(indices.detach().cpu())
        self.image.append(image.detach().to(torch.float16).cpu())
        self.text.append(text.detach().to(torch.float16).cpu())

    def __len__(self) -> int:
        return sum(len(i) for i in self.indices)

    def gathered(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's rows: indices [N], image [N, D], text [N, D] (float32, CPU)."""
        local = [torch.cat(parts) for parts in (self.indices, self.image, self.text)]
        return tuple(distributed.all_gather_cat(part.to(device)).cpu() for part in local)  # type: ignore[return-value]


@torch.no_grad()
def fixed_teacher_features(project, features: np.ndarray, rows: np.ndarray, chunk: int = 65536) -> torch.Tensor:
    """[N, D] joint features of every corpus row from cached teacher features [U, D_t] and rows [N] -> U."""
    if len(rows) == 0:
        return torch.zeros(0, 0)
    unique = torch.cat(
        [
            project(torch.from_numpy(np.asarray(features[i : i + chunk], dtype=np.float32))).cpu()
            for i in range(0, len(features), chunk)
        ]
    )
    return unique[torch.from_numpy(rows)].float()


def check_clustering_inputs(schedule: ClusteringSchedule, rows_clustered: int, corpus_rows: int) -> None:
    """Refuse a k larger than the rows clustered, and an external teacher that does not fit the corpus."""
    if schedule.frequency <= 0:
        return
    if schedule.k > rows_clustered:
        raise UsageError(f"--k {schedule.k}: an episode clusters only {rows_clustered} samples; lower --k")
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
    loss: torch.nn.Module,
    schedule: ClusteringSchedule,
    indices: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    is_master: bool,
    device: torch.device,
    seconds_features: float,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """k-means on the master, broadcast, `loss.set_clusters`.

    Returns (flat stats, {modality: [k] cluster sizes}) on the master, empty dicts elsewhere.
    """
    state = None
    sizes: dict[str, np.ndarray] = {}
    if is_master:
        external = None
        if schedule.external_teacher and schedule.pbt:
            external = load_external_teacher(schedule.external_teacher, indices, schedule.external_teacher_dim)
        state = cluster_episode(
            image,
            text,
            schedule.k,
            max_iter=schedule.max_iter,
            nredo=schedule.nredo,
            pbt=schedule.pbt,
            external=external,
            indices=indices,
            seed=schedule.seed,
        )
        sizes = state.cluster_sizes
    started = time.perf_counter()
    installed = broadcast_cluster_state(state, device=device)
    loss.set_clusters(installed)
    if not is_master:
        return {}, {}
    stats = dict(state.stats)
    stats["clustering/seconds_features"] = seconds_features
    stats["clustering/seconds_broadcast"] = time.perf_counter() - started
    stats["clustering/rows"] = float(len(indices))
    return stats, sizes


def clustering_schedule(cfg: LossOptions, model: DualEncoder, teacher: TeacherSide, *, seed: int) -> ClusteringSchedule:
    """When and how to cluster for a loss that needs clustering (ProtoCLIP)."""
    fixed = False
    if teacher is not TeacherSide.NONE:  # a locked teacher whose head has no parameters: its features never change
        head = model.text_head if teacher is TeacherSide.TEXT else model.image_head
        fixed = not any(p.requires_grad for p in head.parameters())
    return ClusteringSchedule(
        frequency=cfg.clustering_frequency,
        k=cfg.k,
        max_iter=cfg.kmeans_max_iter,
        nredo=cfg.kmeans_nredo,
        pbt=cfg.pbt,
        teacher_fixed=fixed,
        external_teacher=cfg.external_teacher,
        external_teacher_dim=cfg.external_teacher_dim,
        seed=seed + 1234,
    )


def clustering_phase(
    loss: torch.nn.Module,
    schedule: ClusteringSchedule,
    model: DualEncoder,
    teacher: TeacherSide,
    teacher_cache: TeacherFeatures | None,
    collected: EpisodeFeatures | None,
    extract: Callable[[], EpisodeFeatures],
    *,
    state: DistState,
    device: torch.device,
    writer: MetricWriter,
    epoch: int,
    step: int,
) -> None:
    """Pick the features (module docstring), cluster, install in `loss`, log the stats on the master."""
    started = time.perf_counter()
    if schedule.teacher_fixed:  # only the master needs them (no collective involved)
        indices = torch.arange(len(teacher_cache.rows) if state.is_master else 0)
        project = model.project_text if teacher is TeacherSide.TEXT else model.project_image
        rows = teacher_cache.rows if state.is_master else teacher_cache.rows[:0]
        features = fixed_teacher_features(lambda x: project(x.to(device)), teacher_cache.features, rows)
        image, text, source = features, features, "cached teacher features, clustered once"
    else:
        source = "previous epoch's training features"
        if collected is None or len(collected) == 0:
            collected, source = extract(), "extraction pass"
        indices, image, text = collected.gathered(device)
    stats, sizes = cluster_and_install(
        loss,
        schedule,
        indices,
        image.float(),
        text.float(),
        is_master=state.is_master,
        device=device,
        seconds_features=time.perf_counter() - started,
    )
    if not state.is_master:
        return
    log.info(
        "epoch %d clustering of %d rows (%s), k %d: %s",
        epoch + 1,
        len(indices),
        source,
        schedule.k,
        "  ".join(f"{k.removeprefix('clustering/')} {v:.4g}" for k, v in stats.items()),
    )
    writer.scalars(stats, step)
    if writer.tensorboard is not None:
        for name, counts in sizes.items():
            writer.tensorboard.add_histogram(f"clustering/{name}/cluster_sizes", counts, step)
