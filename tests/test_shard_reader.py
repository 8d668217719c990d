"""shared.shard_reader: the direct shard reader returns exactly zarr's bytes, or declines."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr

from shared.cache_format import StackReader, compressors, read_manifest
from shared.errors import UserError
from shared.shard_reader import ShardChecksumError, ShardedArrayReader


def sharded_array(path, codec: str = "zstd1", shape=(1000, 5, 16), chunks=(64, 1, 16), shards=(256, 5, 16)):
    array = zarr.create_array(str(path), shape=shape, chunks=chunks, shards=shards, dtype="uint16", fill_value=0,
                              compressors=compressors(codec))
    # bf16 bits of normal values, as the cache stores: compressible (sign and exponent bits), so
    # every codec's real decoding path runs, not its stored-as-is fallback
    normal = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    values = (normal.view(np.uint32) >> 16).astype(np.uint16)
    return array, values


@pytest.mark.parametrize("codec", ["zstd1", "none", "blosc-lz4", "blosc-zstd"])
def test_reads_equal_zarr_for_any_box(tmp_path, codec):
    array, values = sharded_array(tmp_path / "a", codec)
    array[:] = values
    reader = ShardedArrayReader.open(tmp_path / "a")
    assert reader is not None
    rng = np.random.default_rng(1)
    boxes = [(0, 1000, 0, 5), (999, 1000, 4, 5), (255, 257, 0, 5), (990, 1200, 1, 3)]
    boxes += [(int(a), int(a + rng.integers(1, 400)), int(c), int(c + rng.integers(1, 5 - c + 1)))
              for a, c in zip(rng.integers(0, 1000, 40), rng.integers(0, 5, 40), strict=True)]
    for start, stop, c0, c1 in boxes:
        got = reader.read(start, stop, slice(c0, c1))
        assert got.dtype == np.uint16 and np.array_equal(got, array[start:stop, c0:c1]), (start, stop, c0, c1)
        assert np.array_equal(got, values[start:stop, c0:c1])
    # written into a strided destination, as side_train.data.read_layers does
    out = np.zeros((300, 7, 16), dtype=np.uint16)
    reader.read(100, 400, slice(1, 4), out=out[:, 2:5])
    assert np.array_equal(out[:, 2:5], values[100:400, 1:4]) and not out[:, :2].any() and not out[:, 5:].any()
    with pytest.raises(ValueError, match="out is"):
        reader.read(0, 10, slice(0, 2), out=np.zeros((10, 3, 16), dtype=np.uint16))


def test_unwritten_shards_and_chunks_read_as_the_fill_value(tmp_path):
    array, values = sharded_array(tmp_path / "a")
    array[0:100] = values[0:100]  # shard 0 partly written, shards 1-3 never
    reader = ShardedArrayReader.open(tmp_path / "a")
    assert np.array_equal(reader.read(0, 1000, slice(None)), array[:])
    assert not reader.read(300, 1000, slice(None)).any()


def test_other_layouts_are_left_to_zarr(tmp_path):
    gzip = zarr.create_array(str(tmp_path / "gzip"), shape=(10, 2, 4), chunks=(5, 1, 4), shards=(10, 2, 4), dtype="uint16",
                             compressors=[zarr.codecs.GzipCodec(), zarr.codecs.Crc32cCodec()])
    plain = zarr.create_array(str(tmp_path / "plain"), shape=(10, 2, 4), chunks=(5, 1, 4), dtype="uint16")
    split_width, _ = sharded_array(tmp_path / "w", chunks=(64, 1, 8))
    assert gzip is not None and plain is not None and split_width is not None
    for name in ("gzip", "plain", "w", "missing"):
        assert ShardedArrayReader.open(tmp_path / name) is None


def test_a_damaged_chunk_or_index_fails_its_checksum(tmp_path):
    array, values = sharded_array(tmp_path / "a")
    array[:] = values
    shard = tmp_path / "a" / "c" / "1" / "0" / "0"
    original = shard.read_bytes()
    for position in (100, len(original) - 10):  # a chunk's bytes, then the index
        damaged = bytearray(original)
        damaged[position] ^= 0x01
        shard.write_bytes(bytes(damaged))
        with pytest.raises(ShardChecksumError, match="checksum"):
            ShardedArrayReader.open(tmp_path / "a").read(256, 512, slice(None))
    shard.write_bytes(original[:50])
    with pytest.raises(ShardChecksumError, match="checksum"):
        ShardedArrayReader.open(tmp_path / "a").read(256, 512, slice(None))


def test_cache_stacks_use_it_and_it_pickles(t5_cache):
    meta = read_manifest(t5_cache)["splits"]["train"]["stacks"]["encoder"]
    reader = StackReader(t5_cache, "train", "encoder", meta)
    assert reader.fast_hidden is not None
    total = int(reader.offsets[-1])
    assert np.array_equal(reader.read_tokens(0, total), reader.hidden[:])
    assert np.array_equal(reader.read_tokens(3, total - 2, slice(1, 3)), reader.hidden[3:total - 2, 1:3])
    clone = pickle.loads(pickle.dumps(reader.fast_hidden))
    assert np.array_equal(clone.read(0, total, slice(None)), reader.hidden[:])


def test_a_damaged_cache_is_a_user_error(t5_cache, tmp_path):
    import shutil

    from shared.cache_format import shard_path

    copy = tmp_path / "copy"
    shutil.copytree(t5_cache, copy)
    path = shard_path(copy, "train", "encoder", 0)
    data = bytearray(path.read_bytes())
    data[40] ^= 0x10
    path.write_bytes(bytes(data))
    meta = read_manifest(copy)["splits"]["train"]["stacks"]["encoder"]
    with pytest.raises(UserError, match="failed its checksum"):
        StackReader(copy, "train", "encoder", meta).read_tokens(0, 10)
