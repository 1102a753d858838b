"""`protorkd train`: distill a teacher into a student and write an experiment directory.

With no flags it trains the built-in demo (MiniLM text teacher -> small CNN image student) on the
generated shapes corpus and evaluates it. `torchrun --nproc_per_node N -m protorkd train ...` runs it
on N processes. `protorkd train @configs/protoclip-cc2.5m-1gpu.args --train-data my.tsv` reads flags from
a file (one or more flags per line, `#` starts a comment); flags after it override the file's.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from protorkd.config import add_config_arguments, config_from_namespace, validate_config

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a student (default: the built-in demo)",
        description=__doc__,
        fromfile_prefix_chars="@",
    )
    parser.convert_arg_line_to_args = flags_of_line
    parser.add_argument("--list-losses", action="store_true", help="print the registered loss names and exit")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def flags_of_line(line: str) -> list[str]:
    """The arguments on one line of an @file: shell-like words (quotes allowed), `#` to the end is a comment."""
    return shlex.split(line, comments=True)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.list_losses:
        from protorkd.losses import LOSSES

        print("\n".join(LOSSES.names()))
        return 0
    from protorkd import distributed
    from protorkd.train.loop import train

    cfg = config_from_namespace(args)
    validate_config(cfg)  # every flag's range and choices, before anything is created
    state = distributed.state_from_env()
    result = train(cfg)
    if state.is_master:
        print(f"experiment: {result.experiment_dir}")
        top1 = {k: v for k, v in result.metrics.items() if k.startswith("zeroshot/") and k.endswith("/top1")}
        for key, value in sorted(top1.items()):
            print(f"{key}: {value:.2f}")
    if state.distributed:
        # gloo workers often abort at interpreter exit; the group is already destroyed, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)
    return 0
