"""params.txt: every flag as the user gave it, written and read back, and what a resumed run may change.

The file is the original's format (`name: value`, sorted), then a separate section of the facts a run
derived (`RESOLVED_HEADER`); reading it back ignores that section, so a checkpoint's experiment can be
rebuilt from exactly the flags it was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protorkd.config import GROUPS, Config, _base_type, _field_types, _fields, _parse_value, flag_name
from protorkd.io import atomic_write


def resumable_flags() -> set[str]:
    """Field names of the flags a continued run may change (`flag(..., resumable=True)`): how long to train,
    how often to evaluate and save, where logs and data live, how many workers load them."""
    return {name for name, f in _fields().items() if f.metadata.get("resumable")}


def flag_differences(stored: dict[str, Any], current: Config) -> dict[str, tuple[Any, Any]]:
    """{field name: (stored value, current value)} for every flag whose value in `stored` (params.txt or a
    checkpoint's config) differs from `current`; a flag missing from `stored` counts as its default."""
    fields = _fields()
    return {
        name: (stored.get(name, fields[name].default), value)
        for name, value in current.to_flat_dict().items()
        if stored.get(name, fields[name].default) != value
    }


def describe_differences(differences: dict[str, tuple[Any, Any]]) -> str:
    """`--epochs 3 -> 5, --lr 0.002 -> 0.001` (flag names, old and new values)."""
    fields = _fields()
    return ", ".join(f"{flag_name(fields[name])} {old!r} -> {new!r}" for name, (old, new) in differences.items())


RESOLVED_HEADER = "# resolved by protorkd (facts of the run, not flags)"


def write_params(config: Config, path: Path, resolved: dict[str, Any] | None = None) -> None:
    """params.txt: one `name: value` line per flag as the user gave it, sorted by name (the original's format),
    then, after a `# resolved ...` line, the facts the run derived (experiment name, world size, version...).

    Values are written with repr() for strings so that tabs and newlines survive the round trip.
    """
    lines = [f"{name}: {_format_value(value)}\n" for name, value in sorted(config.to_flat_dict().items())]
    if resolved:
        lines.append(f"\n{RESOLVED_HEADER}\n")
        lines += [f"{name}: {_format_value(value)}\n" for name, value in sorted(resolved.items())]
    atomic_write(path, "".join(lines))


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return str(value)


def read_params(path: Path) -> Config:
    """Read params.txt back into the same Config (the resolved section and unknown names are ignored)."""
    hints: dict[str, Any] = {}
    for group_cls in GROUPS.values():
        hints.update(_field_types(group_cls))
    values: dict[str, Any] = {}
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line == RESOLVED_HEADER:
            break
        if not line.strip():
            continue
        name, sep, text = line.partition(": ")
        if not sep:
            raise ValueError(f"{path}:{line_number}: expected 'name: value', got {line!r}")
        if name not in hints:
            continue
        scalar, _ = _base_type(hints[name])
        if scalar is str and text != "None":
            import ast

            values[name] = ast.literal_eval(text)
        else:
            values[name] = _parse_value(text, hints[name])
    return Config.from_flat_dict(values)
