"""Failpoints: named places where a process can be made to die or fail on purpose, for crash-recovery tests.

A failpoint is a call `failpoint("checkpoint-latest")` at a place where a crash is interesting. It does
nothing unless the environment variable `PROTORKD_FAILPOINTS` names it:

    PROTORKD_FAILPOINTS="train-step=3"              # SIGKILL itself the 3rd time it reaches train-step
    PROTORKD_FAILPOINTS="teacher-cache-chunk=1:raise,checkpoint-latest=2"

`name=N` acts the N-th time the process reaches `name`; the action is `kill` (the default: SIGKILL, which
nothing can catch, exactly like an out-of-memory kill or a preempted job), `raise` (a RuntimeError, as a
failing library call would), or a signal the process sends itself: `SIGTERM` (a scheduler's preemption),
`SIGINT` (Ctrl-C) or `SIGSTOP` (it freezes there, holding what it holds, until the test kills or continues it).
The variable is read once per process. The points, in the order a run meets them, are listed in
docs/reliability.md; tests use them to stop a run at a precise place instead of racing a timer. This is the
fail-point idea of FreeBSD's fail(9) and etcd's gofail, reduced to one variable.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENVIRONMENT_VARIABLE = "PROTORKD_FAILPOINTS"
SIGNALS = ("SIGTERM", "SIGINT", "SIGSTOP")
ACTIONS = ("kill", "raise", *SIGNALS)


def parse(spec: str) -> dict[str, tuple[int, str]]:
    """`"a=2,b=1:raise"` -> {"a": (2, "kill"), "b": (1, "raise")}; a malformed entry is a ValueError."""
    points: dict[str, tuple[int, str]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = entry.partition("=")
        count, _, action = rest.partition(":")
        action = action or "kill"
        if not name or not count.isdigit() or int(count) < 1 or action not in ACTIONS:
            raise ValueError(f"{ENVIRONMENT_VARIABLE}: {entry!r} is not NAME=N or NAME=N:{'|'.join(ACTIONS)} (N >= 1)")
        points[name] = (int(count), action)
    return points


_armed: dict[str, tuple[int, str]] | None = None
_reached: Counter[str] = Counter()


def arm(spec: str) -> None:
    """Arm the failpoints of `spec` (the `PROTORKD_FAILPOINTS` syntax) in this process, resetting the counts;
    `arm("")` disarms them all. For tests that run a command in-process."""
    global _armed
    _armed = parse(spec)
    _reached.clear()


def failpoint(name: str) -> None:
    """Die (SIGKILL), raise or signal itself here if `PROTORKD_FAILPOINTS` arms `name` and this is its N-th
    arrival."""
    global _armed
    if _armed is None:
        _armed = parse(os.environ.get(ENVIRONMENT_VARIABLE, ""))
    if name not in _armed:
        return
    _reached[name] += 1
    count, action = _armed[name]
    if _reached[name] != count:
        return
    if action == "raise":
        raise RuntimeError(f"failpoint {name} (reached {count} times; {ENVIRONMENT_VARIABLE})")
    os.kill(os.getpid(), signal.Signals[action] if action in SIGNALS else signal.SIGKILL)
