"""The experiment folder's lifecycle: its name and layout, creating it, and continuing it after any failure.

* A new experiment is created atomically (`io.atomic_folder`): a hidden sibling holding params.txt,
  checkpoints/ and cache/ is renamed into place, so an experiment folder either does not exist or has a
  params.txt. Whatever stops the run afterwards (an error, a kill, a preemption) leaves a folder that the
  same command plus `--resume latest` continues.
* `--resume latest` continues `--name`: from checkpoints/epoch_latest.pt, or, when the run never finished
  an epoch, from scratch in the same folder (its teacher cache, possibly half filled, is kept and resumed);
  an experiment that does not exist yet is started (as open_clip does), so one command serves the first
  launch and every requeue of a preemptible job.
* `--resume PATH` starts from any training checkpoint, an `epoch_latest.pt` (into a new `--name`, or the same
  one); an `epoch_N.pt` holds weights only and is refused in one line.

Before anything is written, `prepare_experiment` checks the command against the folder: its params.txt and
the checkpoint's config must agree on every flag a resume may not change (anything that changes the model,
the loss, the data or the schedule; `flag(..., resumable=True)` marks the others: --epochs, evaluation and
save frequencies, --workers, --report-to, paths, ...), and the checkpoint must load. A mismatch is one line
naming the differing flags. params.txt is rewritten (for changed resumable flags) only by `commit_resume`,
once the checkpoint's state is in the model.

While a process trains in an experiment folder it holds an exclusive lock on it (`ExperimentLock`, fcntl on
`.lock`, which names its PID): a second process (another `--resume latest`, the same `--name` started twice) is
refused in one line naming the holder, before it reads or writes anything else there. The OS drops the lock when
the holder dies, however it dies. Holding it, a resumed run may tidy what a killed one left: the hidden
temporaries of interrupted writes, and a torn last line of results.jsonl.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protorkd import distributed
from protorkd.checkpoint import (
    LATEST,
    is_weights_only,
    load_checkpoint,
    load_model_state,
    resolve_resume,
    restore_numbered_checkpoint,
)
from protorkd.config import Config
from protorkd.errors import UsageError
from protorkd.failpoints import failpoint
from protorkd.io import atomic_folder, atomic_write, remove_temporaries
from protorkd.models.options import ModelOptions
from protorkd.params import describe_differences, flag_differences, read_params, resumable_flags, write_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def log_file(self) -> Path:
        return self.root / "out.log"

    @property
    def params(self) -> Path:
        return self.root / "params.txt"

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


class ExperimentLock:
    """An exclusive `fcntl.flock` on `<folder>/.lock`, which holds the PID of the process holding it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, folder: Path) -> ExperimentLock:
        """Lock `folder` for this process, or a UsageError naming the process that holds it."""
        path = Path(folder) / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UsageError(
                f"experiment {folder} is in use by {holder(path)} (it holds {path}); wait for that run to end or "
                "stop it, then continue with --resume latest"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def holder(lock_path: Path) -> str:
    """ "process 1234", as the lock file names it."""
    try:
        pid = Path(lock_path).read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@dataclass
class Experiment:
    """What `prepare_experiment` decided: where the run writes, whether it continues an existing folder,
    and the (already loaded and checked) checkpoint it resumes from."""

    paths: ExperimentPaths
    exists: bool  # the folder is an experiment already (a resume); nothing in it is replaced before commit
    adopt: bool = False  # an older protorkd's folder killed before it wrote params.txt: continued from scratch
    resume_path: Path | None = None
    checkpoint: dict[str, Any] | None = None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # resumable flags that differ
    lock: ExperimentLock | None = None  # rank 0's, from the check (an existing folder) or the creation on

    @property
    def start_epoch(self) -> int:
        return int(self.checkpoint["epoch"]) if self.checkpoint is not None else 0

    def release(self) -> None:
        """Let other processes use the folder (the run ended, or stopped before training)."""
        if self.lock is not None:
            self.lock.release()


def default_name(cfg: Config, world_size: int) -> str:
    """`{L|U}-{image model}-h{n}-{L|U}-{text model}-h{n}-{loss}-b{global batch}-ep{epochs}-{time}` (L = locked)."""
    lock_image, lock_text = cfg.model.locks
    image = cfg.model.image_model.replace("/", "-")
    text = Path(cfg.model.text_model).name.replace("/", "-")
    return (
        f"{'L' if lock_image else 'U'}-{image}-h{cfg.model.image_head_n_layers}-"
        f"{'L' if lock_text else 'U'}-{text}-h{cfg.model.text_head_n_layers}-{cfg.loss.loss}-"
        f"b{cfg.optim.batch_size * world_size}-ep{cfg.optim.epochs}-{time.strftime('%m_%d-%H_%M_%S')}"
    )


def _is_experiment(root: Path) -> bool:
    return root.is_dir() and any(root.iterdir())


def _check_flags(stored: dict[str, Any], cfg: Config, where: str) -> dict[str, tuple[Any, Any]]:
    """The resumable flags that changed; a changed flag that may not change is a UsageError naming them all."""
    differences = flag_differences(stored, cfg)
    resumable = resumable_flags()
    fixed = {name: values for name, values in differences.items() if name not in resumable}
    if fixed:
        raise UsageError(
            f"--resume: {where} has other values for flags a resume may not change: {describe_differences(fixed)}; "
            "rerun the original command plus --resume latest, or start a new --name (docs/training.md lists the "
            "flags a resume may change)"
        )
    return {name: values for name, values in differences.items() if name not in ("resume", "name", "logs")}


def _decide(cfg: Config, world_size: int) -> tuple[str, bool, str | None, bool]:
    """(experiment name, whether it exists, resume checkpoint path or None, whether to adopt a folder without
    params.txt): rank 0's view, checked."""
    resume = cfg.log.resume
    if resume == "latest" and not cfg.log.name:
        raise UsageError("--resume latest needs --name: the experiment to continue (the default name has a time in it)")
    name = cfg.log.name or default_name(cfg, world_size)
    root = Path(cfg.log.logs) / name
    exists = _is_experiment(root)
    if exists and not resume:
        raise UsageError(
            f"experiment {root} already exists; choose another --name, or continue it with --resume latest"
        )
    if exists and not (root / "params.txt").is_file():
        # earlier versions wrote params.txt after the teacher cache: a kill before it left such a folder
        if resume == "latest" and (root / "checkpoints").is_dir() and not (root / "checkpoints" / LATEST).exists():
            return name, True, None, True
        raise UsageError(
            f"{root} exists but is not a protorkd experiment (it has no params.txt); choose another --name"
        )
    path = resolve_resume(resume, root / "checkpoints") if resume else None
    return name, exists, None if path is None else str(path), False


def prepare_experiment(cfg: Config, world_size: int) -> Experiment:
    """Decide where the run writes and check a resume, creating and changing nothing.

    Rank 0 decides (so every rank agrees even while rank 0 creates the folder); every rank then loads the
    resume checkpoint, which must load safely and agree with the command (`_check_flags`).
    """
    decision: tuple[str, bool, str | None, bool] | str | None = None
    lock = None
    if distributed.rank() == 0:
        try:
            decision = _decide(cfg, world_size)
            if decision[1]:  # an existing folder: nobody else may train in it while this process checks and runs
                lock = ExperimentLock.acquire(Path(cfg.log.logs) / decision[0])
        except UsageError as error:
            decision = str(error)
    decision = distributed.broadcast_object(decision)
    if isinstance(decision, str):
        raise UsageError(decision)
    name, exists, resume_path, adopt = decision
    experiment = Experiment(ExperimentPaths(Path(cfg.log.logs) / name), exists, adopt, lock=lock)
    try:
        _check_resume(experiment, cfg, resume_path)
    except BaseException:
        experiment.release()
        raise
    return experiment


def _check_resume(experiment: Experiment, cfg: Config, resume_path: str | None) -> None:
    """The folder's params.txt and the resume checkpoint against the command (`_check_flags`)."""
    exists, adopt = experiment.exists, experiment.adopt
    if exists and not adopt:
        try:
            stored = read_params(experiment.paths.params).to_flat_dict()
        except (OSError, ValueError, SyntaxError) as error:
            raise UsageError(
                f"{experiment.paths.params} cannot be read ({error}); restore it or choose a new --name"
            ) from None
        experiment.changed = _check_flags(stored, cfg, str(experiment.paths.params))
    if resume_path is not None:
        path = Path(resume_path)
        checkpoint = load_checkpoint(path)
        if not {"epoch", "state_dict"} <= set(checkpoint):
            raise UsageError(f"--resume {path}: not a protorkd training checkpoint (it has no epoch and state_dict)")
        if is_weights_only(checkpoint):
            raise UsageError(
                f"--resume {path}: it holds weights only (epoch_N.pt; the optimizer and loss state live in "
                f"epoch_latest.pt); resume from {path.parent / LATEST}, or start a new run from these weights"
            )
        _check_flags(checkpoint.get("config") or {}, cfg, f"checkpoint {path}")
        experiment.resume_path, experiment.checkpoint = path, checkpoint


def open_experiment(experiment: Experiment, cfg: Config, resolved: dict[str, Any], *, is_master: bool) -> bool:
    """Create a new experiment folder atomically with its params.txt (master only); an existing one is left
    as it is. Returns whether this call created the folder."""
    paths = experiment.paths
    if experiment.adopt and is_master:
        for folder in (paths.checkpoints, paths.cache):
            folder.mkdir(exist_ok=True)
        write_params(cfg, paths.params, resolved=resolved)
        log.info("%s had no params.txt (a setup an earlier protorkd did not finish): adopting it", paths.root)
    if experiment.exists or not is_master:
        return False
    paths.root.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_folder(paths.root) as tmp:
            for folder in ("checkpoints", "cache"):
                (tmp / folder).mkdir()
            write_params(cfg, tmp / "params.txt", resolved=resolved)
            experiment.lock = ExperimentLock.acquire(tmp)  # the folder appears locked: the rename keeps the lock
        experiment.lock.path = paths.lock
    except OSError as error:
        experiment.release()
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST) and paths.lock.exists():  # lost a race to the same --name
            raise UsageError(
                f"experiment {paths.root} was created meanwhile by {holder(paths.lock)}; choose another --name, or "
                "continue it with --resume latest once that run ends"
            ) from None
        raise
    failpoint("experiment-created")
    return True


def restore_state(
    experiment: Experiment,
    *,
    model: torch.nn.Module,
    model_options: ModelOptions,
    loss: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> int:
    """Load the resume checkpoint into the run's objects; returns the epochs already done (0 without one).

    The flags were checked against the checkpoint, so a state that still does not fit (a checkpoint edited
    by hand, or written by another protorkd version), or a locked tower whose source now holds other weights,
    is a one-line UsageError, not a traceback."""
    checkpoint = experiment.checkpoint
    if checkpoint is None:
        return 0
    try:
        load_model_state(model, checkpoint, model_options, where=f"--resume {experiment.resume_path}")
        loss.load_state_dict(checkpoint.get("loss_state", {}))
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
    except (KeyError, RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--resume {experiment.resume_path}: the checkpoint does not fit this run ({first})") from None
    return experiment.start_epoch


def commit_resume(experiment: Experiment, cfg: Config, resolved: dict[str, Any], *, is_master: bool) -> None:
    """The resume is validated and loaded: tidy what a killed run left, log the resume, restore an epoch_N.pt a
    kill skipped, record changed flags."""
    paths = experiment.paths
    if is_master and experiment.exists:
        _tidy(paths)
    if experiment.checkpoint is None:
        if experiment.exists:
            log.info(
                "--resume latest: %s has no %s yet (the run never finished an epoch); starting from scratch in "
                "the same folder, keeping its teacher cache",
                paths.root,
                LATEST,
            )
        elif cfg.log.resume == "latest":
            log.info("--resume latest: no experiment %s yet; starting it", paths.root)
    else:
        log.info("resumed from %s at epoch %d", experiment.resume_path, experiment.start_epoch)
        epoch = experiment.start_epoch
        due = epoch % cfg.log.save_frequency == 0 or epoch == cfg.optim.epochs
        if is_master and experiment.exists and due and experiment.resume_path == paths.checkpoints / LATEST:
            restored = restore_numbered_checkpoint(paths.checkpoints, epoch)
            if restored is not None:
                log.info("restored %s from %s (the run stopped between the two writes)", restored, LATEST)
        if epoch >= cfg.optim.epochs:
            log.info(
                "the checkpoint has %d epochs done, --epochs is %d: nothing left to train", epoch, cfg.optim.epochs
            )
    if experiment.changed:
        log.info("flags changed on resume: %s", describe_differences(experiment.changed))
        if is_master:
            write_params(cfg, paths.params, resolved=resolved)


def _tidy(paths: ExperimentPaths) -> None:
    """Remove the temporaries of writes a kill interrupted and a torn last line of results.jsonl (the folder is
    locked: no other process writes in it)."""
    removed = remove_temporaries(paths.root)
    if removed:
        size = sum(bytes_ for _, bytes_ in removed) / 2**20
        names = ", ".join(str(path.relative_to(paths.root)) for path, _ in removed[:3])
        log.info("removed %d temporary files (%.1f MB) of interrupted writes: %s", len(removed), size, names)
    repair_results(paths.results)


def repair_results(results: Path) -> None:
    """Cut a torn last line (a crash during an append: no newline) off results.jsonl, with a log line, so the
    next evaluation's line starts on a line of its own."""
    if not results.is_file():
        return
    data = results.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    atomic_write(results, data[:keep])
    torn = data[keep:].decode("utf-8", errors="replace")
    log.warning(
        "%s: removed a torn last line that an interrupted write left (%d bytes: %.60s...)",
        results,
        len(data) - keep,
        torn,
    )


def evaluated_epochs(results: Path) -> set[int]:
    """Epochs with a training-time evaluation line in results.jsonl (a torn last line is skipped)."""
    epochs: set[int] = set()
    if not results.is_file():
        return epochs
    for line in results.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "evaluated_by" not in record and isinstance(record.get("epoch"), int):
            epochs.add(record["epoch"])
    return epochs
