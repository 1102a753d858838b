"""`protorkd demo-data --out DIR`: write the built-in demo corpus in the CC3M layout (images + TSV)."""

from __future__ import annotations

import argparse
from pathlib import Path

from protorkd.commands.flag_types import integer
from protorkd.config import MAX_DEMO_SIZE, MAX_SEED


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo-data", help="write the built-in demo corpus as images + TSV", description=__doc__
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to create (must not exist or be empty)")
    parser.add_argument(
        "--size",
        type=integer(1, MAX_DEMO_SIZE),
        default=10240,
        help=f"training pairs (default: 10240; at most {MAX_DEMO_SIZE})",
    )
    parser.add_argument("--seed", type=integer(0, MAX_SEED), default=0, help="corpus seed (default: 0)")
    parser.add_argument(
        "--eval-per-class",
        type=integer(1, 10_000),
        default=100,
        help="held-out images per class and split (default: 100; at most 10000)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from protorkd.data.demo import write_demo_corpus
    from protorkd.errors import UsageError

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder; choose a new folder")
    if args.out.exists() and any(args.out.iterdir()):
        raise UsageError(f"--out {args.out} exists and is not empty; choose a new folder")
    if args.out.exists():
        args.out.rmdir()
    write_demo_corpus(args.out, size=args.size, seed=args.seed, eval_per_class=args.eval_per_class)
    print(f"wrote {args.size} training pairs to {args.out / 'train.tsv'} and a held-out split to {args.out / 'eval'}")
    print(f"train on it with: protorkd train --train-data {args.out / 'train.tsv'} --eval-data-dir {args.out / 'eval'}")
    return 0
