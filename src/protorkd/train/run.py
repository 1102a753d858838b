"""`build_run(cfg, state, device) -> Run`: everything one training run needs, built once.

This is where the user's config is unpacked into library calls and where every fact derived from it is
resolved once into a typed value: the teacher side (`TeacherSide`), the corpus kind (`TsvCorpus` or
`ShardCorpus`), the separate teachers' feature widths (passed to the loss, never written into the config),
what the loss needs from the run (`LossNeeds`), the learning-rate schedule and the evaluation plan.
Every check a user can fail runs before the experiment folder is created, or removes it again.
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
from protorkd.allocator import set_mmap_threshold
from protorkd.config import Config, DataConfig, default_eval_root
from protorkd.data.corpus import Corpus, ShardCorpus, TrainBatches, TsvCorpus, open_corpus, training_batches
from protorkd.data.memory import decoded_bytes
from protorkd.data.mixup import Mixup, run_mixup
from protorkd.data.transforms import train_transform
from protorkd.distributed import DistState
from protorkd.errors import UsageError
from protorkd.eval.features import FeatureCache
from protorkd.losses import LossNeeds, build_auxiliary_losses, build_loss, loss_components, main_loss, needs_of
from protorkd.losses.base import accepts_mixup
from protorkd.models.build import build_dual_encoder
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import TeacherSide
from protorkd.precision import Precision
from protorkd.teachers.ensemble import caption_ensemble
from protorkd.teachers.features import Teachers, load_teachers, teacher_definitions
from protorkd.teachers.keys import TEACHER_FLAGS
from protorkd.train.clustering import ClusteringSchedule, check_clustering_inputs, clustering_schedule
from protorkd.train.experiment import ExperimentPaths, commit_resume, open_experiment, prepare_experiment, restore_state
from protorkd.train.logs import MetricWriter, setup_file_logging
from protorkd.train.optim import REST, VISUAL, GroupSchedule, build_optimizer, group_schedule

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
    corpus: Corpus
    teacher: TeacherSide
    model: DualEncoder
    train_model: torch.nn.Module  # the model as trained: DDP- and/or compile-wrapped
    loss: torch.nn.Module
    needs: LossNeeds
    teachers: Teachers
    batches: TrainBatches
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: GroupSchedule  # step -> {role: lr}, a pure function of the global step
    steps_per_epoch: int
    clustering: ClusteringSchedule | None
    eval_plan: EvalPlan
    writer: MetricWriter
    start_epoch: int = 0
    precision: str = "fp32"  # resolved --precision: fp32, amp, amp_bf16 or bf16
    mixup: Mixup | None = None  # --mixup-alpha: how each batch's images are mixed
    eval_cache: FeatureCache = field(default_factory=FeatureCache)  # frozen-text zero-shot classifiers
    log_handler: logging.Handler | None = None

    def close(self) -> None:
        self.writer.close()
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler.close()


def check_batch_fits(rows: int, episode_size: int, world_size: int, batch_size: int) -> None:
    per_process = -(-(episode_size if episode_size > 0 else rows) // world_size)
    if per_process < batch_size:
        raise UsageError(
            f"an epoch has {per_process} samples per process, fewer than --batch-size {batch_size}; "
            "lower --batch-size or use more data"
        )


def check_auxiliary_inputs(needs: LossNeeds, model: DualEncoder, teacher: TeacherSide) -> None:
    """SimCSE needs a second dropout pass of an online text tower; BYOL a second view through the image tower."""
    if needs.text_dropout_view and model.lock_text:
        raise UsageError(
            "--w-simcse needs an online, trainable text tower, but the text tower is locked "
            "(--teacher text or --lock-text-model) and its features may come from the cache; "
            "use --teacher image or --teacher none"
        )
    if needs.image_view2 and teacher is TeacherSide.IMAGE:
        raise UsageError(
            "--byol needs the image tower to run on a second view, but --teacher image caches its features"
        )


def check_projection_heads(add_projection_head: bool, clustering: bool, loss_name: str) -> None:
    """ProtoCLIP's projection heads serve only a loss that clusters; without them ProtoCLIP clusters the joint space."""
    if add_projection_head and not clustering:
        raise UsageError(
            f"--add-projection-head: --loss {loss_name} does not use projection heads (only a loss that clusters, "
            "ProtoCLIP, does); drop the flag"
        )
    if clustering and not add_projection_head:
        log.warning(
            "--loss %s without --add-projection-head clusters the joint (evaluation) space; ProtoCLIP's method "
            "clusters the space of its projection heads (--add-projection-head)",
            loss_name,
        )


def check_schedule_epochs(cfg: Config) -> None:
    """--lit-start-epoch, --text-start-epoch and --text-end-epoch must lie within the run's epochs."""
    o, lit = cfg.optim, cfg.loss.lit_start_epoch
    text_end = o.epochs if o.text_end_epoch < 0 else o.text_end_epoch
    if lit > o.epochs:
        raise UsageError(f"--lit-start-epoch {lit}: the run has only {o.epochs} epochs (-1 = no LiT phase)")
    if not 0 <= o.text_start_epoch < text_end <= o.epochs:
        raise UsageError(
            f"--text-start-epoch {o.text_start_epoch} / --text-end-epoch {o.text_end_epoch}: need 0 <= start < end "
            f"<= --epochs {o.epochs} (-1 = the last epoch)"
        )


def check_teacher_inputs(needs: LossNeeds, provided: set[str], loss_name: str) -> None:
    """The separate teachers' features the loss reads must be provided, and none provided may go unused."""
    missing = sorted(needs.teacher_features - provided)
    if missing:
        flags = sorted({TEACHER_FLAGS.get(key, key) for key in missing})
        raise UsageError(
            f"--loss {loss_name} distils from locked teacher features ({', '.join(missing)}); give {' / '.join(flags)} "
            "(e.g. --clip-teacher-model ViT-B-32 --clip-teacher-tag openai, or --extra-text-teacher all-MiniLM-L6-v2)"
        )
    unused = sorted({TEACHER_FLAGS[key] for key in provided - needs.teacher_features})
    if unused:
        raise UsageError(f"{', '.join(unused)}: --loss {loss_name} does not use these teachers (CLIP-KD does)")


def _load_teachers(
    cfg: Config, corpus: Corpus, model: DualEncoder, paths: ExperimentPaths, state: DistState, device: torch.device
) -> Teachers:
    """Every locked teacher's features, computed once (the master first, then the others read its cache)."""
    definitions = teacher_definitions(cfg.model)
    if isinstance(corpus, ShardCorpus):  # streamed samples have no rows to key a cache by: teachers run online
        if any(key is not None for _, key in definitions):
            raise UsageError(
                f"--loss {cfg.loss.loss} with separate teachers needs a TSV corpus (cached features are keyed by "
                "row); use --dataset-type csv"
            )
        return Teachers()
    if not definitions:
        return Teachers()
    cache_root = Path(cfg.log.teacher_cache) if cfg.log.teacher_cache else paths.cache
    teachers = Teachers()
    if state.is_master:
        teachers = load_teachers(model, corpus, cfg.model, cache_root, device, progress=True)
    distributed.barrier()
    if not state.is_master:
        teachers = load_teachers(model, corpus, cfg.model, cache_root, device, progress=False)
    return teachers


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


def build_run(cfg: Config, state: DistState, device: torch.device) -> Run:
    """Validate, create the experiment folder, build model, teachers, loss, data, optimizer; resume if asked."""
    seed_everything(cfg.optim.seed)  # the same initial weights on every rank
    if not state.is_master:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress lines
    # --- validate everything a user can get wrong before the experiment folder exists
    d = cfg.data
    started = time.perf_counter()
    corpus = open_run_corpus(d)
    corpus_seconds = time.perf_counter() - started  # generating the demo corpus on first use included
    check_batch_fits(corpus.rows, d.episode_size, state.world_size, cfg.optim.batch_size)
    experiment = prepare_experiment(cfg, state.world_size)  # checks a resume (flags, checkpoint); creates nothing
    paths, name = experiment.paths, experiment.paths.root.name
    teacher = cfg.model.teacher_side
    model = build_dual_encoder(cfg.model)
    loss_components(cfg.loss.loss, cfg.loss.loss_weights)  # bad names or weights fail here; built once widths are known
    auxiliary_needs = LossNeeds()
    for auxiliary in build_auxiliary_losses(cfg.loss).values():
        auxiliary_needs = auxiliary_needs | needs_of(auxiliary)
    check_auxiliary_inputs(auxiliary_needs, model, teacher)
    eval_root = default_eval_root(cfg)
    if eval_root is not None and not eval_root.is_dir():
        raise UsageError(f"--eval-data-dir {eval_root}: no such folder")

    precision = Precision.resolve(cfg.optim.precision, device)
    malloc = set_mmap_threshold(cfg.optim.malloc_mmap_threshold_mb) if device.type == "cpu" else "not a CPU run"
    image_size = model.image_preprocess.image_size
    in_memory_size = in_memory_image_size(d, corpus, image_size, loads_images=teacher is not TeacherSide.IMAGE)
    resolved = {
        "experiment": name,
        "in_memory": in_memory_size is not None,
        "malloc_mmap_threshold": malloc,
        "precision": precision,
        "teacher_side": teacher.value,
        "version": __version__,
        "world_size": state.world_size,
    }
    created = open_experiment(experiment, cfg, resolved, is_master=state.is_master)  # with params.txt
    distributed.barrier()
    handler = setup_file_logging(paths.log_file) if state.is_master else None
    try:
        log.info(
            "experiment %s (protorkd %s, world size %d, device %s)", paths.root, __version__, state.world_size, device
        )
        if isinstance(corpus, ShardCorpus):
            log.info("corpus %s: webdataset shards, %d samples per epoch", corpus.source, corpus.rows)
        else:
            log.info("corpus %s: %d rows (ready in %.1f s)", corpus.source, corpus.rows, corpus_seconds)
        log.info("precision %s, images %s", precision, "decoded in memory" if in_memory_size else "read from files")
        started = time.perf_counter()
        teachers = _load_teachers(cfg, corpus, model, paths, state, device)
        if d.caption_ensemble:  # streamed shards have no rows (and so no cached tower): refused inside
            rows = corpus.images if isinstance(corpus, TsvCorpus) else []
            teachers.tower = caption_ensemble(teachers.tower, rows, teacher)
        log.info("teacher features ready in %.1f s", time.perf_counter() - started)
        loss = build_loss(cfg.loss.loss, cfg.loss, model.embed_dim, teacher_dims=teachers.dims)
        needs = needs_of(loss)
        if isinstance(corpus, ShardCorpus) and (needs.row_ids or needs.teacher_features):
            raise UsageError(
                f"--loss {cfg.loss.loss} needs corpus rows (cached teacher features or per-row clusters), which "
                "streamed webdataset shards do not have; use a TSV corpus (--dataset-type csv)"
            )
        check_teacher_inputs(needs, teachers.keys, cfg.loss.loss)
        images_trained = teacher is not TeacherSide.IMAGE or teachers.tower is None
        mixup = run_mixup(d.mixup_alpha, d.mixup_prob, cfg.optim.seed, loss_name=cfg.loss.loss,
                          loss_accepts=accepts_mixup(loss), images_trained=images_trained)  # fmt: skip
        started = time.perf_counter()
        batches = training_batches(
            corpus,
            transform=train_transform(model.image_preprocess, d.augmentation),
            batch_size=cfg.optim.batch_size,
            workers=0 if in_memory_size is not None else d.workers,
            seed=cfg.optim.seed,
            rank=state.rank,
            world_size=state.world_size,
            episode_size=d.episode_size,
            load_images=teacher is not TeacherSide.IMAGE,
            bad_rows=teachers.bad_rows,
            views=2 if needs.image_view2 else 1,
            pin_memory=device.type == "cuda",
            max_pixels=d.max_image_pixels,
            max_member_bytes=d.max_member_bytes,
            in_memory_size=in_memory_size,
        )
        log.info("training batches ready in %.1f s", time.perf_counter() - started)
        clustering = None
        check_projection_heads(cfg.model.add_projection_head, needs.clustering, cfg.loss.loss)
        check_schedule_epochs(cfg)
        if needs.clustering:
            clustering = clustering_schedule(cfg.loss, episode_size=d.episode_size, seed=cfg.optim.seed)
            episode_rows = len(batches) * cfg.optim.batch_size * state.world_size
            check_clustering_inputs(clustering, episode_rows, corpus.rows)
    except BaseException as error:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if isinstance(error, UsageError) and created and state.is_master:
            paths.remove()
        raise

    # --- model, optimizer, resume
    model.to(device)
    loss.to(device)
    if precision == "bf16":
        model.to(torch.bfloat16)
    if model.image_tower is not None:  # faster convolutions on CUDA and on the CPU (oneDNN)
        model.image_tower.to(memory_format=torch.channels_last)
    o = cfg.optim
    roles = {VISUAL: [model.image_tower, model.image_head], REST: [model, loss]}  # ProtoCLIP's two schedules
    optimizer = build_optimizer(
        roles, lr=o.lr, weight_decay=o.wd, betas=(o.beta1, o.beta2), eps=o.eps, device_type=device.type
    )
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and precision == "amp" else None
    start_epoch = restore_state(
        experiment, model=model, model_options=cfg.model, loss=loss, optimizer=optimizer, scaler=scaler
    )
    commit_resume(experiment, cfg, resolved, is_master=state.is_master)  # only now may params.txt change
    train_model: torch.nn.Module = model
    if state.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if o.torchcompile:
        train_model = torch.compile(train_model)
    writer = MetricWriter(
        paths.root,
        cfg.log.report_to if state.is_master else "",
        config=cfg.to_flat_dict(),
        wandb_project=cfg.log.wandb_project,
    )
    steps_per_epoch = len(batches) // o.accum_freq
    e = cfg.eval
    frequencies = {
        "zeroshot": e.zeroshot_frequency,
        "linear": e.linear_frequency,
        "retrieval": e.retrieval_frequency,
        "sts": e.nlp_eval_frequency,
    }
    return Run(
        cfg=cfg,
        state=state,
        device=device,
        paths=paths,
        corpus=corpus,
        teacher=teacher,
        model=model,
        train_model=train_model,
        loss=loss,
        needs=needs,
        teachers=teachers,
        batches=batches,
        optimizer=optimizer,
        scaler=scaler,
        precision=precision,
        mixup=mixup,
        schedule=group_schedule(
            lr=o.lr,
            lr_text=o.lr_text,
            warmup=o.warmup,
            steps_per_epoch=steps_per_epoch,
            epochs=o.epochs,
            lit_start_epoch=cfg.loss.lit_start_epoch,
            text_start_epoch=o.text_start_epoch,
            text_end_epoch=o.text_end_epoch,
        ),
        steps_per_epoch=steps_per_epoch,
        clustering=clustering,
        eval_plan=EvalPlan(eval_root, frequencies, o.epochs, max(o.batch_size, 256), d.workers),
        writer=writer,
        start_epoch=start_epoch,
        log_handler=handler,
    )


__all__ = ["EvalPlan", "Run", "build_run", "main_loss", "seed_everything"]
