"""The training loop, top to bottom: setup, then per epoch (cluster, schedule, forward, backward, log, checkpoint,
evaluate); the clustering phase (ProtoCLIP only) lives in `train.clustering`.

Only this module's `train` sees the whole config; it unpacks it into the library calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from protorkd import __version__, distributed
from protorkd.config import Config, write_params
from protorkd.data.tsv import BadSampleCounter
from protorkd.distributed import DistState
from protorkd.errors import UsageError
from protorkd.eval.suite import evaluate_during_training
from protorkd.losses import LOSSES, build_loss
from protorkd.losses.base import LossInputs
from protorkd.models.build import build_dual_encoder
from protorkd.train.checkpoint import (
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    strip_module_prefix,
)
from protorkd.train.clustering import EpisodeFeatures, check_clustering_inputs, clustering_phase, clustering_schedule
from protorkd.train.experiment import ExperimentPaths, experiment_paths
from protorkd.train.logs import MetricWriter, setup_file_logging
from protorkd.train.optim import build_optimizer, lr_at, set_lr
from protorkd.train.setup import (
    Teachers,
    check_auxiliary_inputs,
    check_batch_fits,
    check_teacher_inputs,
    load_teachers,
    loss_config_for_teachers,
    make_loader,
    resolve_corpus,
    resolve_device,
    teacher_definitions,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    experiment_dir: Path
    epochs_done: int
    metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast only on CUDA (amp = fp16, amp_bf16 = bf16); elsewhere compute in the weights' dtype."""
    if device.type == "cuda" and precision in ("amp", "amp_bf16"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "amp" else torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: Config) -> TrainResult:
    """Run a whole training job as this process's rank (world size from torchrun / SLURM variables)."""
    state = distributed.state_from_env()
    device = resolve_device(cfg.optim.device, state)
    distributed.init_process_group(state, device.type)
    try:
        return _train(cfg, state, device)
    finally:
        distributed.shutdown()


def _train(cfg: Config, state: DistState, device: torch.device) -> TrainResult:
    seed_everything(cfg.optim.seed)  # the same initial weights on every rank
    if not state.is_master:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress lines
    # --- setup: validate everything a user can get wrong before creating the experiment directory
    corpus = resolve_corpus(cfg.data)
    check_batch_fits(corpus.rows, cfg.data.episode_size, state.world_size, cfg.optim.batch_size)
    cfg = dataclasses.replace(
        cfg,
        log=dataclasses.replace(
            cfg.log, name=distributed.broadcast_object(experiment_paths(cfg, state.world_size).root.name)
        ),
    )
    paths = ExperimentPaths(Path(cfg.log.logs) / cfg.log.name)
    resume_path = resolve_resume(cfg.log.resume, paths.checkpoints) if cfg.log.resume else None
    model = build_dual_encoder(cfg.model)
    LOSSES.get(cfg.loss.loss)  # an unknown name fails here; the loss is built once the teachers' widths are known
    check_auxiliary_inputs(cfg, model)
    eval_root = Path(cfg.eval.eval_data_dir) if cfg.eval.eval_data_dir else corpus.default_eval_root
    if eval_root is not None and not eval_root.is_dir():
        raise UsageError(f"--eval-data-dir {eval_root}: no such folder")

    created = not paths.root.exists()
    if state.is_master:
        paths.create()
    distributed.barrier()
    handler = setup_file_logging(paths.log_file) if state.is_master else None
    try:
        return _run(cfg, state, device, paths, corpus, model, resume_path, eval_root, created)
    finally:
        if handler:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _run(cfg, state, device, paths, corpus, model, resume_path, eval_root, created) -> TrainResult:
    progress = state.is_master
    teacher = cfg.model.teacher
    try:
        log.info(
            "experiment %s (protorkd %s, world size %d, device %s)", paths.root, __version__, state.world_size, device
        )
        if corpus.shards:
            log.info("corpus %s: webdataset shards, %d samples per epoch", corpus.source, corpus.rows)
        else:
            log.info("corpus %s: %d rows", corpus.source, len(corpus.images))
        # --- teachers: features of every locked teacher, computed once (master first, then the others read them)
        teachers = Teachers()
        if corpus.shards:  # streamed samples have no corpus rows to key a cache by: teachers run online
            if any(key is not None for _, key in teacher_definitions(cfg.model)) or cfg.loss.loss == "ProtoCLIP":
                raise UsageError(
                    f"--loss {cfg.loss.loss} with separate teachers or clustering needs a TSV corpus (cached features "
                    "are keyed by row); use --dataset-type csv"
                )
        elif teacher_definitions(cfg.model):
            cache_root = Path(cfg.log.teacher_cache) if cfg.log.teacher_cache else paths.cache
            if state.is_master:
                teachers = load_teachers(model, corpus, cfg.model, cache_root, device, progress=progress)
            distributed.barrier()
            if not state.is_master:
                teachers = load_teachers(model, corpus, cfg.model, cache_root, device, progress=False)
        loss_fn = build_loss(cfg.loss.loss, loss_config_for_teachers(cfg.loss, teachers), model.embed_dim)
        check_teacher_inputs(loss_fn, set(teachers.extra), cfg.loss.loss)
        loader, sampler, dataset = make_loader(
            corpus,
            model,
            cfg,
            state,
            load_images=teacher != "image",
            bad_rows=teachers.bad_rows,
            views=2 if cfg.loss.byol else 1,
            pin_memory=device.type == "cuda",
        )
        schedule = clustering_schedule(cfg.loss, model, cfg.model.teacher, _main_loss(loss_fn), seed=cfg.optim.seed)
        if schedule is not None:
            rows = (
                len(corpus.images) if schedule.teacher_fixed else len(loader) * cfg.optim.batch_size * state.world_size
            )
            check_clustering_inputs(schedule, rows, len(corpus.images))
        if state.is_master:
            write_params(cfg, paths.params, extra={"version": __version__, "world_size": state.world_size})
    except UsageError:
        if created and state.is_master:
            paths.remove()
        raise

    # --- model, optimizer, resume
    model.to(device)
    loss_fn.to(device)
    if cfg.optim.precision == "bf16":
        model.to(torch.bfloat16)
    if device.type == "cuda" and model.image_tower is not None:
        model.image_tower.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        [model, loss_fn],
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.wd,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        device_type=device.type,
    )
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.optim.precision == "amp" else None
    start_epoch = 0
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path)
        model.load_state_dict(strip_module_prefix(checkpoint["state_dict"]))
        loss_fn.load_state_dict(checkpoint["loss_state"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"])
        log.info("resumed from %s at epoch %d", resume_path, start_epoch)
    train_model = model
    if state.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.optim.torchcompile:
        train_model = torch.compile(train_model)

    writer = MetricWriter(
        paths.root,
        cfg.log.report_to if state.is_master else "",
        config=cfg.to_flat_dict(),
        wandb_project=cfg.log.wandb_project,
    )
    steps_per_epoch = len(loader) // cfg.optim.accum_freq
    total_steps = steps_per_epoch * cfg.optim.epochs
    run = _EpochRun(
        cfg,
        state,
        device,
        train_model,
        model,
        loss_fn,
        optimizer,
        scaler,
        loader,
        teachers,
        writer,
        steps_per_epoch,
        total_steps,
        progress,
    )
    metrics: dict[str, float] = {}
    collected: EpisodeFeatures | None = None
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.optim.epochs):
        # Everything random in an epoch is a function of (seed, epoch, rank): resumed runs match exactly.
        seed_everything(cfg.optim.seed * 1_000_003 + epoch * 1009 + state.rank)
        sampler.set_epoch(epoch)
        epoch_started = time.time()  # clustering included: it is part of the epoch's cost
        # --- cluster (ProtoCLIP): the previous epoch's features, or one extraction pass, or the fixed teacher's
        if schedule is not None and schedule.due(epoch, _main_loss(loss_fn).has_clusters):
            clustering_phase(
                _main_loss(loss_fn),
                schedule,
                model,
                cfg.model.teacher,
                teachers.tower,
                collected,
                lambda: _extract_episode_features(cfg, model, loader, teachers, device),
                state=state,
                device=device,
                writer=writer,
                epoch=epoch,
                step=epoch * steps_per_epoch,
            )
        collected = (
            EpisodeFeatures() if schedule is not None and schedule.collect_during(epoch, cfg.optim.epochs) else None
        )
        model.train()
        bad = BadSampleCounter(cfg.data.max_bad_fraction, dataset.describe)
        _train_epoch(run, epoch, bad, collected)
        log.info("epoch %d trained in %.1f s", epoch + 1, time.time() - epoch_started)
        bad.report(epoch + 1)
        bad.check()

        # --- checkpoint (before evaluating, so a failing evaluation loses no training)
        completed = epoch + 1
        if state.is_master:
            payload = {
                "epoch": completed,
                "name": cfg.log.name,
                "state_dict": model.state_dict(),
                "loss_state": loss_fn.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(),
                "config": cfg.to_flat_dict(),
            }
            if scaler is not None:
                payload["scaler"] = scaler.state_dict()
            # latest first: a run killed between the two writes still resumes with `--resume latest`
            save_checkpoint(paths.checkpoints / "epoch_latest.pt", payload)
            if completed % cfg.log.save_frequency == 0 or completed == cfg.optim.epochs:
                save_checkpoint(paths.checkpoints / f"epoch_{completed}.pt", payload)

        # --- evaluate (master only; the others wait)
        if state.is_master:
            started = time.time()
            metrics = evaluate_during_training(
                model,
                eval_root,
                epoch=completed,
                last_epoch=cfg.optim.epochs,
                device=device,
                frequencies={
                    "zeroshot": cfg.eval.zeroshot_frequency,
                    "linear": cfg.eval.linear_frequency,
                    "retrieval": cfg.eval.retrieval_frequency,
                    "sts": cfg.eval.nlp_eval_frequency,
                },
                batch_size=max(cfg.optim.batch_size, 256),
                workers=cfg.data.workers,
            )
            if metrics:
                log.info(
                    "epoch %d evaluation (%.1f s): %s",
                    completed,
                    time.time() - started,
                    "  ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items())),
                )
                writer.results(metrics, epoch=completed, step=completed * steps_per_epoch)
        distributed.barrier()
    writer.close()
    if state.distributed:
        _check_ranks_agree(model, state)
    return TrainResult(paths.root, cfg.optim.epochs, metrics)


@dataclass
class _EpochRun:
    """What every epoch of one run shares (built once by `_run`)."""

    cfg: Config
    state: DistState
    device: torch.device
    train_model: torch.nn.Module  # the model as trained: DDP- and/or compile-wrapped
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    loader: object
    teachers: Teachers
    writer: MetricWriter
    steps_per_epoch: int
    total_steps: int
    progress: bool


def _train_epoch(run: _EpochRun, epoch: int, bad: BadSampleCounter, collected: EpisodeFeatures | None) -> None:
    cfg, state, device, train_model, model = run.cfg, run.state, run.device, run.train_model, run.model
    loss_fn, optimizer, scaler, loader, teachers = run.loss_fn, run.optimizer, run.scaler, run.loader, run.teachers
    writer, steps_per_epoch, total_steps, progress = run.writer, run.steps_per_epoch, run.total_steps, run.progress
    teacher = cfg.model.teacher
    accum = cfg.optim.accum_freq
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
        disable=None if progress else True,
        leave=False,
        dynamic_ncols=True,
    )
    window_start, window_samples = time.time(), 0
    optimizer.zero_grad(set_to_none=True)
    for batch_index, batch in enumerate(loader):
        bad.update(len(batch["indices"]) + len(batch["bad"]), batch["bad"])
        if batch_index // accum >= steps_per_epoch:
            break
        step = epoch * steps_per_epoch + batch_index // accum
        # --- schedule
        lr = lr_at(step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup, total_steps=total_steps)
        set_lr(optimizer, lr)
        if len(batch["indices"]) == 0:
            continue

        # --- forward
        inputs = _model_inputs(batch, model, teachers, teacher, device, cfg.optim.precision, cfg.loss)
        indices = batch["indices"].to(device)
        with precision_context(cfg.optim.precision, device):
            features = train_model(**inputs)
            extra = {k: v for k, v in features.items() if k not in ("image_features", "text_features")}
            extra.update(teachers.extra_inputs(batch["indices"], device))
            loss_inputs = LossInputs(  # losses see fp32 features whatever the towers computed in
                image_features=features["image_features"].float(),
                text_features=features["text_features"].float(),
                teacher=teacher,
                indices=indices,
                epoch=epoch,
                extra=extra,
            )
            terms = loss_fn(loss_inputs)
            total = sum(terms.values())
        if collected is not None:  # kept for the next epoch's clustering (no separate extraction pass)
            collected.add(batch["indices"], features["image_features"], features["text_features"])
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch + 1} step {step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            )

        # --- backward (gradients of loss-owned parameters are averaged across ranks by hand)
        scaled = total / accum
        (scaler.scale(scaled) if scaler else scaled).backward()
        if (batch_index + 1) % accum:
            continue
        if scaler:
            scaler.unscale_(optimizer)
        _average_loss_gradients(loss_fn, state)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # --- log
        window_samples += len(batch["indices"]) * accum * state.world_size
        bar.update(1)
        values = {f"train/{k}": v.item() for k, v in terms.items()}
        values.update({"train/loss": total.item(), "train/lr": lr, "train/grad_norm": float(grad_norm)})
        if hasattr(loss_fn, "log_values"):
            values.update({f"train/{k}": v for k, v in loss_fn.log_values().items()})
        bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.2e}")
        if (step + 1) % cfg.log.log_every_n_steps == 0 or step + 1 == (epoch + 1) * steps_per_epoch:
            elapsed = time.time() - window_start
            values["train/samples_per_second"] = window_samples / max(elapsed, 1e-9)
            writer.scalars(values, step + 1)
            log.info(
                "epoch %d/%d step %d/%d  %s",
                epoch + 1,
                cfg.optim.epochs,
                step + 1 - epoch * steps_per_epoch,
                steps_per_epoch,
                "  ".join(f"{k.removeprefix('train/')} {v:.4g}" for k, v in values.items()),
            )
            window_start, window_samples = time.time(), 0
    bar.close()


def _model_inputs(batch, model, teachers: Teachers, teacher: str, device, precision: str, loss_cfg=None) -> dict:
    """The model's forward arguments for one batch: raw inputs, or a locked teacher tower's cached features.

    With `loss_cfg`, the auxiliary terms' extra passes: a second image view (--byol) and a second
    dropout pass of the text tower (--w-simcse).
    """
    inputs: dict = {}
    if teacher == "text" and teachers.tower is not None:
        inputs["text_backbone_features"] = teachers.tower.lookup(batch["indices"]).to(device, non_blocking=True)
    else:
        inputs["tokens"] = {k: v.to(device) for k, v in model.tokenize(batch["captions"]).items()}
        if loss_cfg is not None and loss_cfg.w_simcse:
            inputs["text_views"] = 2
    if teacher == "image" and teachers.tower is not None:
        inputs["image_backbone_features"] = teachers.tower.lookup(batch["indices"]).to(device, non_blocking=True)
    else:
        keys = ("images", "images_view2") if loss_cfg is not None and loss_cfg.byol else ("images",)
        for key in keys:
            images = batch[key].to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.to(memory_format=torch.channels_last)
            inputs[key] = images.to(torch.bfloat16) if precision == "bf16" else images
    return inputs


def _main_loss(loss_fn: torch.nn.Module) -> torch.nn.Module:
    """The chosen loss inside a `LossWithAuxiliaries` wrapper (or the loss itself)."""
    return getattr(loss_fn, "main", loss_fn)


@torch.no_grad()
def _extract_episode_features(cfg, model, loader, teachers: Teachers, device) -> EpisodeFeatures:
    """One no-grad pass over this rank's share of the episode (eval mode), when no previous epoch's features exist."""
    features = EpisodeFeatures()
    model.eval()
    for batch in loader:
        if len(batch["indices"]) == 0:
            continue
        inputs = _model_inputs(batch, model, teachers, cfg.model.teacher, device, cfg.optim.precision)
        with precision_context(cfg.optim.precision, device):
            output = model(**inputs)
        features.add(batch["indices"], output["image_features"], output["text_features"])
    model.train()
    return features


def _check_ranks_agree(model: torch.nn.Module, state: DistState) -> None:
    """Every rank must end with the same weights; a silent divergence would make checkpoints rank-dependent."""
    with torch.no_grad():
        fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = distributed.all_gather_cat(fingerprint[None])
    if not torch.equal(gathered.min(dim=0).values, gathered.max(dim=0).values):
        raise RuntimeError("model parameters differ between ranks at the end of training")
    log.info("model parameters identical on all %d ranks", state.world_size)


def _average_loss_gradients(loss_fn: torch.nn.Module, state: DistState) -> None:
    if not state.distributed:
        return
    for parameter in loss_fn.parameters():
        if parameter.grad is not None:
            parameter.grad.copy_(distributed.all_reduce_mean(parameter.grad))
