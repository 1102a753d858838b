"""SIGTERM unwinds like Ctrl-C; a signal during a held block (a checkpoint write) arrives right after it."""

from __future__ import annotations

import re
import signal

import pytest

from protorkd import failpoints
from protorkd.interrupts import Terminated, signals_held, terminate_like_interrupt


def test_a_signal_during_a_held_block_is_delivered_right_after_it():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            done.append("the write went on")  # the signal did not cut the block short
        done.append("after the block")  # ... and was not lost either: raised before this
    assert done == ["the write went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_sigterm_raises_terminated_an_interrupt():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        terminate_like_interrupt()
        with pytest.raises(Terminated) as raised:
            signal.raise_signal(signal.SIGTERM)
        assert isinstance(raised.value, KeyboardInterrupt) and raised.value.signum == signal.SIGTERM
        with pytest.raises(Terminated), signals_held():  # held like SIGINT
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_failpoints_send_signals_and_refuse_unknown_actions():
    assert failpoints.parse("train-step=3:SIGTERM,checkpoint-latest=1:SIGINT,a=2") == {
        "train-step": (3, "SIGTERM"),
        "checkpoint-latest": (1, "SIGINT"),
        "a": (2, "kill"),
    }
    with pytest.raises(ValueError, match=re.escape("NAME=N:kill|raise|SIGTERM|SIGINT|SIGSTOP (N >= 1)")):
        failpoints.parse("a=1:SIGHUP")
