"""`flag`: a dataclass field that documents and checks itself, for the option dataclasses the library owns.

A library spec (`models.ModelOptions`, `losses.LossOptions`) is a plain dataclass; each field's metadata
carries its help text, allowed choices and allowed range (`minimum=`, `above=`, `maximum=`, or a `Rule`),
so the app (`protorkd.config`) can turn every field into a command-line flag `--field-name`, show the rule
in `--help` and check a value against it, without the library knowing about argparse. Every float must also be
finite (`violation`), and a flag whose value sets how much memory a run takes has a `maximum`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
