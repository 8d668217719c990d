"""`python -m backbone_cache.verify DIR`: check a cache before trusting it.

Checks, in order: the manifest and its format version; that the cache is complete; that
every shard file is present and the offsets add up; that every chunk passes its CRC32C
and holds no NaN or Inf; that the example tables and the importance file match the
manifest. With `--sample N`, N random examples are recomputed with the backbone, in the
same batches as extraction, and must match bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.cache_format import StackReader, bf16_bits, check_files, read_examples, read_manifest, safe_name
from shared.cli import Parser, add_storage_arguments, storage_options
from shared.errors import UserError, cli_entry
from shared.stores import CacheLocation

_EXPONENT = np.uint16(0x7F80)  # bf16 exponent bits; all ones means Inf or NaN


def check_values(cache_dir: Path, manifest: dict, quiet: bool = False) -> int:
    """Read every chunk (verifying CRC32C) and reject NaN/Inf; return the bytes read."""
    total = sum(m["num_tokens"] * len(m["layers"]) * manifest["model"]["d_model"] * 2
                for s in manifest["splits"].values() for m in s["stacks"].values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=quiet, dynamic_ncols=True) as bar:
        _check_values(cache_dir, manifest, bar)  # the bar is closed (its line ended) before any error is printed
    return total


def _check_values(cache_dir: Path, manifest: dict, bar: tqdm) -> None:
    for split, split_meta in manifest["splits"].items():
        for stack, meta in split_meta["stacks"].items():
            reader = StackReader(cache_dir, split, stack, meta)
            for start in range(0, meta["num_tokens"], meta["shard_tokens"]):
                bits = reader.read_tokens(start, min(start + meta["shard_tokens"], meta["num_tokens"]))
                bad = (bits & _EXPONENT) == _EXPONENT
                if bad.any():
                    token = start + int(np.argwhere(bad)[0][0])
                    raise UserError(f"{split}/{stack} holds NaN or Inf at token {token}; the backbone overflowed or the cache is damaged")
                bar.update(bits.nbytes)


def check_tables(cache_dir: Path, manifest: dict) -> None:
    for split, split_meta in manifest["splits"].items():
        rows = read_examples(cache_dir, split).num_rows
        if rows != split_meta["num_examples"]:
            raise UserError(f"{split}/examples.parquet has {rows} rows, the manifest says {split_meta['num_examples']}")
        for stack, meta in split_meta["stacks"].items():
            want = rows * meta["sequences_per_example"]
            if meta["num_sequences"] != want:
                raise UserError(f"{split}/{stack} has {meta['num_sequences']} sequences, expected {want}")
    info = manifest.get("importance")
    if info:
        from safetensors import safe_open

        loc = CacheLocation.of(cache_dir)
        name = safe_name(info["file"], "file")
        path = loc.path / name if loc.is_local else f"{loc.url}/{name}"
        try:
            if loc.is_local:
                with safe_open(str(path), framework="np") as handle:
                    list(handle.keys())
            else:
                from safetensors.numpy import load

                load(loc.read_bytes(name))
        except Exception:
            raise UserError(f"importance file {path} is missing or unreadable; rerun extraction") from None


def check_sample(cache_dir: Path, manifest: dict, samples: int, seed: int, device: str) -> int:
    """Recompute `samples` random examples in their extraction batches; demand identical bits."""
    from backbone_cache.extraction import ExtractConfig, Extraction
    from shared.config import DataConfig, ModelConfig

    name = manifest["model"]["name"]
    storage_layers = next(iter(manifest["splits"].values()))["stacks"]
    config = ExtractConfig(
        out=str(cache_dir), model=ModelConfig(None if name.endswith("(embedded)") else name, manifest["model"].get("revision")),
        data=DataConfig.from_json(manifest["data_source"]), splits=list(manifest["splits"]), batch_size=manifest["batch_size"],
        device=device, layers=",".join(map(str, next(iter(storage_layers.values()))["layers"])),
        codec=manifest["storage"]["codec"], chunk_mib=1.0, shard_mib=1.0, init="random", quiet=True,
        storage_options=CacheLocation.of(cache_dir).storage_options,
    )
    extraction = Extraction(config)
    if extraction.info.config_fingerprint != manifest["model"]["config_fingerprint"]:
        raise UserError("the model loaded now differs from the one the cache was built with; cannot recompute samples")
    compute = str(extraction.backbone.dtype).removeprefix("torch.")
    if compute != manifest["compute_dtype"]:
        raise UserError(f"the cache was computed in {manifest['compute_dtype']}, this machine would use {compute}; "
                        "run --sample on the same kind of device")
    rng = np.random.default_rng(seed)
    checked = 0
    for split, plan in extraction.plans.items():
        picks = rng.choice(plan.num_examples, size=min(samples, plan.num_examples), replace=False)
        for batch_index in sorted({int(p) // config.batch_size for p in picks}):
            rows = plan.batches[batch_index]
            fresh = extraction.forward_batch(plan, rows)
            for stack, states in fresh.items():
                bits = bf16_bits(states)
                reader = StackReader(cache_dir, split, stack, manifest["splits"][split]["stacks"][stack])
                k = plan.per_example(stack)
                first, last = int(plan.offsets[stack][rows.start * k]), int(plan.offsets[stack][rows.stop * k])
                stored = reader.read_tokens(first, last)
                bits = reader.requantize(first, bits)
                if not np.array_equal(stored, bits):
                    raise UserError(f"{split}/{stack}: recomputed states of batch {batch_index} differ from the cache; "
                                    "the cache does not match this model and data")
            checked += len([p for p in picks if int(p) // config.batch_size == batch_index])
    return checked


def verify(cache_dir: Path, sample: int = 0, seed: int = 0, device: str = "auto", quiet: bool = False) -> list[str]:
    """Run every check; return the report lines (a failed check raises UserError)."""
    manifest = read_manifest(cache_dir)
    report = [f"manifest: format {manifest['format_version']}, model {manifest['model']['name']}, task {manifest['task']['name']}"]
    if not manifest.get("complete"):
        raise UserError(f"cache {cache_dir} is incomplete; rerun the extract command that made it to finish it")
    check_files(cache_dir, manifest)
    report.append("files: every shard present, offsets consistent")
    check_tables(cache_dir, manifest)
    report.append("tables: example counts and importance file match the manifest")
    nbytes = check_values(cache_dir, manifest, quiet)
    report.append(f"values: {nbytes / 2**20:,.1f} MiB read, every CRC32C matches, no NaN or Inf")
    if sample:
        checked = check_sample(cache_dir, manifest, sample, seed, device)
        report.append(f"sample: {checked} examples recomputed, bit-identical")
    return report


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m backbone_cache.verify", description=__doc__.split("\n")[0])
    p.add_argument("cache", help="cache folder or URL (s3://bucket/prefix, ...)")
    add_storage_arguments(p)
    p.add_argument("--sample", type=int, default=0, help="recompute N random examples per split with the backbone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.sample < 0:
        raise UserError(f"--sample must be non-negative, got {args.sample}")
    cache = CacheLocation.of(args.cache, storage_options(args))
    cache.check_access()
    for line in verify(cache.path if cache.is_local else cache, args.sample, args.seed, args.device, args.quiet):
        print(line)
    print(f"OK: {args.cache} is a sound cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
