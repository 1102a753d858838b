"""What `protorkd eval`, `elevater` and `watch` share: their common flags, checkpoint loading, the data root.

App code: it reads a checkpoint's experiment params.txt (`protorkd.config`) to cross-check the model
flags stored in the checkpoint, and asks `config.default_eval_root` for a run's default data root. The
model itself is rebuilt by the library (`protorkd.eval.loading`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protorkd.checkpoint import load_checkpoint
from protorkd.config import Config, default_eval_root
from protorkd.distributed import resolve_device
from protorkd.errors import UsageError
from protorkd.eval.features import EVAL_PRECISIONS
from protorkd.eval.loading import model_from_checkpoint, model_options_from_flat, option_differences, require_weights
from protorkd.eval.records import LINEAR_FEATURES, LINEAR_PROTOCOLS
from protorkd.eval.suite import TASK_NAMES
from protorkd.models.dual_encoder import DualEncoder
from protorkd.models.options import ModelOptions
from protorkd.params import read_params

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


def int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (a bad value is argparse's one-line error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    return parse


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
    group.add_argument("--batch-size", type=int_at_least(1), default=256, help=f"{items} per batch (default: 256)")
    group.add_argument(
        "--workers",
        type=int_at_least(0),
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


# ----------------------------------------------------------------------------------------------- checkpoints


@dataclass
class LoadedCheckpoint:
    model: DualEncoder
    model_options: ModelOptions
    epoch: int | None
    name: str
    experiment_dir: Path | None  # set when the checkpoint sits in `<experiment>/checkpoints/`
    config_source: str
    train_config: dict[str, Any]  # every flag of the training run (stored config, else params.txt)

    def training_run(self) -> Config | None:
        """The training run's config (None when neither the checkpoint nor params.txt holds one)."""
        return Config.from_flat_dict(self.train_config, strict=False) if self.train_config else None


def experiment_of(checkpoint_path: Path) -> Path | None:
    """`<experiment>` for `<experiment>/checkpoints/epoch_N.pt` when that folder holds a params.txt."""
    folder = Path(checkpoint_path).resolve().parent
    if folder.name == "checkpoints" and (folder.parent / "params.txt").is_file():
        return folder.parent
    return None


def load_model_from_checkpoint(path: Path) -> LoadedCheckpoint:
    """The checkpoint's model with its weights, in eval mode on the CPU.

    The model flags come from the config stored in the checkpoint, else from its experiment's params.txt;
    when both exist they must agree (a checkpoint beside the wrong params.txt is refused, naming both).
    """
    path = Path(path)
    checkpoint = load_checkpoint(path)
    require_weights(checkpoint, path)
    experiment = experiment_of(path)
    params_path = experiment / "params.txt" if experiment else None
    stored = None
    if isinstance(checkpoint.get("config"), dict):
        try:
            stored = model_options_from_flat(checkpoint["config"])
        except (TypeError, ValueError) as error:
            raise UsageError(f"{path}: cannot read its stored config ({error})") from error
    from_params, params_values = None, {}
    if params_path is not None:
        try:
            params_config = read_params(params_path)
            from_params, params_values = params_config.model, params_config.to_flat_dict()
        except (ValueError, SyntaxError) as error:
            raise UsageError(f"cannot read {params_path}: {error}") from error
    if stored is None and from_params is None:
        raise UsageError(
            f"{path} stores no config and has no experiment params.txt beside it "
            "(expected <experiment>/checkpoints/<file>.pt); pass the tower flags instead"
        )
    if stored is not None and from_params is not None and option_differences(stored, from_params):
        raise UsageError(
            f"checkpoint {path} does not match {params_path}: " + "; ".join(option_differences(stored, from_params))
        )
    options = stored or from_params
    source = f"{path} (stored config)" if stored is not None else str(params_path)
    model = model_from_checkpoint(checkpoint, options, path=path, source=source)
    epoch = checkpoint.get("epoch")
    return LoadedCheckpoint(
        model,
        options,
        int(epoch) if epoch is not None else None,
        str(checkpoint.get("name") or (experiment.name if experiment else path.stem)),
        experiment,
        source,
        dict(checkpoint.get("config") or params_values),
    )


def eval_root(explicit: Path | None, training_run: Config | None) -> Path:
    """--eval-data-dir, else the training run's default (`config.default_eval_root`); it must exist."""
    root = explicit or (default_eval_root(training_run) if training_run is not None else None)
    if root is None:
        raise UsageError("--eval-data-dir is required (the data root; see docs/data.md)")
    if not Path(root).is_dir():
        given = "--eval-data-dir" if explicit else "the training run's evaluation data root"
        raise UsageError(f"{given} {root}: no such folder; pass --eval-data-dir ROOT (see docs/data.md)")
    return Path(root)
