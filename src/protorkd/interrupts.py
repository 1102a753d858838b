"""SIGTERM handled like Ctrl-C, and writes that a signal cannot cut in half.

A SLURM preemption, `kill PID` or `timeout` sends SIGTERM. Python's default for it is to die on the spot:
no log line, the `finally` blocks skipped, half-written temporary files left behind. `terminate_like_interrupt`
turns it into `Terminated`, a `KeyboardInterrupt`, so it unwinds exactly as Ctrl-C does (temporary files
removed by `protorkd.io`, the lock released, one line from the CLI) and the folder stays resumable.

`signals_held` defers SIGINT and SIGTERM over a block that must finish once started (a checkpoint write):
a signal that arrives inside it is remembered and delivered as soon as the block ends, so it is neither
lost nor able to leave the block half done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HELD = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an interrupt so that it unwinds like Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def terminate_like_interrupt() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (a no-op outside it, where Python cannot
    install handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held; one that arrived meanwhile is delivered right after it.

    Outside the main thread (where handlers cannot be set) the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: arrived.append(signum)) for signum in HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(arrived):  # each once, in the order they came
        signal.raise_signal(signum)
