"""glibc's mmap threshold, fixed for CPU training runs (`protorkd.glibc_malloc`)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from protorkd.glibc_malloc import ENVIRONMENT_KEY, set_mmap_threshold


def _glibc_with_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


PROBE = """
import ctypes, sys
from protorkd.glibc_malloc import set_mmap_threshold

libc = ctypes.CDLL("libc.so.6")
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
Info = type("Info", (ctypes.Structure,), {"_fields_": [(name, ctypes.c_size_t) for name in FIELDS]})
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

if sys.argv[1] == "fixed":
    print(set_mmap_threshold(32))
block = libc.malloc(16 << 20)  # freed: glibc's adaptive threshold rises to 16 MiB
libc.free(block)
before = libc.mallinfo2().hblks
block = libc.malloc(24 << 20)
print(libc.mallinfo2().hblks - before)  # 1: a fresh mapping, 0: from the heap
libc.free(block)
"""


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_a_fixed_threshold_keeps_a_24_mib_block_on_the_heap_where_glibc_maps_it():
    env = {key: value for key, value in os.environ.items() if key != ENVIRONMENT_KEY}

    def probe(mode: str) -> list[str]:
        result = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert probe("default") == ["1"]  # above the adapted 16 MiB threshold: mmap, unmapped again on free
    assert probe("fixed") == ["32", "MiB", "0"]


def test_zero_leaves_the_default_and_the_environment_wins(monkeypatch):
    assert set_mmap_threshold(0) == "glibc default"
    monkeypatch.setenv(ENVIRONMENT_KEY, "1048576")
    assert set_mmap_threshold(32) == f"{ENVIRONMENT_KEY}=1048576"
