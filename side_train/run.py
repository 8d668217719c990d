"""`python -m side_train.run`: train a ladder side network from a cache, or on the fly.

    python -m side_train.run --cache ./cache --out runs/lst        # from cached states (RAM, GPU or disk tier)
    python -m side_train.run --cache ./cache --live --out runs/l   # same data, backbone live
    python -m side_train.run --model t5-base --task rte --out r    # live, no cache
    torchrun --nproc-per-node 4 -m side_train.run --cache ./cache --out runs/ddp   # data parallel

The run folder gets config.json, metrics.jsonl, summary.json, side_model/ and
best_side_model/ (safetensors + side_config.json), and checkpoint/ for resuming. Under torchrun
the run is data parallel (DistributedDataParallel; gloo on CPUs, NCCL on cuda:LOCAL_RANK):
--batch-size is each rank's, the global batch --batch-size x world size, and rank 0 writes
the run folder. This module turns flags into a `RunConfig`; the work is in side_train.runs.
"""

from __future__ import annotations

import argparse
import sys

from shared.cli import (
    Parser,
    add_data_arguments,
    add_model_arguments,
    add_storage_arguments,
    data_config,
    data_flags_given,
    model_config,
    storage_options,
)
from shared.distributed import ranks, teardown
from shared.errors import UserError, cli_entry
from side_train.model import SideOptions, parse_layer_list
from side_train.recipe import INITS, TIERS, SourceConfig, reader_mode
from side_train.runs import RunConfig, run
from side_train.train import TrainConfig


def build_parser() -> Parser:
    p = Parser(prog="python -m side_train.run", description=__doc__.split("\n")[0])
    g = p.add_argument_group("where ladder states come from")
    g.add_argument("--cache", default=None,
                   help="cache made by backbone_cache.extract: a folder, or a URL (s3://bucket/prefix, gs://..., any fsspec URL)")
    add_storage_arguments(g)
    g.add_argument("--live", action="store_true", help="run the backbone each batch (with --cache: on the cache's model and data)")
    add_model_arguments(g, " (live, without --cache)")
    add_data_arguments(g, " (live, without --cache)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--tier", default="auto", choices=TIERS,
                   help="where cached training states live: on the GPU, in host RAM, or streamed from disk (auto: the first that fits)")
    g.add_argument("--reader", type=reader_mode, default=None, metavar="MODE",
                   help="disk tier: how pools are read: inline (between steps, in the training thread), thread "
                        "(a background thread) or N (N spawn-started processes); default: inline for a CPU step on 4 CPUs "
                        "or fewer, thread beside a GPU on 4 CPUs or fewer, else 1 process")
    g = p.add_argument_group("side network")
    g.add_argument("--reduction", type=int, default=8, help="side width = backbone width / r")
    g.add_argument("--side-layers", default=None, help="backbone blocks that feed side blocks: indices and ranges, e.g. 0,2,9-17")
    g.add_argument("--drop-layers", type=int, default=0, help="drop N interleaved layers instead")
    g.add_argument("--free-blocks", type=int, default=0,
                   help="decoders: N side blocks after the laddered ones, fed by no ladder, each starting as the identity "
                        "(xLadder: with --side-layers on the top blocks, more depth above the backbone's deepest states)")
    g.add_argument("--init", default="fisher", choices=INITS, help="side block init: pruned by importance, or random")
    g.add_argument("--fisher-samples", type=int, default=1024, help="live fisher init: training examples")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="dropout on the attention probabilities (default: --dropout, as the reference); 0 lets fused "
                        "attention kernels run and makes the side step much cheaper at long lengths")
    g.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"],
                   help="classification head input: mean over tokens, the first token (encoders) or the last real token (decoders)")
    g.add_argument("--merge-final", action="store_true",
                   help="decoders: mix the backbone's final normed state into the side output before the LM head with a "
                        "learned per-channel gate (QST's output)")
    g.add_argument("--standardize-ladders", action="store_true",
                   help="ladders read each channel standardized by training-split statistics (mean, std), scaled to its "
                        "layer's median std: evens out an LLM's few huge channels for the optimizer")
    g = p.add_argument_group("training")
    g.add_argument("--out", default="runs/lst", help="run folder (resumed if it holds the same unfinished run)")
    g.add_argument("--epochs", type=int, default=None, help="default: the task's (20 small, 10 large)")
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=100,
                   help="examples per step and process; under torchrun the global batch is this x the world size")
    g.add_argument("--eval-batch-size", type=int, default=100)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup-steps", type=int, default=500)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: no clipping)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval", dest="eval_mode", default="candidates", choices=["candidates", "generate"],
                   help="T5: score the label set (no backbone) or greedy-generate (live backbone)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="side step arithmetic: bf16 autocast or fp32 (auto: bf16 on a GPU with bf16 units, else fp32; "
                        "bf16 on a CPU with AVX512-BF16 or AMX: epochs 1.3-1.45x faster)")
    g.add_argument("--recompute", action="store_true",
                   help="activation checkpointing of the side blocks: far less activation memory for about one more side forward")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps too")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --out")
    g.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args: argparse.Namespace, argv: list[str]) -> RunConfig:
    """The RunConfig of parsed flags (`argv`: the flags as given, to find data flags a cache makes meaningless)."""
    if args.cache:
        given = data_flags_given(argv)
        if given:
            raise UserError(f"{given[0]} sets how a live run cuts its data; a run from --cache takes the cache's data "
                            f"and lengths: drop {given[0]}, or train live without --cache")
    options = storage_options(args)
    if options and not (args.cache and "://" in args.cache):
        raise UserError("--storage-options is for a --cache on object storage (s3://, gs://, ...); drop it")
    source = SourceConfig(cache=args.cache, storage_options=options, live=args.live, model=model_config(args), data=data_config(args),
                          device=args.device, tier=args.tier, reader=args.reader)
    side = SideOptions(reduction=args.reduction, side_layers=parse_layer_list(args.side_layers), drop_layers=args.drop_layers,
                       dropout=args.dropout, attention_dropout=args.attention_dropout, pooling=args.pooling,
                       merge_final=args.merge_final, standardize_ladders=args.standardize_ladders,
                       free_blocks=args.free_blocks)
    train = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                        eval_batch_size=args.eval_batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                        weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, eval_mode=args.eval_mode,
                        save_every=args.save_every, recompute=args.recompute, precision=args.precision, quiet=args.quiet)
    config = RunConfig(source=source, side=side, train=train, init=args.init, fisher_samples=args.fisher_samples,
                       out=args.out, overwrite=args.overwrite)
    config.check()
    return config


def parse_args(argv: list[str] | None) -> RunConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    return config_from_args(build_parser().parse_args(argv), argv)


def format_summary(summary: dict) -> str:
    lines = [f"trainable parameters: {summary['trainable_parameters']:,} ({100 * summary['trainable_share']:.3f}% of the backbone)",
             f"peak memory: {summary['peak_memory_bytes'] / 2**20:,.1f} MiB ({summary['peak_memory_kind']})",
             f"time: {summary['train_seconds']:.1f} s training, {summary['seconds_per_epoch']:.2f} s per epoch"]
    if summary.get("training_memory"):  # side_train.memory's account of the largest step (one process)
        m = summary["training_memory"]
        parts = ", ".join(f"{label} {m[key] / 2**20:,.1f}" for key, label in (
            ("parameter_bytes", "parameters"), ("gradient_bytes", "gradients"), ("optimizer_bytes", "optimizer"),
            ("saved_bytes", "saved activations"), ("input_bytes", "batch")))
        live = (f"; the live backbone's weights beside it: {summary['live_backbone_bytes'] / 2**20:,.1f} MiB"
                if "live_backbone_bytes" in summary else "")
        lines.insert(2, f"training memory, largest step: {m['total_bytes'] / 2**20:,.1f} MiB ({parts} MiB){live}")
    for key, label in (("validation_best", "best validation"), ("test_at_best_validation", "test at best validation"),
                       ("test_last", "test at last epoch")):
        if summary.get(key):
            metrics = ", ".join(f"{k} {v:.2f}" for k, v in summary[key].items() if k != "score")
            lines.append(f"{label}: {metrics}")
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        summary = run(config)
    finally:
        teardown()
    if ranks().is_main:
        print(format_summary(summary))
        print(f"run folder: {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
