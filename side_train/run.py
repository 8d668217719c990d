"""`python -m side_train.run`: train a ladder side network from a cache, or on the fly.

    python -m side_train.run --cache ./cache --out runs/lst        # from cached states (RAM, GPU or disk tier)
    python -m side_train.run --cache ./cache --live --out runs/l   # same data, backbone live
    python -m side_train.run --model t5-base --task rte --out r    # live, no cache

The run folder gets config.json, metrics.jsonl, summary.json, side_model/ and
best_side_model/ (safetensors + side_config.json), and checkpoint/ for resuming.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from shared.allocator import keep_freed_memory
from shared.backbones import pick_device
from shared.errors import UserError, cli_entry
from side_train.recipe import (
    add_side_arguments,
    add_source_arguments,
    backbone_parameters,
    build_side_network,
    choose_tier,
    explicit_side_layers,
    importance_scores,
    materialize,
    open_sources,
    side_config_for,
    train_config_for,
)
from side_train.train import config_dict, train, uses_bf16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m side_train.run", description=__doc__.split("\n")[0])
    add_source_arguments(p)
    add_side_arguments(p)
    g = p.add_argument_group("training")
    g.add_argument("--out", default="runs/lst", help="run folder (resumed if it holds the same unfinished run)")
    g.add_argument("--epochs", type=int, default=None, help="default: the task's (20 small, 10 large)")
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument("--eval-batch-size", type=int, default=100)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup-steps", type=int, default=500)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: no clipping)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval", dest="eval_mode", default="candidates", choices=["candidates", "generate"],
                   help="T5: score the label set (no backbone) or greedy-generate (live backbone)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps too")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --out")
    g.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name in ("batch_size", "eval_batch_size", "reduction", "fisher_samples", "max_length", "max_target_length"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("epochs", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    for name in ("warmup_steps", "save_every", "clip", "weight_decay"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    explicit_side_layers(args)  # a bad list fails here, before any model is loaded
    check_out_path(Path(args.out))
    if args.attention_dropout is not None and not 0 <= args.attention_dropout < 1:
        raise UserError(f"--attention-dropout must be in [0, 1), got {args.attention_dropout}")
    if args.live and not args.cache and args.model is None and args.task is None:
        pass  # live on the embedded default
    return args


def check_out_path(run_dir: Path) -> None:
    """--out and every folder above it that exists must be folders."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {run_dir}: {folder} is a file; choose a folder")


def prepare_run_dir(run_dir: Path, identity: dict, overwrite: bool) -> None:
    """Refuse to clobber a finished or different run; allow resuming the same one."""
    config_path = run_dir / "config.json"
    check_out_path(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        stored = stored_identity(config_path, identity)
        finished = (run_dir / "summary.json").is_file()
        if overwrite:
            shutil.rmtree(run_dir)
        elif stored is None:
            raise UserError(f"--out {run_dir} is a non-empty folder that is not a run; choose another --out")
        elif stored != identity:
            raise UserError(f"--out {run_dir} holds a different run ({first_difference(stored, identity)}); "
                            "choose another --out, repeat its flags to resume it, or pass --overwrite")
        elif finished:
            raise UserError(f"--out {run_dir} already holds this finished run (see summary.json); pass --overwrite to redo it")
    run_dir.mkdir(parents=True, exist_ok=True)


def write_config(path: Path, identity: dict, args: argparse.Namespace, manifest: dict | None) -> None:
    """A run folder's config.json: its identity, its flags, and `inputs`, the lengths its
    training inputs were cut at (a cache's own, else the flags), which prediction repeats."""
    lengths = manifest if manifest is not None else vars(args)
    inputs = {k: lengths[k] for k in ("max_length", "max_target_length")}
    path.write_text(json.dumps({"identity": identity, "argv": vars(args), "inputs": inputs}, indent=1, default=str))


# settings added after run folders existed, with the value a folder written before had
# (None: not recorded then, so the value the flags give now is taken)
# (step_dtype: a folder from before it with --precision fp32 or bf16 has that dtype anyway; one
# with auto ran in its device's default, unknown now, and resumes in this device's)
LATER_SETTINGS = {"train": {"precision": "auto", "step_dtype": None}}


def stored_identity(config_path: Path, wanted: dict | None = None) -> dict | None:
    """A run folder's identity from its config.json (None without one), with settings added
    since it was written filled in at their earlier value, so older runs still resume."""
    if not config_path.is_file():
        return None
    stored = json.loads(config_path.read_text()).get("identity")
    for section, settings in LATER_SETTINGS.items():
        if isinstance(stored, dict) and isinstance(stored.get(section), dict):
            for key, value in settings.items():
                if value is None:
                    value = ((wanted or {}).get(section) or {}).get(key)
                    if value is None:
                        continue
                stored[section].setdefault(key, value)
    return stored


def first_difference(stored: dict, wanted: dict, path: str = "") -> str:
    """Name the first setting that differs between a run folder's identity and the flags given."""
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{path}{key}.")
            if found:
                return found
        elif a != b:
            return f"its {path}{key} is {a}, the flags give {b}"
    return ""


def run(args: argparse.Namespace) -> dict:
    """Everything `main` does, returning the summary (the Python API)."""
    keep_freed_memory()  # the step's large temporaries reuse memory (shared.allocator)
    device = pick_device(args.device)
    sources = open_sources(args, device)
    if "train" not in sources.splits:
        raise UserError("the data has no train split; extract it with --splits train,...")
    side_cfg = side_config_for(sources.backbone, sources.spec, args)
    train_cfg = train_config_for(args, sources.spec)
    uses_bf16(train_cfg.precision, device)  # refuse bf16 on a CPU without it before the run folder is made
    if args.eval_mode == "generate" and (sources.mode != "live" or side_cfg.family != "t5"):
        raise UserError("--eval generate needs a T5 backbone run live (add --live, or drop --eval generate)")
    run_dir = Path(args.out)
    identity = {"side": side_cfg.to_json(), "train": config_dict(train_cfg, device), "init": args.init,
                "model": sources.backbone.info().to_json(), "task": sources.spec.to_json(),
                "cache": str(Path(args.cache).resolve()) if args.cache else None, "mode": sources.mode}
    try:
        prepare_run_dir(run_dir, identity, args.overwrite)
        (run_dir / "probe").touch()
        (run_dir / "probe").unlink()
    except PermissionError:
        raise UserError(f"cannot write to --out {run_dir}; choose a folder you can write to") from None

    scores = importance_scores(sources, args.init, args.cache, args.fisher_samples)
    model = build_side_network(side_cfg, sources.backbone, args.init, scores, args.seed)
    trainable, total = model.trainable_parameters(), backbone_parameters(sources.backbone)
    tier = choose_tier(sources.manifest, side_cfg, device, args.tier) if sources.mode == "cache" else "live"
    data = materialize(sources, side_cfg, args.cache, tier, args.reader_workers, device)
    if not (run_dir / "config.json").is_file():
        # written once every check has passed: a run refused above leaves no identity behind to block its corrected rerun
        write_config(run_dir / "config.json", identity, args, sources.manifest)
    if sources.mode == "cache":
        sources.backbone.model = None  # only the LM head (inside the side network) stays
    evals = {s: data[s] for s in ("validation", "test") if s in data}
    if not args.quiet:
        print(f"side network: {trainable:,} trainable parameters, {100 * trainable / total:.3f}% of the "
              f"{total:,}-parameter backbone; source: {sources.mode} ({tier}); device: {device}", file=sys.stderr)
    start = time.perf_counter()
    summary = train(model, data["train"], evals, sources.spec, train_cfg, run_dir, device)
    model.save_pretrained(run_dir / "side_model")
    summary.update(trainable_parameters=trainable, backbone_parameters=total, trainable_share=trainable / total,
                   source=sources.mode, tier=tier, device=str(device), wall_seconds=round(time.perf_counter() - start, 3),
                   task=sources.spec.name, model=sources.backbone.name)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"trainable parameters: {summary['trainable_parameters']:,} ({100 * summary['trainable_share']:.3f}% of the backbone)",
             f"peak memory: {summary['peak_memory_bytes'] / 2**20:,.1f} MiB ({summary['peak_memory_kind']})",
             f"time: {summary['train_seconds']:.1f} s training, {summary['seconds_per_epoch']:.2f} s per epoch"]
    for key, label in (("validation_best", "best validation"), ("test_at_best_validation", "test at best validation"),
                       ("test_last", "test at last epoch")):
        if summary.get(key):
            metrics = ", ".join(f"{k} {v:.2f}" for k, v in summary[key].items() if k != "score")
            lines.append(f"{label}: {metrics}")
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    print(format_summary(summary))
    print(f"run folder: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
