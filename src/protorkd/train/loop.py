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
from protorkd.checkpoint import (
    learned_logit_scale,
    prune_checkpoints,
    save_checkpoint,
    training_payload,
    weights_payload,
)
from protorkd.config import Config
from protorkd.data.tsv import BadSampleCounter
from protorkd.eval.suite import EvalOptions, run_suite
from protorkd.failpoints import failpoint
from protorkd.interrupts import Terminated, signals_held
from protorkd.losses import clamp_logit_scales
from protorkd.train.clustering import EpisodeFeatures
from protorkd.train.experiment import evaluated_epochs
from protorkd.train.guard import GRAD_NORM
from protorkd.train.optim import REST, VISUAL, set_lr
from protorkd.train.run import Run, build_run, seed_everything
from protorkd.train.task import MicroBatch, StepOutput, global_rows

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
        except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (`protorkd.interrupts`): a clean stop
            log.warning(
                "stopped by %s; every finished epoch is saved in %s: continue with the same command plus "
                "--resume latest",
                "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C (SIGINT)",
                run.paths.checkpoints,
            )
            raise
        finally:
            run.close()
    finally:
        distributed.shutdown()


def _train(run: Run) -> TrainResult:
    cfg, state, clustering = run.cfg, run.state, run.clustering
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
        if clustering is not None and clustering.schedule.due(epoch):
            clustering.run(run.task, collected, epoch, run.writer, epoch * run.steps_per_epoch)
        keep = clustering is not None and clustering.schedule.collect_during(epoch, cfg.optim.epochs)
        collected = EpisodeFeatures() if keep else None

        # --- train one epoch
        run.task.model.train()
        bad = BadSampleCounter(cfg.data.max_bad_fraction, run.batches.describe)
        _train_epoch(run, epoch, bad, collected)
        log.info("epoch %d trained in %.1f s", epoch + 1, time.time() - epoch_started)
        if clustering is not None:
            clustering.report_label_coverage(epoch, run.writer, (epoch + 1) * run.steps_per_epoch)
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
        distributed.check_same_on_all_ranks(run.task.model.parameters())
        log.info("model parameters identical on all %d ranks", state.world_size)
    return TrainResult(run.paths.root, cfg.optim.epochs, metrics)


def _train_epoch(run: Run, epoch: int, bad: BadSampleCounter, collected: EpisodeFeatures | None) -> None:
    accum, steps, epochs = run.cfg.optim.accum_freq, run.steps_per_epoch, run.cfg.optim.epochs
    disable = None if run.state.is_master else True  # a bar only on the master's terminal
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=disable, leave=False, dynamic_ncols=True)
    window_start, window_samples = time.time(), 0
    run.optimizer.zero_grad(set_to_none=True)
    group: list[MicroBatch] = []  # --accum-freq > 1: the micro-batches encoded so far
    for batch_index, batch in enumerate(run.batches):
        bad.update(len(batch["indices"]) + len(batch["bad"]), batch["bad"])  # counted before any skip
        if batch_index // accum >= steps:  # the last batches that cannot fill an --accum-freq group are dropped
            break
        step = epoch * steps + batch_index // accum
        batch_number = epoch * steps * accum + batch_index  # the same on a resume: mixup draws from it
        # --- schedule
        lr = run.schedule(step)
        set_lr(run.optimizer, lr)
        # no rank has a readable row: every rank skips the batch together (a rank with no rows of its own still
        # steps while any other rank has some, so that it joins the step's collectives)
        has_rows = global_rows(batch, run.device) > 0
        # --- forward, backward, optimizer step (--accum-freq > 1: at the group's last micro-batch)
        values = None
        if accum == 1 and has_rows:
            values = train_step(run, batch, epoch, step, collected, batch_number=batch_number)
        elif accum > 1:
            if has_rows:
                group.append(run.task.encode_micro_batch(batch, batch_number=batch_number))
            if (batch_index + 1) % accum == 0 and group:
                values, group = accumulated_step(run, group, epoch, step, collected), []
        if values is None:
            continue
        failpoint("train-step")
        # --- log
        window_samples += len(batch["indices"]) * accum * run.state.world_size  # an estimate: ranks differ slightly
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
    run: Run, batch: dict, epoch: int, step: int, collected: EpisodeFeatures | None, *, batch_number: int
) -> dict[str, float]:
    """Forward, backward and optimizer step of one batch; returns the logged values.

    `batch_number` (the batch's index in the whole run) seeds its mixup (--mixup-alpha)."""
    out = run.task.forward(batch, epoch=epoch, batch_number=batch_number)
    if collected is not None:  # kept for the next epoch's clustering (--cluster-features previous-epoch)
        collected.add_batch(run.clustering.schedule, batch, out.features)
    run.guard.check_loss(out.terms, out.total, epoch=epoch, step=step)  # stops on a non-finite term
    (run.scaler.scale(out.total) if run.scaler else out.total).backward()
    return _step_and_log_values(run, out, epoch, step)


def accumulated_step(
    run: Run, group: list[MicroBatch], epoch: int, step: int, collected: EpisodeFeatures | None
) -> dict[str, float]:
    """--accum-freq > 1, as open_clip: the loss of the whole group once per micro-batch, that micro-batch with
    gradients (`Task.forward_accumulated`), each backpropagated; then one optimizer step. The model's gradient is
    one big batch's; the loss's own parameters got it from every micro-batch, so theirs is averaged."""
    if collected is not None:  # the group's features without gradients, in train mode, as training computed them
        for micro in group:
            collected.add_batch(run.clustering.schedule, micro.batch, micro.features)
    for index in range(len(group)):
        out = run.task.forward_accumulated(group, index, epoch=epoch)
        if index == 0:  # every call computes the same loss: checking the first is checking all
            run.guard.check_loss(out.terms, out.total, epoch=epoch, step=step)
        (run.scaler.scale(out.total) if run.scaler else out.total).backward()
    for parameter in run.task.loss.parameters():
        if parameter.grad is not None:
            parameter.grad.div_(len(group))
    return _step_and_log_values(run, out, epoch, step)


def _step_and_log_values(run: Run, out: StepOutput, epoch: int, step: int) -> dict[str, float]:
    """The optimizer step, then the values to log: the loss terms, the gradient norm, the loss's own scalars."""
    grad_norm = _optimizer_step(run, epoch, step)
    watched = {**{k: v.item() for k, v in out.terms.items()}, GRAD_NORM: float(grad_norm)}
    run.guard.observe(watched, step)  # a term or the gradient norm 100x its running median: one WARNING
    values = {f"train/{k}": v for k, v in watched.items()}
    values["train/loss"] = out.total.item()
    values.update({f"train/{k}": v for k, v in run.task.loss.log_values().items()})
    return values


def _optimizer_step(run: Run, epoch: int, step: int) -> torch.Tensor:
    """Unscale (fp16), average the loss's own gradients across ranks, clip, step, clamp; returns the gradient norm."""
    scaler, optimizer, loss = run.scaler, run.optimizer, run.task.loss
    if scaler:
        scaler.unscale_(optimizer)  # clipping reads true gradients
    if run.state.distributed:  # DDP averages the model's gradients; the loss's parameters are averaged by hand
        distributed.average_gradients(loss.parameters())
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = run.cfg.optim.max_grad_norm if run.cfg.optim.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)  # the norm is logged even without clipping
    run.guard.check_grad_norm(grad_norm, scaled=scaler is not None, epoch=epoch, step=step)  # before stepping on it
    if scaler:
        scaler.step(optimizer)  # skips the step when fp16 overflowed
        scaler.update()
    else:
        optimizer.step()
    clamp_logit_scales(loss)  # to [0, ln 100] in place, as CLIP
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _save_checkpoints(run: Run, completed: int) -> None:
    weights = weights_payload(
        run.task.model,
        run.cfg.model,
        epoch=completed,
        name=run.paths.root.name,
        config=run.cfg.to_flat_dict(),
        logit_scale=learned_logit_scale(run.task.loss),
    )
    payload = training_payload(weights, loss=run.task.loss, optimizer=run.optimizer, scaler=run.scaler)
    # latest first: a run killed between the two writes still resumes with `--resume latest`. Ctrl-C or SIGTERM
    # during the writes stops the run right after them (a signal would otherwise cut a write short, or be lost).
    with signals_held():
        save_checkpoint(run.paths.checkpoints / "epoch_latest.pt", payload)
        failpoint("checkpoint-latest")
        if completed % run.cfg.log.save_frequency == 0 or completed == run.cfg.optim.epochs:
            save_checkpoint(run.paths.checkpoints / f"epoch_{completed}.pt", weights)
            prune_checkpoints(run.paths.checkpoints, run.cfg.log.keep_checkpoints)
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
    metrics = run_suite(run.task.model, plan.root, tasks=due, options=options).metrics
    if metrics:
        log.info(
            "epoch %d evaluation (%.1f s; accuracies and recalls in percent): %s",
            completed,
            time.time() - started,
            "  ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items())),
        )
        run.writer.results(metrics, epoch=completed, step=completed * run.steps_per_epoch, **options.record_fields())
    return metrics
