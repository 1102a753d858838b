"""`protorkd watch`: evaluate each new checkpoint of an experiment once, e.g. on a spare GPU while it trains.

With no arguments it asks for the experiment folder and an optional epoch, like the original
evaluate_checkpoints.py. Results: EXP_DIR/evaluation_metrics_all.csv (+ .png), or
EXP_DIR/single_evaluation_metrics@epoch_N.csv for a single epoch. The evaluation is `protorkd eval`'s suite
with its standard protocols (OpenAI CLIP's prompts for every registered dataset, CLIP_benchmark's linear probe
on joint features unless --linear-protocol / --linear-features say otherwise), so with the same flags its
numbers equal training's and `eval`'s. Each row records the evaluation's precision (`eval_precision`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from protorkd.commands import common
from protorkd.commands.flag_types import real

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "watch", help="evaluate new checkpoints of an experiment as they appear", description=__doc__
    )
    parser.add_argument(
        "experiment_dir",
        nargs="?",
        type=Path,
        help="experiment folder (the one holding params.txt); asked for when omitted",
    )
    parser.add_argument("--epoch", help="evaluate only checkpoints/epoch_N.pt (N or 'latest') and exit")
    parser.add_argument("--once", action="store_true", help="evaluate what is there now and exit")
    parser.add_argument(
        "--interval",
        type=real(above=0, maximum=86400),
        default=10.0,
        help="seconds between scans, also while waiting for the run to create the folder (default: 10)",
    )
    common.add_tasks_argument(parser)
    common.add_eval_data_dir_argument(parser)
    parser.add_argument(
        "--zeroshot-metadata",
        type=Path,
        help="JSON {dataset: {classes, templates}} overriding zero-shot class names and prompts (as in eval)",
    )
    common.add_linear_probe_arguments(parser)
    common.add_eval_precision_argument(parser)
    common.add_runtime_arguments(parser, workers=2)
    parser.set_defaults(func=run)


def _ask(args: argparse.Namespace) -> None:
    """The original tool's two questions, for interactive use."""
    args.experiment_dir = Path(input("Please input your experiment dir: ").strip())
    epoch = input('Specify a checkpoint epoch? (press "enter" to scan and evaluate all checkpoints) ').strip()
    args.epoch = epoch or None


def run(args: argparse.Namespace) -> int:
    from protorkd.errors import UsageError
    from protorkd.eval.monitor import ALL_CSV, evaluate_single, watch
    from protorkd.eval.suite import run_suite
    from protorkd.loading import load_model_from_checkpoint
    from protorkd.params import read_params
    from protorkd.train.logs import without_float_noise

    if args.experiment_dir is None:
        _ask(args)
    experiment_dir = args.experiment_dir
    params = experiment_dir / "params.txt"
    if not params.is_file() and (args.once or args.epoch is not None):
        raise UsageError(f"{experiment_dir} has no params.txt; point watch at an experiment folder")
    if not params.is_file():  # started before the run, as docs/watch.md suggests: wait for it
        log.info("waiting for %s (the run has not created its folder yet)", params)
        while not params.is_file():
            time.sleep(args.interval)
    try:
        training_run = read_params(params)
    except (OSError, ValueError, SyntaxError) as error:
        raise UsageError(f"cannot read {params} ({error}); point watch at a protorkd experiment folder") from None
    root = common.eval_root(args.eval_data_dir, training_run)
    device = common.device_from(args)
    tasks = common.parse_tasks(args.tasks)
    common.check_zeroshot_metadata(args.zeroshot_metadata)
    options = common.eval_options(args, device)
    info = options.record_fields()

    def evaluate(path: Path) -> dict[str, float]:
        loaded = load_model_from_checkpoint(path)
        return without_float_noise(run_suite(loaded.model.to(device), root, tasks=tasks, options=options).metrics)

    if args.epoch is not None:
        if args.epoch != "latest" and not args.epoch.isdigit():
            raise UsageError(f"--epoch {args.epoch!r}: expected a number or 'latest'")
        checkpoint = experiment_dir / "checkpoints" / f"epoch_{args.epoch}.pt"
        if not checkpoint.is_file():
            raise UsageError(f"no checkpoint at {checkpoint}")
        out = evaluate_single(experiment_dir, args.epoch, evaluate, info=info)
        print(f"wrote {out}")
        return 0
    last_epoch = training_run.optim.epochs
    log.info("watching %s (data root %s, last epoch %d)", experiment_dir / "checkpoints", root, last_epoch)
    try:
        watch(experiment_dir, evaluate, last_epoch=last_epoch, interval=args.interval, once=args.once, info=info)
    except KeyboardInterrupt:
        log.info("stopped; every finished evaluation is in %s", experiment_dir / ALL_CSV)
    return 0
