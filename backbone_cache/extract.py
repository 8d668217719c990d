"""`python -m backbone_cache.extract`: run the frozen backbone once, store its ladder inputs.

This module only turns flags into an `ExtractConfig`; the work is in
backbone_cache.extraction (walkthrough there). Under `torchrun --nproc-per-node N -m
backbone_cache.extract ...` the ranks share the work by whole shards (docs/scaling.md).
"""

from __future__ import annotations

import sys

from backbone_cache.extraction import DEFAULT_CHUNK_MIB, DEFAULT_CODEC, DEFAULT_SHARD_MIB, INITS, ExtractConfig, Extraction
from shared import distributed
from shared.cache_format import CODECS
from shared.cli import (
    Parser,
    add_data_arguments,
    add_model_arguments,
    add_storage_arguments,
    data_config,
    model_config,
    storage_options,
)
from shared.errors import cli_entry
from shared.tasks import SPLITS


def parse_command(argv: list[str] | None) -> tuple[ExtractConfig, bool]:
    """The ExtractConfig of the flags, and whether --dry-run was given."""
    p = Parser(prog="python -m backbone_cache.extract", description=__doc__.split("\n")[0])
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--out", required=True,
                   help="cache folder to create (or resume), or an object-storage URL: s3://bucket/prefix, gs://bucket/prefix")
    add_storage_arguments(p)
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to extract")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--layers", default="all",
                   help="states kept per stack: 'all', or indices and ranges (0 = embeddings, i + 1 = block i's output), e.g. 0,10-18")
    p.add_argument("--codec", default=None, choices=CODECS,
                   help=f"compression of hidden states (default {DEFAULT_CODEC}, or the codec of the cache already at --out)")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help=f"target inner chunk size, the read unit (default {DEFAULT_CHUNK_MIB:g}, or what a cache at --out has)")
    p.add_argument("--shard-mib", type=float, default=None,
                   help=f"target shard size, the write unit, one file (default {DEFAULT_SHARD_MIB:g}, or what a cache at --out has)")
    p.add_argument("--storage", default="bf16", choices=["bf16", "fp8", "int8"],
                   help="stored precision of the states: bf16 bits, fp8 e4m3 with per-token scales, or int8 with "
                        "outlier channels in bf16")
    p.add_argument("--outlier-channels", type=int, default=4, help="--storage int8: channels per layer kept in bf16")
    p.add_argument("--init", default="fisher", choices=INITS,
                   help="the pruned init the cache prepares for: fisher stores Fisher importance scores "
                        "(magnitude and random need none)")
    p.add_argument("--fisher-samples", type=int, default=1024, help="training examples for Fisher importance")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete or different cache at --out (on object storage the old one is deleted first)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the tokens, the cache size per storage precision and layer subset, and the estimated time; "
                        "write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    config = ExtractConfig(
        out=args.out, model=model_config(args), data=data_config(args), splits=[s for s in args.splits.split(",") if s],
        batch_size=args.batch_size, device=args.device, layers=args.layers, codec=args.codec, chunk_mib=args.chunk_mib,
        shard_mib=args.shard_mib, storage=args.storage, outlier_channels=args.outlier_channels, init=args.init,
        fisher_samples=args.fisher_samples, overwrite=args.overwrite, quiet=args.quiet, storage_options=storage_options(args),
    )
    config.check()
    return config, args.dry_run


def parse_args(argv: list[str] | None) -> ExtractConfig:
    """The ExtractConfig of the flags (the Python API's way to build one from a command line)."""
    return parse_command(argv)[0]


@cli_entry
def main(argv: list[str] | None = None) -> int:
    config, dry_run = parse_command(argv)
    try:
        extraction = Extraction(config)
        if dry_run:
            if extraction.ranks.is_main:
                print(extraction.dry_run())
            return 0
        folder = extraction.run()
        if extraction.ranks.is_main:
            m = extraction.manifest
            total = sum(s["num_tokens"] for sp in m["splits"].values() for s in sp["stacks"].values())
            print(f"cache ready: {folder} ({len(m['splits'])} splits, {total:,} stored token-states per stack summed)")
        return 0
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())

