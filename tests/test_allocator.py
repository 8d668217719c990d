"""shared.allocator: large CPU tensors come from the heap, so repeated steps reuse memory."""

from __future__ import annotations

import ctypes
import platform
import sys

import pytest
import torch

from shared.allocator import keep_freed_memory, release_freed_memory

glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mapped_bytes() -> int:
    """glibc's count of bytes in mmap-served allocations."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(not glibc, reason="the allocator settings are glibc's; other C libraries keep their defaults")
def test_large_tensors_come_from_the_heap_after_keep_freed_memory():
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    before = mapped_bytes()
    big = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MiB: an mmap of its own under glibc's defaults
    big.fill_(1)
    assert mapped_bytes() - before < 1 << 20
    del big
    release_freed_memory()
