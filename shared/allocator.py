"""glibc malloc settings for CPU work with large, short-lived tensors.

By default glibc serves every allocation above 32 MiB (or less, as its threshold adapts)
with a fresh mmap and returns it to the OS on free, so a training step that makes the same
large temporaries each step (attention maps, dropout masks, logits) page-faults and zeroes
them anew every time: a product on a 51 MB tensor runs 4.5-5x slower than on reused
memory (2-core development VM; benchmarks/bench_side_ops.py, benchmarks/RESULTS.md). Serving them
from the heap and keeping freed memory in the process removes that cost; the process's
resident memory then stays near its peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import platform
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_applied = False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory (glibc only; once per
    process). Returns whether the settings are in effect."""
    global _applied
    if _applied:
        return True
    libc = _libc()
    if libc is None:
        return False
    # glibc versions that cap the mmap threshold at 32 MiB reject 1 GiB: fall back to the cap
    mapped = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    _applied = bool(mapped) and bool(libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _applied


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the OS now (glibc's malloc_trim; no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
