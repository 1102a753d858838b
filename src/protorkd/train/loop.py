"""The training loop, read top to bottom: `train` builds the run (`train.run.build_run`), then every epoch
clusters (losses that need it), trains (schedule, forward, backward, log per step), checkpoints and evaluates.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from protorkd import distributed
from protorkd.checkpoint import save_checkpoint
from protorkd.config import Config
from protorkd.data.mixup import mix_images
from protorkd.data.tsv import BadSampleCounter
from protorkd.eval.suite import EvalOptions, run_suite
from protorkd.failpoints import failpoint
from protorkd.losses import LossInputs, clamp_logit_scales, main_loss
from protorkd.train.batches import global_rows, model_inputs, precision_context
from protorkd.train.clustering import EpisodeFeatures, clustering_phase, report_label_coverage
from protorkd.train.experiment import evaluated_epochs
from protorkd.train.optim import REST, VISUAL, set_lr
from protorkd.train.run import Run, build_run, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    experiment_dir: Path
    epochs_done: int
    metrics: dict[str, float] = field(default_factory=dict)


def train(cfg: Config) -> TrainResult:
    """Run a whole training job as this process's rank (world size from torchrun / SLURM variables)."""
    state = distributed.state_from_env()
    device = distributed.resolve_device(cfg.optim.device, state)
    distributed.init_process_group(state, device.type, timeout_minutes=cfg.optim.dist_timeout_minutes)
    try:
        run = build_run(cfg, state, device)
        try:
            return _train(run)
        finally:
            run.close()
    finally:
        distributed.shutdown()


def _train(run: Run) -> TrainResult:
    cfg, state, loss = run.cfg, run.state, main_loss(run.loss)
    metrics: dict[str, float] = {}
    collected: EpisodeFeatures | None = None
    # --- evaluate the resumed epoch if a kill came between its checkpoint and its results.jsonl line
    if state.is_master and run.start_epoch and run.start_epoch not in evaluated_epochs(run.paths.results):
        metrics = _evaluate(run, run.start_epoch)
    distributed.barrier()
    for epoch in range(run.start_epoch, cfg.optim.epochs):
        # Everything random in an epoch is a function of (seed, epoch, rank): resumed runs match exactly.
        seed_everything(cfg.optim.seed * 1_000_003 + epoch * 1009 + state.rank)
        run.batches.set_epoch(epoch)
        epoch_started = time.time()  # clustering included: it is part of the epoch's cost

        # --- cluster (losses that need clusters): this episode's features (an extraction pass) or the previous epoch's
        if run.clustering is not None and run.clustering.due(epoch):
            clustering_phase(run, loss, collected, epoch)
        keep = run.clustering is not None and run.clustering.collect_during(epoch, cfg.optim.epochs)
        collected = EpisodeFeatures() if keep else None

        # --- train one epoch
        run.model.train()
        bad = BadSampleCounter(cfg.data.max_bad_fraction, run.batches.describe)
        _train_epoch(run, epoch, bad, collected)
        log.info("epoch %d trained in %.1f s", epoch + 1, time.time() - epoch_started)
        if run.clustering is not None:
            report_label_coverage(run, loss, epoch)
        bad.report(epoch + 1)
        bad.check()

        # --- checkpoint (before evaluating, so a failing evaluation loses no training)
        completed = epoch + 1
        if state.is_master:
            _save_checkpoints(run, completed)

        # --- evaluate (master only; the others wait)
        if state.is_master:
            metrics = _evaluate(run, completed)
        distributed.barrier()
    if state.distributed:
        distributed.check_same_on_all_ranks(run.model.parameters())
        log.info("model parameters identical on all %d ranks", state.world_size)
    return TrainResult(run.paths.root, cfg.optim.epochs, metrics)


def _train_epoch(run: Run, epoch: int, bad: BadSampleCounter, collected: EpisodeFeatures | None) -> None:
    accum, steps, epochs = run.cfg.optim.accum_freq, run.steps_per_epoch, run.cfg.optim.epochs
    disable = None if run.state.is_master else True  # a bar only on the master's terminal
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=disable, leave=False, dynamic_ncols=True)
    window_start, window_samples = time.time(), 0
    run.optimizer.zero_grad(set_to_none=True)
    for batch_index, batch in enumerate(run.batches):
        bad.update(len(batch["indices"]) + len(batch["bad"]), batch["bad"])
        if batch_index // accum >= steps:
            break
        step = epoch * steps + batch_index // accum
        # --- schedule
        lr = run.schedule(step)
        set_lr(run.optimizer, lr)
        if global_rows(batch, run.device) == 0:  # a rank with no rows still steps while any other rank has some
            continue
        # --- forward, backward (and an optimizer step every `accum` batches)
        values = train_step(
            run,
            batch,
            epoch,
            step,
            collected,
            optimizer_step=(batch_index + 1) % accum == 0,
            batch_number=epoch * steps * accum + batch_index,
        )
        if values is None:
            continue
        failpoint("train-step")
        # --- log
        window_samples += len(batch["indices"]) * accum * run.state.world_size
        bar.update(1)
        values.update({"train/lr": lr[VISUAL], "train/lr_rest": lr[REST]})
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{lr[VISUAL]:.2e}")
        if (step + 1) % run.cfg.log.log_every_n_steps == 0 or step + 1 == (epoch + 1) * steps:
            values["train/samples_per_second"] = window_samples / max(time.time() - window_start, 1e-9)
            run.writer.scalars(values, step + 1)
            log.info(
                "epoch %d/%d step %d/%d  %s",
                epoch + 1,
                epochs,
                step + 1 - epoch * steps,
                steps,
                "  ".join(f"{k.removeprefix('train/')} {v:.4g}" for k, v in values.items()),
            )
            window_start, window_samples = time.time(), 0
    bar.close()


def train_step(
    run: Run,
    batch: dict,
    epoch: int,
    step: int,
    collected: EpisodeFeatures | None,
    *,
    optimizer_step: bool,
    batch_number: int,
) -> dict[str, float] | None:
    """Forward and backward one batch; with `optimizer_step`, clip, step and return the logged values.

    `batch_number` (the batch's index in the whole run) seeds its mixup (--mixup-alpha)."""
    device, precision = run.device, run.precision
    inputs = model_inputs(batch, run.model, run.teachers, run.teacher, device, precision, run.needs)
    mixup_lams = None
    if run.mixup is not None:  # every rank passes lams (1 = unmixed), as the loss's gathers need
        lam = run.mixup.draw(batch_number, run.state.rank)
        inputs["images"] = mix_images(inputs["images"], lam)
        mixup_lams = torch.full((len(batch["indices"]),), lam, device=device)
    with precision_context(precision, device):
        features = run.train_model(**inputs)
        extra = {k: v for k, v in features.items() if k not in ("image_features", "text_features")}
        extra.update(run.teachers.extra_inputs(batch["indices"], device, images=inputs.get("images")))
        loss_inputs = LossInputs(  # losses see fp32 features whatever the towers computed in
            image_features=features["image_features"].float(),
            text_features=features["text_features"].float(),
            teacher=run.teacher,
            indices=batch["indices"].to(device),
            epoch=epoch,
            extra=extra,
            positions=batch["positions"].to(device) if "positions" in batch else None,
            mixup_lams=mixup_lams,
        )
        terms = run.loss(loss_inputs)
        total = sum(terms.values())
    if collected is not None:  # kept for the next epoch's clustering (--cluster-features previous-epoch)
        collected.add_batch(run.clustering, batch, features)
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch + 1} step {step}: "
            + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        )
    scaler, optimizer = run.scaler, run.optimizer
    scaled = total / run.cfg.optim.accum_freq
    (scaler.scale(scaled) if scaler else scaled).backward()
    if not optimizer_step:
        return None
    if scaler:
        scaler.unscale_(optimizer)
    if run.state.distributed:  # gradients of loss-owned parameters are averaged across ranks by hand
        distributed.average_gradients(run.loss.parameters())
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = run.cfg.optim.max_grad_norm if run.cfg.optim.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    clamp_logit_scales(run.loss)  # to [0, ln 100] in place, as CLIP
    optimizer.zero_grad(set_to_none=True)
    values = {f"train/{k}": v.item() for k, v in terms.items()}
    values.update({"train/loss": total.item(), "train/grad_norm": float(grad_norm)})
    if hasattr(run.loss, "log_values"):
        values.update({f"train/{k}": v for k, v in run.loss.log_values().items()})
    return values


def _save_checkpoints(run: Run, completed: int) -> None:
    payload = {
        "epoch": completed,
        "name": run.paths.root.name,
        "state_dict": run.model.state_dict(),
        "loss_state": run.loss.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "config": run.cfg.to_flat_dict(),
    }
    if run.scaler is not None:
        payload["scaler"] = run.scaler.state_dict()
    # latest first: a run killed between the two writes still resumes with `--resume latest`
    save_checkpoint(run.paths.checkpoints / "epoch_latest.pt", payload)
    failpoint("checkpoint-latest")
    if completed % run.cfg.log.save_frequency == 0 or completed == run.cfg.optim.epochs:
        save_checkpoint(run.paths.checkpoints / f"epoch_{completed}.pt", payload)
    failpoint("checkpoint-saved")


def _evaluate(run: Run, completed: int) -> dict[str, float]:
    plan = run.eval_plan
    due = plan.due(completed)
    if not due:
        return {}
    started = time.time()
    options = EvalOptions(
        device=run.device,
        batch_size=plan.batch_size,
        workers=plan.workers,
        cache=run.eval_cache,
        **run.cfg.eval.suite_options(),
    )
    metrics = run_suite(run.model, plan.root, tasks=due, options=options).metrics
    if metrics:
        log.info(
            "epoch %d evaluation (%.1f s): %s",
            completed,
            time.time() - started,
            "  ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items())),
        )
        run.writer.results(metrics, epoch=completed, step=completed * run.steps_per_epoch, **options.record_fields())
    return metrics
