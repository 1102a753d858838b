"""`build_run(cfg, state, device) -> Run`: everything one training run needs, built once.

This is where the user's config is unpacked into library calls and where every fact derived from it is
resolved once into a typed value: the teacher side (`TeacherSide`), the corpus kind (`TsvCorpus` or
`ShardCorpus`), the precision (`Precision`), the separate teachers' feature widths (passed to the loss, never
written into the config), what the loss needs from the run (`LossNeeds`), the learning-rate schedule and the
evaluation plan. What one batch becomes is the `Task`'s (`train.task`), built here once. Every check a user
can fail runs before the experiment folder is created and before any teacher feature is computed; the
experiment folder is locked for this process from the check on (`train.experiment.ExperimentLock`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from protorkd import __version__, distributed
from protorkd.checkpoint import LATEST
from protorkd.config import AUTOMATIC_WARMUP, WARMUP_STEPS, Config, default_eval_root
from protorkd.data.corpus import Corpus, ShardCorpus, TrainBatches
from protorkd.distributed import DistState
from protorkd.errors import UsageError
from protorkd.eval.features import FeatureCache
from protorkd.glibc_malloc import set_mmap_threshold
from protorkd.losses import loss_components, main_loss
from protorkd.models.build import build_dual_encoder
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import TeacherSide
from protorkd.precision import Precision
from protorkd.train.checks import (
    check_batch_fits,
    check_before_teachers,
    check_image_size,
    check_teacher_views,
    loss_needs,
)
from protorkd.train.clustering import ClusteringPhase
from protorkd.train.data import build_batches, check_clustering_plan, in_memory_image_size, open_run_corpus
from protorkd.train.experiment import (
    Experiment,
    ExperimentPaths,
    commit_resume,
    open_experiment,
    prepare_experiment,
    restore_state,
)
from protorkd.train.guard import DivergenceGuard
from protorkd.train.logs import MetricWriter, setup_file_logging
from protorkd.train.optim import REST, VISUAL, GroupSchedule, build_optimizer, group_schedule
from protorkd.train.task import Task, build_task

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class EvalPlan:
    """Which evaluation tasks run after which epoch, on which data root."""

    root: Path | None
    frequencies: Mapping[str, int]  # task -> every N epochs and the last (0 = never, -1 = the last only)
    last_epoch: int
    batch_size: int
    workers: int

    def due(self, epoch: int) -> list[str]:
        if self.root is None:
            return []
        return [
            task
            for task, every in self.frequencies.items()
            if (every > 0 and epoch % every == 0) or (every != 0 and epoch == self.last_epoch)
        ]


@dataclass
class Run:
    """A training run, built once by `build_run`; the loop reads it and never the raw config for facts."""

    cfg: Config
    state: DistState
    device: torch.device
    paths: ExperimentPaths
    task: Task  # what one batch becomes: model, teachers, loss, mixup, precision
    batches: TrainBatches
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: GroupSchedule  # step -> {role: lr}, a pure function of the global step
    steps_per_epoch: int
    clustering: ClusteringPhase | None
    eval_plan: EvalPlan
    writer: MetricWriter
    guard: DivergenceGuard  # stops on a non-finite loss, warns on a jump
    experiment: Experiment  # holds the folder's lock (rank 0) until `close`
    start_epoch: int = 0
    eval_cache: FeatureCache = field(default_factory=FeatureCache)  # frozen-text zero-shot classifiers
    log_handler: logging.Handler | None = None

    def close(self) -> None:
        self.writer.close()
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler.close()
        self.experiment.release()


@dataclass
class _Checked:
    """What `build_run` opened and checked before the experiment folder exists."""

    corpus: Corpus
    corpus_seconds: float
    experiment: Experiment
    model: DualEncoder
    eval_root: Path | None


def _check_before_creating(cfg: Config, state: DistState) -> _Checked:
    """Open the corpus, build the model, check the flags against the loss, the teachers and the data, then check
    a resume against its folder (locking it): everything a user can get wrong before the experiment folder exists
    and before any teacher runs (nothing is created here)."""
    started = time.perf_counter()
    corpus = open_run_corpus(cfg.data)
    corpus_seconds = time.perf_counter() - started  # generating the demo corpus on first use included
    check_batch_fits(corpus.rows, cfg.data.episode_size, state.world_size, cfg.optim.batch_size, cfg.optim.accum_freq)
    model = build_dual_encoder(cfg.model)
    check_image_size(model, cfg.model.image_size)
    loss_components(cfg.loss.loss, cfg.loss.loss_weights)  # bad names or weights fail here
    needs = loss_needs(cfg, model)
    check_before_teachers(cfg, corpus, model, needs)
    check_teacher_views(cfg, model, streamed=isinstance(corpus, ShardCorpus))
    check_clustering_plan(cfg, state.world_size, corpus, needs.clustering)
    eval_root = default_eval_root(cfg)
    if eval_root is not None and not eval_root.is_dir():
        raise UsageError(f"--eval-data-dir {eval_root}: no such folder")
    experiment = prepare_experiment(cfg, state.world_size)  # locks an existing folder, checks a resume; creates nothing
    return _Checked(corpus, corpus_seconds, experiment, model, eval_root)


def _optimizer(cfg: Config, task: Task) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """The model and loss on the run's device and dtype, AdamW over them, and fp16's gradient scaler."""
    model, device, o = task.model, task.device, cfg.optim
    model.to(device)
    task.loss.to(device)
    if task.precision is Precision.BF16:
        model.to(torch.bfloat16)
    if model.image_tower is not None:  # faster convolutions on CUDA and on the CPU (oneDNN)
        model.image_tower.to(memory_format=torch.channels_last)
    roles = {VISUAL: [model.image_tower, model.image_head], REST: [model, task.loss]}  # ProtoCLIP's two schedules
    optimizer = build_optimizer(
        roles, lr=o.lr, weight_decay=o.wd, betas=(o.beta1, o.beta2), eps=o.eps, device_type=device.type
    )
    use_scaler = device.type == "cuda" and task.precision is Precision.AMP
    return optimizer, torch.amp.GradScaler("cuda") if use_scaler else None


def _wrap_for_training(cfg: Config, state: DistState, task: Task) -> None:
    """DDP (every process) and torch.compile (--torchcompile) around the model, as `Task.train_model`."""
    train_model: torch.nn.Module = task.model
    if state.distributed:
        device = task.device
        train_model = torch.nn.parallel.DistributedDataParallel(
            task.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.optim.torchcompile:
        train_model = torch.compile(train_model)
    task.train_model = train_model


def warmup_steps(warmup: int, total_steps: int) -> int:
    """--warmup, or for the automatic -1: WARMUP_STEPS, at most a tenth of the run's steps (at least 1)."""
    if warmup != AUTOMATIC_WARMUP:
        return warmup
    return max(1, min(WARMUP_STEPS, total_steps // 10))


def _schedules(cfg: Config, steps_per_epoch: int, eval_root: Path | None) -> tuple[GroupSchedule, EvalPlan]:
    """The learning rates as a function of the step, and which evaluations run after which epoch."""
    o, e = cfg.optim, cfg.eval
    total = steps_per_epoch * o.epochs
    warmup = warmup_steps(o.warmup, total)
    if warmup >= total:
        log.warning("--warmup %d is at least the run's %d steps: the learning rate never reaches --lr", warmup, total)
    else:
        log.info("learning rate: %d warm-up steps of %d, then cosine decay", warmup, total)
    if eval_root is None:
        log.info("no evaluation: give --eval-data-dir ROOT (layout: docs/data.md) to evaluate during training")
    schedule = group_schedule(
        lr=o.lr,
        lr_text=o.lr_text,
        warmup=warmup,
        steps_per_epoch=steps_per_epoch,
        epochs=o.epochs,
        lit_start_epoch=cfg.loss.lit_start_epoch,
        text_start_epoch=o.text_start_epoch,
        text_end_epoch=o.text_end_epoch,
    )
    frequencies = {
        "zeroshot": e.zeroshot_frequency,
        "linear": e.linear_frequency,
        "retrieval": e.retrieval_frequency,
        "sts": e.nlp_eval_frequency,
    }
    return schedule, EvalPlan(eval_root, frequencies, o.epochs, max(o.batch_size, 256), cfg.data.workers)


def build_run(cfg: Config, state: DistState, device: torch.device) -> Run:
    """Validate, create the experiment folder, build the task (model, teachers, loss), the data, the optimizer;
    resume if asked. The order is fixed: it is the order in which the run draws its random numbers."""
    seed_everything(cfg.optim.seed)  # the same initial weights on every rank
    if not state.is_master:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress lines
    # --- validate everything a user can get wrong before the experiment folder exists
    checked = _check_before_creating(cfg, state)
    try:
        return _build_checked(cfg, state, device, checked)
    except BaseException:
        checked.experiment.release()  # the run never started: the folder is free again
        raise


def _build_checked(cfg: Config, state: DistState, device: torch.device, checked: _Checked) -> Run:
    """`build_run` once every check passed: create (or continue) the folder, then build the run in it."""
    corpus, experiment, paths = checked.corpus, checked.experiment, checked.experiment.paths
    precision = Precision.resolve(cfg.optim.precision, device)
    malloc = set_mmap_threshold(cfg.optim.malloc_mmap_threshold_mb) if device.type == "cpu" else "not a CPU run"
    loads_images = cfg.model.teacher_side is not TeacherSide.IMAGE
    in_memory_size = in_memory_image_size(cfg.data, corpus, checked.model.image_preprocess.image_size, loads_images)
    resolved = {
        "experiment": paths.root.name,
        "in_memory": in_memory_size is not None,
        "malloc_mmap_threshold": malloc,
        "precision": precision.value,
        "teacher_side": cfg.model.teacher_side.value,
        "version": __version__,
        "world_size": state.world_size,
    }
    # --- create the experiment folder (with params.txt); from here on a failing check removes it again
    created = open_experiment(experiment, cfg, resolved, is_master=state.is_master)
    distributed.barrier()
    handler = setup_file_logging(paths.log_file) if state.is_master else None
    try:
        log.info(
            "experiment %s (protorkd %s, world size %d, device %s)", paths.root, __version__, state.world_size, device
        )
        if isinstance(corpus, ShardCorpus):
            log.info("corpus %s: webdataset shards, %d samples per epoch", corpus.source, corpus.rows)
        else:
            log.info("corpus %s: %d rows (ready in %.1f s)", corpus.source, corpus.rows, checked.corpus_seconds)
        images = "decoded in memory" if in_memory_size else "read from files"
        log.info("precision %s, images %s", precision.value, images)
        cache_root = Path(cfg.log.teacher_cache) if cfg.log.teacher_cache else paths.cache
        task = build_task(cfg, state, device, corpus, checked.model, cache_root, precision, in_memory_size)
        batches, clustering = build_batches(cfg, state, task, corpus, in_memory_size)
    except BaseException as error:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if isinstance(error, UsageError) and created and state.is_master:
            paths.remove()
        raise
    # --- optimizer, resume, wrappers
    optimizer, scaler = _optimizer(cfg, task)
    start_epoch = restore_state(
        experiment, model=task.model, model_options=cfg.model, loss=task.loss, optimizer=optimizer, scaler=scaler
    )
    commit_resume(experiment, cfg, resolved, is_master=state.is_master)  # only now may params.txt change
    _wrap_for_training(cfg, state, task)
    writer = MetricWriter(
        paths.root,
        cfg.log.report_to if state.is_master else "",
        config=cfg.to_flat_dict(),
        wandb_project=cfg.log.wandb_project,
    )
    steps_per_epoch = len(batches) // cfg.optim.accum_freq
    schedule, eval_plan = _schedules(cfg, steps_per_epoch, checked.eval_root)
    return Run(
        cfg=cfg,
        state=state,
        device=device,
        paths=paths,
        task=task,
        batches=batches,
        optimizer=optimizer,
        scaler=scaler,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        clustering=clustering,
        eval_plan=eval_plan,
        writer=writer,
        guard=DivergenceGuard(paths.checkpoints / LATEST),
        experiment=experiment,
        start_epoch=start_epoch,
        log_handler=handler,
    )


__all__ = ["EvalPlan", "Run", "build_run", "main_loss", "seed_everything"]
