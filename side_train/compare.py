"""`python -m side_train.compare`: LST against the other parameter-efficient methods, on one backbone.

    python -m side_train.compare --methods full,lora,lst-live,lst-cached              # embedded default
    python -m side_train.compare --model t5-base --task synthetic --memory-on meta    # Table 1 shape
    python -m side_train.compare --train-steps 300                                    # + test metric

Every method gets the same backbone, data, batch size and sequence length. Per method:
trainable parameters (and their share of the backbone), peak training memory, seconds per
training step and, with --train-steps, the test metric after an equal training budget.

Memory: the accounting of side_train.memory (parameters, gradients, AdamW state, tensors
saved for backward, the batch), counted on a real training step on --device, or with
--memory-on meta on PyTorch's meta device (same bytes, nothing computed, any size). On CUDA
it also records `max_memory_allocated` over a warm training step. The measured batch is the
first --batch-size examples of the training split, which are the longest (storage order).

LST-live runs the frozen backbone under `torch.inference_mode` each step; LST-cached keeps no
backbone on the device, only the side network (and, for T5, the LM head it reuses), and
reads states that were extracted beforehand (for the measurement: states of the right shape
created on the device; for training: a cache made by backbone_cache.extraction).

Writes compare.csv, compare.json and compare.png (memory against metric) to --out. This module
turns flags into a `CompareConfig`; running is side_train.compare_run, reporting
side_train.compare_report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli import Parser, add_data_arguments, add_model_arguments, data_config, model_config
from shared.errors import UserError, cli_entry
from side_train.baselines import ADAPTER_WIDTH, LORA_RANK, PROMPT_TOKENS, BaselineSizes
from side_train.compare_report import format_table, write_outputs
from side_train.compare_run import DEFAULT_LR, KNOWN_METHODS, METHODS, CompareConfig, compare
from side_train.model import SideOptions, parse_layer_list
from side_train.recipe import INITS


def build_parser() -> Parser:
    p = Parser(prog="python -m side_train.compare", description=__doc__.split("\n")[0])
    g = p.add_argument_group("backbone and data")
    add_model_arguments(g)
    g.add_argument("--random-init", action="store_true", help="build the model from its config with random weights (shape studies)")
    add_data_arguments(g, "; synthetic: exactly --max-length random tokens per example (shape studies)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g = p.add_argument_group("what to measure")
    g.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {','.join(KNOWN_METHODS)} (qlora: CUDA and bitsandbytes only, else a skipped row)")
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument("--memory-on", default="device", choices=["device", "meta"], help="count memory on a real step, or on the meta device")
    g.add_argument("--time-steps", type=int, default=3, help="timed training steps per method after two warm-up steps (0: no timing)")
    g.add_argument("--time-batch-size", type=int, default=None, help="batch size for timing (default: --batch-size)")
    g.add_argument("--train-steps", type=int, default=0, help="train each method this many steps, then evaluate (0: no training)")
    g.add_argument("--eval-batch-size", type=int, default=100)
    g.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="learning rate of a method (defaults: DEFAULT_LR)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="runs/compare", help="folder for compare.csv, compare.json, compare.png")
    g.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("method sizes (defaults: the paper's T5-base settings)")
    g.add_argument("--adapter-width", type=int, default=ADAPTER_WIDTH)
    g.add_argument("--lora-rank", type=int, default=LORA_RANK)
    g.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    g.add_argument("--reduction", type=int, default=8, help="LST: side width = backbone width / r")
    g.add_argument("--side-layers", default=None, help="LST: comma-separated backbone blocks that feed side blocks")
    g.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"],
                   help="LST's head input (decoder: label words unless last, a head on the last token; its baselines use the same head)")
    g.add_argument("--drop-layers", type=int, default=0, help="LST: drop N interleaved layers (the paper drops 3 per T5-base stack)")
    g.add_argument("--dropout", type=float, default=0.1, help="LST: the side network's dropout")
    g.add_argument("--attention-dropout", type=float, default=None, help="LST: dropout on attention probabilities (default: --dropout)")
    g.add_argument("--free-blocks", type=int, default=0, help="LST, decoders: side blocks after the laddered ones, with no ladder")
    g.add_argument("--merge-final", action="store_true",
                   help="LST, decoders: QST's gated mix of the backbone's final normed state before the LM head")
    g.add_argument("--standardize-ladders", action="store_true",
                   help="LST: ladders read each channel standardized by training-split statistics (as side_train.run's flag)")
    g.add_argument("--init", default="fisher", choices=INITS, help="LST side init for training runs: pruned by importance, or random")
    g.add_argument("--fisher-samples", type=int, default=1024)
    g.add_argument("--cache", default=None, help="LST-cached training: a cache of this model and data (default: extract into OUT/cache)")
    return p


def parse_lrs(items: list[str]) -> dict[str, float]:
    """DEFAULT_LR with the --lr METHOD=LR items given."""
    lrs = dict(DEFAULT_LR)
    for item in items:
        method, sep, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = 0.0
        if not sep or method not in KNOWN_METHODS or not rate > 0:
            raise UserError(f"--lr {item!r} must look like lora=1e-3 with a known method and a positive rate")
        lrs[method] = rate
    return lrs


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    config = CompareConfig(
        model=model_config(args), data=data_config(args), random_init=args.random_init, device=args.device,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], batch_size=args.batch_size, memory_on=args.memory_on,
        time_steps=args.time_steps, time_batch_size=args.time_batch_size, train_steps=args.train_steps,
        eval_batch_size=args.eval_batch_size, lrs=parse_lrs(args.lr), seed=args.seed,
        sizes=BaselineSizes(args.adapter_width, args.lora_rank, args.prompt_tokens),
        side=SideOptions(reduction=args.reduction, side_layers=parse_layer_list(args.side_layers), drop_layers=args.drop_layers,
                         dropout=args.dropout, attention_dropout=args.attention_dropout, pooling=args.pooling,
                         merge_final=args.merge_final, standardize_ladders=args.standardize_ladders,
                         free_blocks=args.free_blocks),
        init=args.init, fisher_samples=args.fisher_samples, cache=args.cache, out=args.out, quiet=args.quiet,
    )
    config.check()
    return config


def parse_args(argv: list[str] | None) -> CompareConfig:
    return config_from_args(build_parser().parse_args(argv))


@cli_entry
def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    rows, settings = compare(config)
    records = write_outputs(rows, settings, out)
    print(format_table(records, settings))
    print(f"written: {out / 'compare.csv'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
