"""What `protorkd eval`, `elevater`, `watch`, `embed` and `export` share: their common flags, the training
run behind a checkpoint, the data root.

App code: a checkpoint's model is loaded by the library (`protorkd.loading`); this module turns the flags
the checkpoint stores (or its experiment's params.txt) into the app's `Config`, and asks
`config.default_eval_root` for a run's default data root.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from protorkd.commands.flag_types import integer
from protorkd.config import Config, default_eval_root
from protorkd.distributed import resolve_device
from protorkd.errors import UsageError
from protorkd.eval.features import EVAL_PRECISIONS
from protorkd.eval.records import LINEAR_FEATURES, LINEAR_PROTOCOLS
from protorkd.eval.suite import TASK_NAMES
from protorkd.params import read_params

if TYPE_CHECKING:
    from protorkd.eval.suite import EvalOptions
    from protorkd.loading import LoadedCheckpoint

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- flags


def add_checkpoint_argument(group: argparse._ActionsContainer) -> None:
    group.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (<experiment>/checkpoints/epoch_N.pt)")


def add_eval_data_dir_argument(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--eval-data-dir",
        type=Path,
        help="downstream data root (layout: docs/data.md; default: the training run's --eval-data-dir, or the "
        "demo corpus' held-out eval/ folder for a demo run)",
    )


def add_tasks_argument(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks among " + ", ".join(TASK_NAMES) + " (default: all; a task whose "
        "data is absent is skipped)",
    )


def add_linear_features_argument(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--linear-features",
        choices=LINEAR_FEATURES,
        default="joint",
        help="what the linear probe reads: joint (normalised encode_image features, CLIP_benchmark's and "
        "the ELEVATER toolkit's) or backbone (the image tower's output, before the projection head); "
        "the metric keys name it (default: joint)",
    )


EVAL_PRECISION_HELP = (
    "precision of the evaluation's forward passes: fp32, amp (fp16 autocast, CUDA only), amp_bf16 (bf16 "
    "autocast), or auto = amp on a GPU (CLIP_benchmark's default; its --no_amp is fp32) and fp32 on the CPU; "
    "recorded in every result file (default: auto)"
)


def add_eval_precision_argument(group: argparse._ActionsContainer) -> None:
    group.add_argument("--eval-precision", choices=EVAL_PRECISIONS, default="auto", help=EVAL_PRECISION_HELP)


def fraction_between_0_and_1(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be between 0 and 1 (exclusive)")
    return value


def add_linear_probe_arguments(group: argparse._ActionsContainer) -> None:
    """--linear-protocol, --linear-val-proportion, --linear-solver and --linear-features."""
    group.add_argument(
        "--linear-protocol",
        choices=LINEAR_PROTOCOLS,
        default="clip_benchmark",
        help="clip_benchmark: CLIP_benchmark's own probe (AdamW, lr 0.1, 10 epochs, batch 64, no "
        "standardisation; records lp_acc1); cv: L-BFGS logistic regression on standardised features, L2 by "
        "5-fold cross-validation (records lp_cv_acc1); docs/evaluation.md compares them (default: clip_benchmark)",
    )
    group.add_argument(
        "--linear-val-proportion",
        type=fraction_between_0_and_1,
        default=None,
        help="clip_benchmark protocol: hold out this share of train to search the weight decay "
        "(CLIP_benchmark's --val_proportion); default: none, weight decay 0, as its CLI",
    )
    group.add_argument(
        "--linear-solver",
        choices=("torch", "sklearn"),
        default="torch",
        help="cv protocol: torch L-BFGS (fast) or sklearn (reference) (default: torch)",
    )
    add_linear_features_argument(group)


def add_runtime_arguments(
    group: argparse._ActionsContainer,
    *,
    workers: int,
    workers_default: str | None = None,
    items: str = "images or texts",
) -> None:
    """--batch-size, --workers (default `workers`, described as `workers_default` when given) and --device."""
    group.add_argument(
        "--batch-size", type=integer(1, 65536), default=256, help=f"{items} per batch (default: 256; at most 65536)"
    )
    group.add_argument(
        "--workers",
        type=integer(0, 256),
        default=workers,
        help=f"data-loading worker processes (default: {workers_default or workers})",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: auto)")


def split_list(text: str | None) -> list[str] | None:
    """`a, b,c` -> ["a", "b", "c"]; None or nothing but commas -> None."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None


def parse_tasks(text: str | None) -> list[str] | None:
    """The tasks --tasks names (None: all), each checked against the suite's."""
    tasks = split_list(text)
    unknown = [task for task in tasks or [] if task not in TASK_NAMES]
    if unknown:
        raise UsageError(f"--tasks: unknown {', '.join(unknown)}; valid: {', '.join(TASK_NAMES)}")
    return tasks


def device_from(args: argparse.Namespace) -> torch.device:
    return resolve_device(args.device)


def check_zeroshot_metadata(path: Path | None) -> None:
    """--zeroshot-metadata names a file: checked before a model is loaded."""
    if path is not None and not path.is_file():
        raise UsageError(f"--zeroshot-metadata {path}: no such file")


def eval_options(args: argparse.Namespace, device: torch.device, **extra: Any) -> EvalOptions:
    """The evaluation options of the flags `eval` and `watch` share (`extra`: the command's own)."""
    from protorkd.eval.suite import EvalOptions

    return EvalOptions(
        device=device,
        batch_size=args.batch_size,
        workers=args.workers,
        zeroshot_metadata=args.zeroshot_metadata,
        precision=args.eval_precision,
        linear_protocol=args.linear_protocol,
        linear_solver=args.linear_solver,
        linear_val_proportion=args.linear_val_proportion,
        linear_features=args.linear_features,
        **extra,
    )


# ----------------------------------------------------------------------------------------------- checkpoints


def training_run(loaded: LoadedCheckpoint) -> Config | None:
    """The training run's config: the one stored in the checkpoint, else its experiment's params.txt (None
    when neither exists)."""
    if loaded.train_config:
        return Config.from_flat_dict(loaded.train_config, strict=False)
    if loaded.experiment_dir is not None:
        try:
            return read_params(loaded.experiment_dir / "params.txt")
        except (ValueError, SyntaxError) as error:
            raise UsageError(f"cannot read {loaded.experiment_dir / 'params.txt'}: {error}") from error
    return None


def eval_root(explicit: Path | None, training_run: Config | None) -> Path:
    """--eval-data-dir, else the training run's default (`config.default_eval_root`); it must exist."""
    root = explicit or (default_eval_root(training_run) if training_run is not None else None)
    if root is None:
        raise UsageError("--eval-data-dir is required (the data root; see docs/data.md)")
    if not Path(root).is_dir():
        given = "--eval-data-dir" if explicit else "the training run's evaluation data root"
        raise UsageError(f"{given} {root}: no such folder; pass --eval-data-dir ROOT (see docs/data.md)")
    return Path(root)
