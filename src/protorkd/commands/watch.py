"""`protorkd watch`: evaluate each new checkpoint of an experiment once, e.g. on a spare GPU while it trains.

With no arguments it asks for the experiment folder and an optional epoch, like the original
evaluate_checkpoints.py. Results: EXP_DIR/evaluation_metrics_all.csv (+ .png), or
EXP_DIR/single_evaluation_metrics@epoch_N.csv for a single epoch.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
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
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between scans (default: 10)")
    parser.add_argument(
        "--tasks", default=None, help="comma-separated: zeroshot,linear,retrieval,sts,analysis (default: all with data)"
    )
    parser.add_argument(
        "--eval-data-dir",
        default=None,
        help="downstream data root (default: the run's --eval-data-dir, or the demo's held-out split)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: auto)")
    parser.add_argument("--batch-size", type=int, default=256, help="images or texts per batch (default: 256)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default: 2)")
    parser.set_defaults(func=run)


def _ask(args: argparse.Namespace) -> None:
    """The original tool's two questions, for interactive use."""
    args.experiment_dir = Path(input("Please input your experiment dir: ").strip())
    epoch = input('Specify a checkpoint epoch? (press "enter" to scan and evaluate all checkpoints) ').strip()
    args.epoch = epoch or None


def eval_root_for(experiment_dir: Path, explicit: str | None) -> Path:
    """--eval-data-dir, else the run's own, else the demo corpus's held-out split for demo runs."""
    from protorkd.config import read_params
    from protorkd.data.demo import demo_corpus_dir
    from protorkd.errors import UsageError

    params = experiment_dir / "params.txt"
    if not params.is_file():
        raise UsageError(f"{experiment_dir} has no params.txt; point watch at an experiment folder")
    cfg = read_params(params)
    if explicit:
        root = Path(explicit)
    elif cfg.eval.eval_data_dir:
        root = Path(cfg.eval.eval_data_dir)
    elif cfg.data.train_data is None:
        root = demo_corpus_dir(cfg.data.demo_size, cfg.data.demo_seed) / "eval"
    else:
        raise UsageError(f"{params} names no --eval-data-dir; pass --eval-data-dir ROOT")
    if not root.is_dir():
        raise UsageError(f"evaluation data root {root} does not exist; pass --eval-data-dir ROOT")
    return root


def run(args: argparse.Namespace) -> int:
    from protorkd.config import read_params
    from protorkd.distributed import DistState
    from protorkd.errors import UsageError
    from protorkd.eval.loading import load_model_from_checkpoint
    from protorkd.eval.suite import EvalOptions, run_suite
    from protorkd.train.setup import resolve_device
    from protorkd.watch import evaluate_single, watch

    if args.experiment_dir is None:
        _ask(args)
    experiment_dir = args.experiment_dir
    root = eval_root_for(experiment_dir, args.eval_data_dir)
    device = resolve_device(args.device, DistState())
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    options = EvalOptions(device=device, batch_size=args.batch_size, workers=args.workers)

    def evaluate(path: Path) -> dict[str, float]:
        loaded = load_model_from_checkpoint(path)
        return run_suite(loaded.model.to(device), root, tasks=tasks, options=options).metrics

    if args.epoch is not None:
        if args.epoch != "latest" and not args.epoch.isdigit():
            raise UsageError(f"--epoch {args.epoch!r}: expected a number or 'latest'")
        checkpoint = experiment_dir / "checkpoints" / f"epoch_{args.epoch}.pt"
        if not checkpoint.is_file():
            raise UsageError(f"no checkpoint at {checkpoint}")
        out = evaluate_single(experiment_dir, args.epoch, evaluate)
        print(f"wrote {out}")
        return 0
    last_epoch = read_params(experiment_dir / "params.txt").optim.epochs
    log.info("watching %s (data root %s, last epoch %d)", experiment_dir / "checkpoints", root, last_epoch)
    try:
        watch(experiment_dir, evaluate, last_epoch=last_epoch, interval=args.interval, once=args.once)
    except KeyboardInterrupt:
        log.info("stopped; every finished evaluation is in %s", experiment_dir / "evaluation_metrics_all.csv")
    return 0
