"""params.txt: every flag as the user gave it, written and read back, and what a resumed run may change.

The file is the original's format (`name: value`, sorted), then a separate section of the facts a run
derived (`RESOLVED_HEADER`); reading it back ignores that section, so a checkpoint's experiment can be
rebuilt from exactly the flags it was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protorkd.config import GROUPS, Config, _field_types, _fields, flag_name
from protorkd.io import atomic_write
from protorkd.options import RESOLVED_HEADER, read_flag_values


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


def train_command(config: Config) -> str:
    """`protorkd train` with every flag of `config` that differs from its default: the command that trains
    exactly this run (params.txt holds the same flags, all of them)."""
    import shlex

    parts = ["protorkd", "train"]
    fields = _fields()
    for name, value in config.to_flat_dict().items():
        f = fields[name]
        if value == f.default:
            continue
        flag = flag_name(f)
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def read_params(path: Path) -> Config:
    """Read params.txt back into the same Config (the resolved section and unknown names are ignored)."""
    hints: dict[str, Any] = {}
    for group_cls in GROUPS.values():
        hints.update(_field_types(group_cls))
    return Config.from_flat_dict(read_flag_values(path, hints))
