"""argparse types for the commands' own numeric flags: a range, finite, checked as the flags are parsed.

`protorkd train`'s flags are dataclass fields checked by `config.validate_config`; the other commands' flags
(`watch --interval`, `gather-cc --timeout`, `demo-data --size` ...) use these types, so a bad value is
argparse's one-line error (exit 2) before anything is created or computed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _bounds(minimum: float | None, above: float | None, maximum: float | None) -> str:
    parts = [f"at least {minimum}"] if minimum is not None else []
    parts += [f"greater than {above}"] if above is not None else []
    parts += [f"at most {maximum}"] if maximum is not None else []
    return " and ".join(parts)


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An integer within [minimum, maximum] (either may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{value}: must be {_bounds(minimum, None, maximum)}")
        return value

    return parse


def real(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None) -> Callable:
    """A finite number within the bounds (`above`: strictly greater than)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        in_range = (
            math.isfinite(value)
            and (minimum is None or value >= minimum)
            and (above is None or value > above)
            and (maximum is None or value <= maximum)
        )
        if not in_range:
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number, {_bounds(minimum, above, maximum)}")
        return value

    return parse
