"""`flag`: a dataclass field that documents itself, for the option dataclasses the library owns.

A library spec (`models.ModelOptions`, `losses.LossOptions`) is a plain dataclass; each field's metadata
carries its help text and allowed choices, so the app (`protorkd.config`) can turn every field into a
command-line flag `--field-name` without the library knowing about argparse.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def flag(
    default: Any,
    help: str,
    choices: tuple[Any, ...] | None = None,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field that is also a command-line flag (named after the field unless `name` is given)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": name, "aliases": aliases})
