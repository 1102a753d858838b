"""`protorkd <command>`: parses flags, configures logging, calls the library.

Each command lives in its own module exposing `add_parser(subparsers)`, which registers the
command's flags and sets `func` to a `run(args) -> int` callable. Errors a user can fix (bad flags,
missing files, unknown names) end with one line on stderr and exit code 2; a write the disk or a file-size
limit refused, one line naming the file and exit code 1. SIGTERM (a preemption, `kill`) unwinds like Ctrl-C
(`protorkd.interrupts`): one line, exit code 143 (130 for Ctrl-C), a folder `--resume latest` continues.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from protorkd import __version__
from protorkd.errors import TrainingDiverged, UsageError, WriteFailed
from protorkd.interrupts import Terminated, terminate_like_interrupt

# command name -> module exposing add_parser(subparsers); imported lazily so `--help` stays fast.
COMMANDS = {
    "train": "protorkd.commands.train",
    "demo-data": "protorkd.commands.demo_data",
    "cache-teacher": "protorkd.commands.cache_teacher",
    "eval": "protorkd.commands.eval",
    "watch": "protorkd.commands.watch",
    "elevater": "protorkd.commands.elevater",
    "export": "protorkd.commands.export",
    "embed": "protorkd.commands.embed",
    "gather-cc": "protorkd.commands.gather_cc",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default also prints usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="protorkd", description="Distill compact vision-language encoders and measure them.")
    parser.add_argument("--version", action="version", version=f"protorkd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    wanted = [a for a in argv if a in COMMANDS][:1] or list(COMMANDS)
    for name, module_name in COMMANDS.items():
        if name not in wanted:
            subparsers.add_parser(name, help=f"see `protorkd {name} --help`")
            continue
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def _library_progress_bars_off() -> None:
    """Our bars show only on a terminal (`tqdm(disable=None)`); the Hugging Face libraries' bars (downloads,
    "Loading weights") follow the hub's switch, read when transformers is imported, so it is set first."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def packaged_recipe(argument: str) -> str:
    """`@configs/NAME.args` names the recipe shipped with protorkd (`protorkd/configs/`) when the current folder
    has no such file (an installed package, or a run started outside the clone); other arguments are unchanged."""
    if not argument.startswith("@configs/") or Path(argument[1:]).exists():
        return argument
    shipped = Path(__file__).parent / argument[1:]
    return f"@{shipped}" if shipped.is_file() else argument


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["train", *argv]  # `protorkd` alone runs the main job
    argv = [packaged_recipe(argument) for argument in argv]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s", datefmt="%H:%M:%S")
    if not sys.stderr.isatty():  # after parsing: --help and --version do not pay for the hub's import
        _library_progress_bars_off()
    terminate_like_interrupt()
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        print(f"protorkd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (TrainingDiverged, WriteFailed) as error:
        print(f"protorkd {args.command}: error: {error}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"protorkd {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + 15
    except KeyboardInterrupt:
        print(f"protorkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
