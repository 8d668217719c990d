"""The cache format (see docs/cache-format.md): layout, manifest, codecs and plain readers.

A cache is one Zarr v3 store (a folder):

    manifest.json                  what the cache holds; `complete` is set last
    zarr.json                      the root group
    <split>/examples.parquet       one row per stored example, in storage order
    <split>/<stack>/hidden         [tokens, layers, d] uint16 = bfloat16 bits, no padding
                                   (fp8: uint8 codes, int8: int8 codes; with `scale` [tokens,
                                   layers] float32, and for int8 `outliers` and `outlier_index`)
    <split>/<stack>/offsets        [n + 1] int64: example i owns tokens offsets[i]:offsets[i+1]
    <split>/<stack>/input_ids      [tokens] int32
    <split>/encoder/token_type_ids [tokens] int32, when the tokenizer returns them
    <split>/<stack>/labels         [tokens] int32 (decoder and candidates: target ids)
    importance.safetensors         optional per-row importance scores

Stacks are named by the backbone family (shared/families/): `encoder` for encoders, and
for T5 `encoder`, `decoder` (teacher-forced on the target) and `candidates` (every candidate
label's decoder states, example-major: offsets has n * K + 1 entries, K =
`sequences_per_example` in the manifest).

The same keys can live on object storage: every reader here takes a folder (str or Path),
a URL (s3://bucket/prefix, gs://..., any fsspec URL) or a shared.stores.CacheLocation that
carries storage options; remote arrays are read through zarr's FsspecStore.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from shared.errors import UserError
from shared.shard_reader import ShardedArrayReader
from shared.stores import CacheLocation

# A cache location: a folder (str or Path), a URL (s3://bucket/prefix, gs://..., any fsspec URL),
# or a shared.stores.CacheLocation carrying storage options (credentials, endpoint)
Where = str | Path | CacheLocation

FORMAT_NAME = "lst-activation-cache"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CODECS = ("none", "zstd1", "blosc-lz4", "blosc-zstd")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# --- bfloat16 bits --------------------------------------------------------------------------


def bf16_bits(states: torch.Tensor) -> np.ndarray:
    """Round to bfloat16 and return the raw bits as uint16 (zarr has no bfloat16 dtype)."""
    return states.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> torch.Tensor:
    """View uint16 bits as a bfloat16 tensor (no copy)."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


# --- codecs -------------------------------------------------------------------------------


def compressors(codec: str) -> list:
    """The zarr v3 bytes-to-bytes codecs for a codec name."""
    import zarr.codecs

    checksum = zarr.codecs.Crc32cCodec()  # every inner chunk carries a CRC32C, checked on every read
    if codec == "none":
        return [checksum]
    if codec == "zstd1":
        return [zarr.codecs.ZstdCodec(level=1), checksum]
    if codec == "blosc-lz4":
        # bit shuffle, then LZ4: on real bf16 states about 5% smaller than zstd1 and decoded 1.5-2x faster
        # (the reader's main CPU cost when streaming); typesize follows each array's dtype
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), checksum]
    if codec == "blosc-zstd":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2), checksum]
    raise UserError(f"unknown --codec {codec!r}; choose one of {', '.join(CODECS)}")


def stack_geometry(num_layers: int, d_model: int, chunk_mib: float, shard_mib: float) -> tuple[int, int]:
    """Tokens per inner chunk and per shard for target sizes in MiB.

    An inner chunk holds one layer ([chunk_tokens, 1, d]), so a reader that needs some
    layers reads only those; a shard holds every layer of shard_tokens tokens.
    """
    layer_bytes = d_model * 2
    chunk_tokens = max(1, int(chunk_mib * 2**20 // layer_bytes))
    per_shard = max(1, int(round(shard_mib * 2**20 / (chunk_tokens * layer_bytes * num_layers))))
    return chunk_tokens, chunk_tokens * per_shard


# --- manifest -----------------------------------------------------------------------------


def safe_name(name: str, what: str) -> str:
    """Names from a manifest become paths: allow plain names only, never `..` or `/`."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise UserError(f"the cache manifest names an unsafe {what} {name!r}; the cache is damaged or forged")
    return name


def read_manifest(cache_dir: Where) -> dict:
    """Read and check a manifest; a missing or foreign one is a user error."""
    loc = CacheLocation.of(cache_dir)
    cache_dir = loc.url
    path = f"{cache_dir}/{MANIFEST}" if not loc.is_local else loc.path / MANIFEST
    try:
        text = loc.read_bytes(MANIFEST).decode("utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        if not loc.exists():
            raise UserError(f"cache folder {cache_dir} does not exist; run `python -m backbone_cache.extract --out {cache_dir}` "
                            "first") from None
        raise UserError(f"{cache_dir} has no {MANIFEST}; it is not a cache (or extraction never started)") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid JSON; the cache is damaged, rebuild it with --overwrite") from None
    try:
        manifest = json.loads(text)
    except ValueError:
        raise UserError(f"{path} is not valid JSON; the cache is damaged, rebuild it with --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not an LST activation cache manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{cache_dir} uses cache format version {version}, this tool reads version {FORMAT_VERSION}; "
            "rebuild the cache with this version's backbone_cache.extract"
        )
    for split in manifest.get("splits", {}):
        safe_name(split, "split")
        for stack in manifest["splits"][split].get("stacks", {}):
            safe_name(stack, "stack")
    return manifest


def open_complete(cache_dir: Where, check: bool = True) -> dict:
    """The manifest of a complete cache, after the cheap file checks; an unfinished one is a user error."""
    manifest = read_manifest(cache_dir)
    if not manifest.get("complete"):
        raise UserError(f"cache {cache_dir} is incomplete; rerun the extract command that made it to finish it")
    if check:
        check_files(cache_dir, manifest)
    return manifest


def shard_key(split: str, stack: str, index: int, array: str = "hidden") -> str:
    """The key (relative to the cache root) of shard `index` of one of a stack's per-shard arrays."""
    keys = ["c", str(index), "0"] + ([] if array == "scale" else ["0"])
    return "/".join([safe_name(split, "split"), safe_name(stack, "stack"), array, *keys])


def shard_path(cache_dir: Where, split: str, stack: str, index: int, array: str = "hidden") -> Path:
    """The file of shard `index` of one of a stack's per-shard arrays (zarr v3 default chunk
    keys; `scale` is [tokens, layers], the others have a third axis)."""
    return CacheLocation.of(cache_dir).path / shard_key(split, stack, index, array)


_REBUILD = "the cache is damaged: rebuild it (the extract command with --overwrite)"
# the per-shard arrays of each precision: their files must all be there (zarr reads a missing one as zeros)
SHARDED_ARRAYS = {"bf16": ("hidden",), "fp8": ("hidden", "scale"), "int8": ("hidden", "scale", "outliers", "outlier_index")}


def check_files(cache_dir: Where, manifest: dict) -> None:
    """Cheap checks at open: every shard file of every per-shard array is present and
    non-empty (hidden, and the scales and outliers of fp8/int8 caches), and offsets add up.

    zarr reads a missing shard as zeros, so absence must be caught here; altered or
    truncated shards fail their CRC32C when read. On object storage the presence check is
    one listing of the cache's objects.
    """
    loc = CacheLocation.of(cache_dir)
    cache_dir = loc.url
    sizes = None if loc.is_local else loc.sizes()
    storage = manifest.get("storage", {})
    arrays = SHARDED_ARRAYS.get(storage.get("precision", "bf16"), ("hidden",))
    if storage.get("outlier_channels", 0) < 2:
        # one outlier channel: a shard whose channel is 0 in every layer is an all-zero chunk, which zarr does not write
        arrays = tuple(a for a in arrays if a != "outlier_index")
    for split, split_meta in manifest["splits"].items():
        for stack, meta in split_meta["stacks"].items():
            for name in arrays:
                for index in range(meta["num_shards"]):
                    key = shard_key(split, stack, index, name)
                    if sizes is not None:
                        missing = not sizes.get(key)
                    else:
                        path = loc.path / key
                        missing = not path.is_file() or path.stat().st_size == 0
                    if missing:
                        raise UserError(f"cache {cache_dir} is missing shard {index} of {split}/{stack}/{name}; {_REBUILD}")
            try:
                group = loc.open_group(f"{split}/{stack}", mode="r")
                offsets, hidden, input_ids = group["offsets"][:], group["hidden"], group["input_ids"]
            except (KeyError, FileNotFoundError, ValueError) as err:
                raise UserError(f"cache {cache_dir}: {split}/{stack} lacks an array or its metadata ({err}); "
                                f"{_REBUILD}") from None
            ok = (len(offsets) == meta["num_sequences"] + 1 and offsets[0] == 0 and offsets[-1] == meta["num_tokens"]
                  and bool(np.all(np.diff(offsets) > 0)) and hidden.shape[0] == meta["num_tokens"]
                  and input_ids.shape[0] == meta["num_tokens"])
            if not ok:
                raise UserError(f"cache {cache_dir}: {split}/{stack} offsets do not match its arrays; {_REBUILD}")
            shape = (len(meta["layers"]), manifest["model"]["d_model"])
            if tuple(hidden.shape[1:]) != shape:
                raise UserError(f"cache {cache_dir}: {split}/{stack}/hidden holds [{', '.join(map(str, hidden.shape[1:]))}] "
                                f"states per token where the manifest says {list(shape)}; {_REBUILD}")
        table = f"{split}/examples.parquet"
        if not (table in sizes if sizes is not None else (loc.path / table).is_file()):
            raise UserError(f"cache {cache_dir}: {split}/examples.parquet is missing; {_REBUILD}")


# --- readers ------------------------------------------------------------------------------


def _into(values: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return values
    out[...] = values
    return out


class StackReader:
    """One stack of one split: offsets in memory, hidden states read on demand."""

    def __init__(self, cache_dir: Where, split: str, stack: str, meta: dict):
        self.location = CacheLocation.of(cache_dir).join(safe_name(split, "split"), safe_name(stack, "stack"))
        self.path = self.location.path if self.location.is_local else self.location.url
        self.meta = meta
        self.layers: list[int] = list(meta["layers"])
        group = self.location.open_group(mode="r")
        self.group = group
        self.hidden = group["hidden"]
        # the same bytes as self.hidden[...], read without zarr's pipeline where the layout allows (shared.shard_reader);
        # on object storage zarr's own store reads (its async pipeline fetches chunks concurrently)
        self.fast_hidden = ShardedArrayReader.open(self.path / "hidden") if self.location.is_local else None
        self.precision = meta.get("precision", "bf16")
        if self.precision == "int8":
            self.outlier_index = np.asarray(group["outlier_index"][:])  # [shards, layers, k]
        self.offsets = np.asarray(group["offsets"][:], dtype=np.int64)
        self.input_ids = np.asarray(group["input_ids"][:], dtype=np.int32)
        self.labels = np.asarray(group["labels"][:], dtype=np.int32) if "labels" in group else None
        self.token_type_ids = np.asarray(group["token_type_ids"][:], dtype=np.int32) if "token_type_ids" in group else None

    def _hidden(self, start: int, stop: int, layers: slice, out: np.ndarray | None = None) -> np.ndarray:
        """hidden[start:stop, layers], into `out` if given (the direct reader decodes straight into it)."""
        if self.fast_hidden is not None and layers.step in (None, 1):
            return self.fast_hidden.read(start, stop, layers, out=out)
        return _into(self.hidden[start:stop, layers], out)

    def _decode(self, start: int, stop: int, layers: slice) -> np.ndarray:
        """fp8 / int8 storage back to bf16 bits (see shared.quantize)."""
        from shared.quantize import decode_fp8, decode_int8

        codes, scale = self._hidden(start, stop, layers), self.group["scale"][start:stop, layers]
        if self.precision == "fp8":
            return decode_fp8(codes, scale)
        outliers = self.group["outliers"][start:stop, layers]
        shard = int(self.meta["shard_tokens"])
        out = np.empty(codes.shape, dtype=np.uint16)
        for first in range(start - start % shard, stop, shard):  # outlier channels are chosen per shard
            a, b = max(first, start) - start, min(first + shard, stop) - start
            index = self.outlier_index[first // shard][layers]
            out[a:b] = decode_int8(codes[a:b], scale[a:b], outliers[a:b], index)
        return out

    def requantize(self, start: int, bits: np.ndarray) -> np.ndarray:
        """What storing fresh bf16 bits for tokens start.. at this stack's precision reads back as."""
        from shared.quantize import decode_fp8, decode_int8, encode_fp8, encode_int8

        if self.precision == "bf16":
            return bits
        if self.precision == "fp8":
            return decode_fp8(**{k if k == "scale" else "codes": v for k, v in encode_fp8(bits).items()})
        shard = int(self.meta["shard_tokens"])
        out = np.empty_like(bits)
        for first in range(start - start % shard, start + len(bits), shard):
            a, b = max(first, start) - start, min(first + shard, start + len(bits)) - start
            index = self.outlier_index[first // shard]
            parts = encode_int8(bits[a:b], index)
            out[a:b] = decode_int8(parts["hidden"], parts["scale"], parts["outliers"], index)
        return out

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def read_tokens(self, start: int, stop: int, layers: slice | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """uint16 bf16 bits [stop - start, layers, d] (written into `out` if given, which is
        returned); a failed checksum is a user error."""
        layers = slice(None) if layers is None else layers
        try:
            if self.precision == "bf16":
                return self._hidden(start, stop, layers, out)
            return _into(self._decode(start, stop, layers), out)
        except ValueError as err:
            if "checksum" not in str(err):
                raise
            raise UserError(f"cache shard data in {self.path} failed its checksum (tokens {start}:{stop}); "
                            f"{_REBUILD}") from None


def read_examples(cache_dir: Where, split: str):
    """The per-example table of a split (pyarrow Table, storage order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    loc = CacheLocation.of(cache_dir)
    key = f"{safe_name(split, 'split')}/examples.parquet"
    if loc.is_local:
        return pq.read_table(loc.path / key)
    return pq.read_table(pa.BufferReader(loc.read_bytes(key)))
