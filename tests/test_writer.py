"""The shard writer: bf16 rounding into shard buffers, whole-shard writes in order, resume, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from backbone_cache.writer import BackgroundWriter, StackWriter
from shared.cache_format import bf16_bits


def _array(tmp_path, tokens: int, shard: int = 8):
    return zarr.create_array(str(tmp_path / "hidden"), shape=(tokens, 2, 8), chunks=(4, 2, 8), shards=(shard, 2, 8),
                             dtype="uint16", fill_value=0)


def _write_all(writer: StackWriter, states: torch.Tensor, sizes: list[int]) -> None:
    first = 0
    for size in sizes:
        writer.write(first, states[first : first + size])
        first += size


@pytest.mark.parametrize("background", [True, False])
def test_states_are_rounded_to_bf16_and_written_shard_by_shard(tmp_path, background):
    states = torch.randn(29, 2, 8) * 100
    array = _array(tmp_path, 29)
    shards: list[int] = []
    runner = BackgroundWriter() if background else None
    writer = StackWriter(array, 8, 29, 0, shards.append, runner)
    _write_all(writer, states, [3, 7, 1, 10, 8])  # batches straddle shard edges
    if runner is not None:
        runner.close()
    np.testing.assert_array_equal(array[:], bf16_bits(states))
    assert shards == [0, 1, 2, 3] and writer.done and writer.committed == 29
    assert writer.bytes_written == 29 * 2 * 8 * 2


def test_uint16_bits_are_accepted_as_they_are(tmp_path):
    bits = bf16_bits(torch.randn(10, 2, 8))
    array = _array(tmp_path, 10)
    writer = StackWriter(array, 8, 10, 0, lambda _: None)
    writer.write(0, bits[:6])
    writer.write(6, bits[6:])
    np.testing.assert_array_equal(array[:], bits)


def test_a_resumed_writer_skips_committed_shards(tmp_path):
    states = torch.randn(20, 2, 8)
    array = _array(tmp_path, 20)
    shards: list[int] = []
    writer = StackWriter(array, 8, 20, 1, shards.append)  # shard 0 recorded as done
    assert writer.committed == 8
    _write_all(writer, states, [5, 5, 10])  # replayed from token 0, as extract does from the first batch needed
    stored = array[:]
    assert not stored[:8].any(), "committed tokens are not rewritten"
    np.testing.assert_array_equal(stored[8:], bf16_bits(states[8:]))
    assert shards == [1, 2]
    with pytest.raises(RuntimeError, match="writer gap"):
        writer.write(25, states[:1])


class _FailingArray:
    shape = (40, 2, 8)

    def __setitem__(self, key, value):
        raise OSError("disk full")


def test_a_failed_background_write_reaches_the_caller():
    runner = BackgroundWriter()
    writer = StackWriter(_FailingArray(), 8, 40, 0, lambda _: None, runner)
    with pytest.raises(OSError, match="disk full"):
        for first in range(0, 40, 4):  # never hangs waiting for a buffer the failed write held
            writer.write(first, torch.randn(4, 2, 8))
        runner.close()
