"""glibc's malloc on CPU training runs: keep per-step activations on the heap instead of fresh mappings.

glibc serves an allocation above its mmap threshold with a new anonymous mapping and unmaps it on free; the
kernel then faults in and zeroes every page of the next one. A CPU training step allocates and frees
activations of one to tens of MiB at every step; the threshold adapts to the sizes freed, yet in this
project's training runs the towers' forward and backward ran 1.2x slower than the same model in a bare
loop, and fixing the threshold removed the difference. Measured on this
project's 2-core AMD EPYC (docs/benchmarks.md): resnet9-tiny at 32 px, batch 256, 7.7 s an epoch with
glibc's default and 6.6 s with the threshold fixed at 32 MiB (the largest value glibc's adaptive threshold
reaches on 64-bit), interleaved one-epoch runs; over whole 27-28-epoch runs 7.9 s against 6.6 s. The same
as exporting MALLOC_MMAP_THRESHOLD_=33554432. Fixing the threshold keeps up to that much freed memory in
the process for reuse, which a training process reuses at the next step anyway.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # <malloc.h>
ENVIRONMENT_KEY = "MALLOC_MMAP_THRESHOLD_"  # glibc's own tunable: a user's setting wins


def set_mmap_threshold(megabytes: int) -> str:
    """Fix glibc's mmap threshold at `megabytes` MiB (0: leave glibc's adaptive default). Returns what holds,
    for the run's record: "32 MiB", "glibc default", "MALLOC_MMAP_THRESHOLD_=..." (the environment's), or
    "not glibc" (musl, macOS, Windows: nothing to do)."""
    if megabytes <= 0:
        return "glibc default"
    if ENVIRONMENT_KEY in os.environ:
        return f"{ENVIRONMENT_KEY}={os.environ[ENVIRONMENT_KEY]}"
    if not sys.platform.startswith("linux"):
        return "not glibc"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc"
    if not mallopt(M_MMAP_THRESHOLD, ctypes.c_int(megabytes << 20)):
        return "glibc default (mallopt refused the value)"
    return f"{megabytes} MiB"
