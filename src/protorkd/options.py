"""`flag`: a dataclass field that documents and checks itself, for the option dataclasses the library owns.

A library spec (`models.ModelOptions`, `losses.LossOptions`) is a plain dataclass; each field's metadata
carries its help text, allowed choices and allowed range (`minimum=`, `above=`, `maximum=`, or a `Rule`),
so the app (`protorkd.config`) can turn every field into a command-line flag `--field-name`, show the rule
in `--help` and check a value against it, without the library knowing about argparse. Every float must also be
finite (`violation`), and a flag whose value sets how much memory a run takes has a `maximum`.
"""

from __future__ import annotations

import ast
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# params.txt: the user's flags as `name: value` lines, then this line and the facts the run derived
RESOLVED_HEADER = "# resolved by protorkd (facts of the run, not flags)"


@dataclass(frozen=True)
class Rule:
    """What values a flag accepts: `describe` completes "must be ..." and `ok` checks a value."""

    describe: str
    ok: Callable[[Any], bool]


def number_rule(minimum: float | None = None, above: float | None = None, maximum: float | None = None) -> Rule:
    """`minimum <= value`, `above < value`, `value <= maximum` (any of them), described in words."""
    parts = []
    if minimum is not None:
        parts.append(f"at least {minimum}")
    if above is not None:
        parts.append(f"greater than {above}")
    if maximum is not None:
        parts.append(f"at most {maximum}")

    def ok(value: Any) -> bool:
        return (
            (minimum is None or value >= minimum)
            and (above is None or value > above)
            and (maximum is None or value <= maximum)
        )

    return Rule(" and ".join(parts), ok)


def flag(
    default: Any,
    help: str,
    choices: tuple[Any, ...] | None = None,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    rule: Rule | None = None,
    resumable: bool = False,
) -> Any:
    """A dataclass field that is also a command-line flag (named after the field unless `name` is given).

    `minimum` / `above` / `maximum` (or a custom `rule`) bound its value; None always passes for an optional
    field. `resumable` marks a flag that may differ when a run is continued with `--resume` (it changes
    neither the model, the loss, the data nor the schedule of the steps already taken).
    """
    if rule is None and (minimum is not None or above is not None or maximum is not None):
        rule = number_rule(minimum, above, maximum)
    metadata = {"help": help, "choices": choices, "flag": name, "aliases": aliases, "rule": rule}
    return field(default=default, metadata={**metadata, "resumable": resumable})


def violation(metadata: Any, value: Any) -> str | None:
    """Why `value` is not allowed for a field with this metadata ("must be at least 1"), or None.

    A float must be finite whatever its rule says: no flag means anything by NaN or infinity."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    choices = metadata.get("choices")
    if choices and value not in choices:
        return "must be one of " + ", ".join(repr(c) if c is None or c == "" else str(c) for c in choices)
    rule = metadata.get("rule")
    if rule is not None and not rule.ok(value):
        return f"must be {rule.describe}"
    return None


def base_type(annotation: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of an annotation like `int | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def parse_value(text: str, annotation: Any) -> Any:
    """A flag value as params.txt writes it (strings with repr(), so tabs and newlines survive) -> its value."""
    scalar, optional = base_type(annotation)
    if optional and text == "None":
        return None
    if scalar is str:
        return ast.literal_eval(text)
    if scalar is bool:
        if text not in ("True", "False"):
            raise ValueError(f"expected True or False, got {text!r}")
        return text == "True"
    return scalar(text)


def read_flag_values(path: Path, hints: dict[str, Any]) -> dict[str, Any]:
    """The values of the flags named in `hints` ({field name: annotation}) among params.txt's `name: value`
    lines; the resolved section and other names are skipped. A malformed line is a ValueError naming it."""
    values: dict[str, Any] = {}
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line == RESOLVED_HEADER:
            break
        if not line.strip():
            continue
        name, sep, text = line.partition(": ")
        if not sep:
            raise ValueError(f"{path}:{line_number}: expected 'name: value', got {line!r}")
        if name in hints:
            values[name] = parse_value(text, hints[name])
    return values
