"""The run's data: its corpus (the built-in demo corpus without --train-data), whether its images are kept decoded
in memory, and the epoch's batches of this rank (with ProtoCLIP's clustering phase, which walks them again)."""

from __future__ import annotations

import logging
import time

from protorkd.config import Config, DataConfig
from protorkd.data.corpus import Corpus, ShardCorpus, TrainBatches, TsvCorpus, open_corpus, training_batches
from protorkd.data.decoded_corpus import decoded_bytes
from protorkd.data.transforms import train_transform
from protorkd.distributed import DistState
from protorkd.errors import UsageError
from protorkd.models.options import TeacherSide
from protorkd.train.checks import warn_without_projection_heads
from protorkd.train.clustering import ClusteringPhase, check_clustering_inputs, clustering_schedule
from protorkd.train.task import Task

log = logging.getLogger(__name__)


def open_run_corpus(d: DataConfig) -> Corpus:
    """The corpus the data flags name (the built-in demo corpus without --train-data)."""
    return open_corpus(
        d.train_data,
        dataset_type=d.dataset_type,
        samples_per_epoch=d.train_num_samples,
        img_key=d.csv_img_key,
        caption_key=d.csv_caption_key,
        separator=d.csv_separator,
        dataset_size=d.dataset_size,
        demo_size=d.demo_size,
        demo_seed=d.demo_seed,
        max_bad_fraction=d.max_bad_fraction,
        quoting=d.csv_quoting,
        max_caption_bytes=d.max_caption_bytes,
    )


def in_memory_image_size(d: DataConfig, corpus: Corpus, image_size: int, loads_images: bool) -> int | None:
    """The side at which the training images are kept decoded in memory (`--in-memory`), or None to read files."""
    if d.in_memory == "off" or not loads_images or not isinstance(corpus, TsvCorpus):
        if d.in_memory == "on" and isinstance(corpus, ShardCorpus):
            raise UsageError("--in-memory on needs a TSV corpus; webdataset shards are streamed")
        return None
    megabytes = decoded_bytes(corpus.rows, image_size) / 2**20
    if d.in_memory == "auto" and megabytes > d.in_memory_budget_mb:
        log.info("corpus read from files: decoded it would take %.0f MB > --in-memory-budget-mb", megabytes)
        return None
    return image_size


def build_batches(
    cfg: Config, state: DistState, task: Task, corpus: Corpus, in_memory_size: int | None
) -> tuple[TrainBatches, ClusteringPhase | None]:
    """The epoch's batches of this rank, and ProtoCLIP's clustering phase when the loss clusters."""
    d, started = cfg.data, time.perf_counter()
    batches = training_batches(
        corpus,
        transform=train_transform(task.model.image_preprocess, d.augmentation),
        batch_size=cfg.optim.batch_size,
        workers=0 if in_memory_size is not None else d.workers,
        seed=cfg.optim.seed,
        rank=state.rank,
        world_size=state.world_size,
        episode_size=d.episode_size,
        load_images=task.teacher is not TeacherSide.IMAGE,
        bad_rows=task.teachers.bad_rows,
        views=2 if task.needs.image_view2 else 1,
        pin_memory=task.device.type == "cuda",
        max_pixels=d.max_image_pixels,
        max_member_bytes=d.max_member_bytes,
        max_caption_bytes=d.max_caption_bytes,
        in_memory_size=in_memory_size,
        view_replay=task.teachers.view_replay(cfg.optim.seed),
    )
    log.info("training batches ready in %.1f s", time.perf_counter() - started)
    warn_without_projection_heads(cfg.model.add_projection_head, task.needs.clustering, cfg.loss.loss)
    clustering_loss = task.clustering_loss
    if clustering_loss is None:
        return batches, None
    schedule = clustering_schedule(cfg.loss, episode_size=d.episode_size, seed=cfg.optim.seed)
    return batches, ClusteringPhase(schedule, clustering_loss, batches, cfg.optim.batch_size, state.is_master)


def check_clustering_plan(cfg: Config, world_size: int, corpus: Corpus, clustering: bool) -> None:
    """--k against the samples an episode clusters (its batches on every rank), and the external teacher
    against the corpus: before the teacher cache is filled."""
    if not clustering:
        return
    o, d = cfg.optim, cfg.data
    schedule = clustering_schedule(cfg.loss, episode_size=d.episode_size, seed=o.seed)
    per_process = -(-(d.episode_size if d.episode_size > 0 else corpus.rows) // world_size)
    batches = per_process // o.batch_size  # `training_batches` drops the last incomplete batch
    check_clustering_inputs(schedule, batches * o.batch_size * world_size, corpus.rows)
