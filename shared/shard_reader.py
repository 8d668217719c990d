"""A direct reader for the cache's sharded arrays: the same bytes as zarr-python, less CPU.

zarr-python reads a shard through its asynchronous codec pipeline, with more CPU per byte
than the codecs need (zstd level 1 and CRC32C decode at about 0.9-1.5 and 10 GB/s on one
core of the development VM). For the layout `backbone_cache` writes (docs/cache-format.md)
this reader reads each shard's index once, then the inner chunks it needs with pread (not
mmap: resident memory does not grow with the cache), checks every CRC32C and decompresses
the chunks itself; over a training epoch's pool reads it takes about 30% less CPU than
zarr-python (`benchmarks/bench_reader.py`).

    <array>/zarr.json       sharding_indexed, index at the end
    <array>/c/<i>/<j>/<k>   inner chunks [bytes(little) -> zstd or blosc (optional) -> crc32c],
                            then the index: uint64 (offset, nbytes) per inner chunk + CRC32C

`ShardedArrayReader.open` returns None for any other layout (another codec, index at the
start, another key encoding, big-endian bytes); callers then read through zarr. Missing
shards and chunks read as the array's fill value, as in zarr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numpy as np
from numcodecs import Zstd

_EMPTY = np.uint64(2**64 - 1)  # index entry of a chunk that was never written


class ShardChecksumError(ValueError):
    """A shard's index or chunk does not match its CRC32C (the message says 'checksum')."""


class ShardedArrayReader:
    """Reads [rows, columns, width] boxes of a 3-D sharded zarr v3 array whose inner chunks span the width."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill_value = meta.get("fill_value") or 0
        self.shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        sharding = meta["codecs"][0]["configuration"]
        self.chunk_shape = tuple(sharding["chunk_shape"])
        names = {c["name"] for c in sharding["codecs"]}
        self._decompress = Zstd().decode if "zstd" in names else _blosc_decompress if "blosc" in names else None
        self.chunks_per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True))
        self.separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self._indexes: dict[tuple[int, int], tuple[Path, int, np.ndarray] | None] = {}

    @classmethod
    def open(cls, path: Path) -> ShardedArrayReader | None:
        """A reader for the array at `path`, or None where its layout is not the one described above."""
        try:
            meta = json.loads((Path(path) / "zarr.json").read_text())
            if not _supported(meta):
                return None
            return cls(path, meta)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    def read(self, start: int, stop: int, columns: slice, out: np.ndarray | None = None) -> np.ndarray:
        """array[start:stop, columns, :], written into `out` (any strides, same dtype) or a new array."""
        first_col, stop_col, step = columns.indices(self.shape[1])
        if step != 1:
            raise ValueError("ShardedArrayReader reads contiguous column ranges")
        stop = min(stop, self.shape[0])
        shape = (max(stop - start, 0), max(stop_col - first_col, 0), self.shape[2])
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype:
            raise ValueError(f"out is {out.dtype}{list(out.shape)}, the read gives {self.dtype}{list(shape)}")
        if out.size == 0:
            return out
        rows_per_shard, cols_per_shard = self.shard_shape[0], self.shard_shape[1]
        for shard_row in range(start // rows_per_shard, (stop - 1) // rows_per_shard + 1):
            for shard_col in range(first_col // cols_per_shard, (stop_col - 1) // cols_per_shard + 1):
                shard = self._index(shard_row, shard_col)
                row0, col0 = shard_row * rows_per_shard, shard_col * cols_per_shard
                lo_r, hi_r = max(start, row0), min(stop, row0 + rows_per_shard)
                lo_c, hi_c = max(first_col, col0), min(stop_col, col0 + cols_per_shard)
                if shard is None:
                    out[lo_r - start:hi_r - start, lo_c - first_col:hi_c - first_col] = self.fill_value
                    continue
                path, size, index = shard
                fd = os.open(path, os.O_RDONLY)
                try:
                    self._read_shard(fd, size, index, (shard_row, shard_col), out, start, first_col, lo_r, hi_r, lo_c, hi_c)
                finally:
                    os.close(fd)
        return out

    def _read_shard(self, fd: int, size: int, index: np.ndarray, where: tuple[int, int], out: np.ndarray, start: int,
                    first_col: int, lo_r: int, hi_r: int, lo_c: int, hi_c: int) -> None:
        """Rows lo_r:hi_r and columns lo_c:hi_c (array coordinates, inside one shard) into `out`."""
        rows_per_chunk, cols_per_chunk = self.chunk_shape[0], self.chunk_shape[1]
        row0, col0 = where[0] * self.shard_shape[0], where[1] * self.shard_shape[1]
        for chunk_row in range((lo_r - row0) // rows_per_chunk, (hi_r - 1 - row0) // rows_per_chunk + 1):
            for chunk_col in range((lo_c - col0) // cols_per_chunk, (hi_c - 1 - col0) // cols_per_chunk + 1):
                r0, c0 = row0 + chunk_row * rows_per_chunk, col0 + chunk_col * cols_per_chunk
                a_r, b_r = max(lo_r, r0), min(hi_r, r0 + rows_per_chunk)
                a_c, b_c = max(lo_c, c0), min(hi_c, c0 + cols_per_chunk)
                target = out[a_r - start:b_r - start, a_c - first_col:b_c - first_col]
                offset, nbytes = index[chunk_row, chunk_col, 0]
                if offset == _EMPTY:
                    target[...] = self.fill_value
                    continue
                chunk = self._decode(fd, size, int(offset), int(nbytes), where)
                target[...] = chunk[a_r - r0:b_r - r0, a_c - c0:b_c - c0]

    def _decode(self, fd: int, size: int, offset: int, nbytes: int, where: tuple[int, int]) -> np.ndarray:
        if nbytes < 4 or offset + nbytes > size:
            raise ShardChecksumError(f"shard {where}: a chunk lies outside the file (checksum not verifiable)")
        view = np.frombuffer(os.pread(fd, nbytes, offset), dtype=np.uint8)
        if len(view) != nbytes:
            raise ShardChecksumError(f"shard {where}: a chunk was cut short (checksum not verifiable)")
        payload, stored = view[:-4], int.from_bytes(view[-4:].tobytes(), "little")
        if google_crc32c.value(payload) != stored:
            raise ShardChecksumError(f"shard {where}: a chunk does not match its checksum")
        raw = self._decompress(payload) if self._decompress is not None else payload
        chunk = np.frombuffer(raw, dtype=self.dtype)
        if chunk.size != int(np.prod(self.chunk_shape)):
            raise ShardChecksumError(f"shard {where}: a chunk decodes to {chunk.size} values, not {np.prod(self.chunk_shape)}")
        return chunk.reshape(self.chunk_shape)

    def _index(self, shard_row: int, shard_col: int) -> tuple[Path, int, np.ndarray] | None:
        """(file, size, index [chunk rows, chunk cols, 1, 2]) of a shard, or None if it was never written."""
        key = (shard_row, shard_col)
        if key not in self._indexes:
            path = self.path / self.separator.join(["c", str(shard_row), str(shard_col), "0"])
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._indexes[key] = None
                return None
            try:
                size = os.fstat(fd).st_size
                index_bytes = int(np.prod(self.chunks_per_shard)) * 16
                if size < index_bytes + 4:
                    raise ShardChecksumError(f"shard {key}: the file is shorter than its index (checksum not verifiable)")
                tail = np.frombuffer(os.pread(fd, index_bytes + 4, size - index_bytes - 4), dtype=np.uint8)
            finally:
                os.close(fd)
            if google_crc32c.value(tail[:-4]) != int.from_bytes(tail[-4:].tobytes(), "little"):
                raise ShardChecksumError(f"shard {key}: the shard index does not match its checksum")
            self._indexes[key] = (path, size, tail[:-4].view("<u8").reshape(*self.chunks_per_shard, 2).copy())
        return self._indexes[key]


def _blosc_decompress(payload: np.ndarray) -> bytes:
    """A blosc frame (self-describing: compressor, shuffle, type size) decoded on the calling
    thread: the reader's CPU competes with the training step, so blosc's own threads stay off."""
    numcodecs.blosc.use_threads = False
    return numcodecs.blosc.decompress(payload)


def _supported(meta: dict) -> bool:
    """Whether an array's zarr.json has the layout this reader decodes."""
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or len(meta.get("shape", [])) != 3:
        return False
    if meta["chunk_grid"].get("name") != "regular" or meta["chunk_key_encoding"].get("name") != "default":
        return False
    if np.dtype(meta["data_type"]).kind not in "uif" or len(meta["codecs"]) != 1:
        return False
    codec = meta["codecs"][0]
    if codec.get("name") != "sharding_indexed":
        return False
    config = codec["configuration"]
    inner = [c["name"] for c in config["codecs"]]
    if inner not in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"], ["bytes", "blosc", "crc32c"]):
        return False
    if config["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
        return False
    index = config.get("index_codecs", [])
    if [c["name"] for c in index] != ["bytes", "crc32c"] or index[0].get("configuration", {}).get("endian", "little") != "little":
        return False
    if config.get("index_location", "end") != "end":
        return False
    shard, chunk, shape = meta["chunk_grid"]["configuration"]["chunk_shape"], config["chunk_shape"], meta["shape"]
    return all(s % c == 0 for s, c in zip(shard, chunk, strict=True)) and chunk[2] == shard[2] == shape[2]
