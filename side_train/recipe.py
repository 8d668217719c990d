"""Building blocks shared by `run`, `sweep` and `compare`: sources, side config, init.

Walkthrough: `open_sources` gives the task, the backbone (on the CPU when training from
the cache, since only its LM head and init slices are used) and one data source per
split; `side_config_for` sizes the side network; `build_side_network` initialises it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.backbones import Backbone, default_dtype, load_backbone
from shared.cache_format import open_complete
from shared.errors import UserError
from shared.tasks import SPLITS, TaskSpec, load_task
from side_train.data import CachedSplit, LiveSplit
from side_train.model import LadderSideNetwork, SideConfig, init_projections, side_layers
from side_train.train import TrainConfig


@dataclass
class Sources:
    spec: TaskSpec
    backbone: Backbone
    splits: dict  # split name -> CachedSplit | LiveSplit
    mode: str  # "cache" or "live"
    manifest: dict | None


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where ladder states come from")
    g.add_argument("--cache", default=None, help="cache folder made by backbone_cache.extract")
    g.add_argument("--live", action="store_true", help="run the backbone each batch (with --cache: its recorded settings)")
    g.add_argument("--model", default=None, help="live: hub name or folder (default: the embedded all-MiniLM-L6-v2)")
    g.add_argument("--task", default=None, help="live: task (default: rotten_tomatoes)")
    g.add_argument("--data", action="append", default=[], metavar="SPLIT=PATH", help="live: local data file")
    g.add_argument("--text-fields", default="", help="live, local data: text columns")
    g.add_argument("--label-field", default="label", help="live, local data: label column")
    g.add_argument("--label-kind", default="class", choices=["class", "regression"])
    g.add_argument("--max-length", type=int, default=128, help="live: source tokens per example")
    g.add_argument("--max-target-length", type=int, default=128, help="live: T5 target tokens")
    g.add_argument("--limit", type=int, default=None, help="live: first N examples of each split")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--tier", default="auto", choices=["auto", "gpu", "ram", "disk"],
                   help="where cached training states live: on the GPU, in host RAM, or streamed from disk (auto: the first that fits)")
    g.add_argument("--reader", "--reader-workers", dest="reader_workers", type=reader_mode, default=None, metavar="MODE",
                   help="disk tier: how pools are read: inline (between steps, in the training thread), thread "
                        "(a background thread; 0 means the same) or N (N spawn-started processes); default: inline "
                        "for a CPU step on 4 CPUs or fewer, thread beside a GPU on 4 CPUs or fewer, else 1 process")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")


def add_side_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("side network")
    g.add_argument("--reduction", type=int, default=8, help="side width = backbone width / r")
    g.add_argument("--side-layers", default=None, help="comma-separated backbone blocks that feed side blocks")
    g.add_argument("--drop-layers", type=int, default=0, help="drop N interleaved layers instead")
    g.add_argument("--init", default="fisher", choices=["fisher", "magnitude", "random"], help="side block init")
    g.add_argument("--fisher-samples", type=int, default=1024, help="live fisher init: training examples")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="dropout on the attention probabilities (default: --dropout, as the reference); 0 lets fused "
                        "attention kernels run and makes the side step much cheaper at long lengths")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="side step arithmetic: bf16 autocast or fp32 (auto: bf16 on a GPU with bf16 units, else fp32; "
                        "bf16 on a CPU with AVX512-BF16 or AMX: epochs 1.3-1.45x faster)")
    g.add_argument("--recompute", action="store_true",
                   help="activation checkpointing of the side blocks: far less activation memory for about one more side forward")
    g.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="encoder family: pooling before the head")


def open_sources(args: argparse.Namespace, device: torch.device, splits: tuple[str, ...] = SPLITS) -> Sources:
    """Resolve --cache/--live/--model/--task into a backbone and one data source per split."""
    from backbone_cache.extract import parse_data_files
    from backbone_cache.plan import plan_split

    manifest = None
    if args.cache:
        manifest = open_complete(Path(args.cache))
        model_name = manifest["model"]["name"]
        if args.model is not None and args.model != model_name:
            raise UserError(f"cache {args.cache} was built from model {model_name!r}, not --model {args.model!r}; drop --model or use its cache")
        source = manifest.get("data_source", {})
        if args.task is not None and args.task != source.get("task") and args.task != manifest["task"]["name"]:
            raise UserError(f"cache {args.cache} holds task {manifest['task']['name']!r}, not --task {args.task!r}")
        revision = manifest["model"].get("revision")
    else:
        if args.live is False and args.model is None and args.task is None and not args.data:
            args.live = True  # no cache and no model: live on the embedded default
        model_name, revision = args.model, None
    live = args.live or not args.cache
    # cached: the backbone on the CPU for its config, tokenizer, LM head and pruned init only;
    # --cache --live: live states must equal the cached ones, so the backbone must compute in
    # the cache's dtype, which is this device's own (float32 on a CPU or an older GPU, else bf16)
    computes_in = str(default_dtype(device)).removeprefix("torch.")
    if live and manifest is not None and manifest["compute_dtype"] != computes_in:
        raise UserError(f"cache {args.cache} was computed in {manifest['compute_dtype']}, and this device computes in "
                        f"{computes_in}, so --live would not reproduce its states; "
                        "run --cache --live on the kind of device that built the cache, or train live without --cache")
    backbone = load_backbone(model_name, device if live else torch.device("cpu"), dtype=None if live else torch.float32,
                             revision=revision, trust_remote_code=args.trust_remote_code)
    if manifest is not None:
        found = backbone.info()
        for key in ("config_fingerprint", "tokenizer_fingerprint", "d_model", "num_layers"):
            if found.to_json()[key] != manifest["model"][key]:
                raise UserError(f"the model {model_name!r} loaded now differs from the one the cache was built with ({key}); rebuild the cache")
    if not live:
        spec = TaskSpec.from_json(manifest["task"])
        return Sources(spec, backbone, {s: None for s in manifest["splits"] if s in splits}, "cache", manifest)
    if manifest is not None:
        source = manifest.get("data_source", {})
        spec, data = load_task(source.get("task"), {k: Path(v) for k, v in source.get("data", {}).items()},
                               [f for f in source.get("text_fields", "").split(",") if f], source.get("label_field", "label"),
                               source.get("label_kind", "class"))
        limit, max_length, max_target, batch = manifest["limit"], manifest["max_length"], manifest["max_target_length"], manifest["batch_size"]
        wanted = [s for s in manifest["splits"] if s in splits]
    else:
        spec, data = load_task(args.task, parse_data_files(args.data), [f for f in args.text_fields.split(",") if f],
                               args.label_field, args.label_kind)
        limit, max_length, max_target, batch = args.limit, args.max_length, args.max_target_length, 64
        wanted = [s for s in data if s in splits]
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    candidate_ids = backbone.tokenize_targets(spec.candidates(), max_target) if backbone.family == "t5" else None
    plans = {}
    for split in wanted:
        examples = data[split][:limit] if limit else data[split]
        plans[split] = plan_split(split, examples, spec, backbone, max_length, max_target, batch,
                                  candidate_ids if split != "train" else None)
    return Sources(spec, backbone, {s: (p, candidate_ids) for s, p in plans.items()}, "live", manifest)


def state_bytes(manifest: dict, split: str, cfg: SideConfig) -> int:
    """Bytes of the bf16 states a side network reads from one split (its layers only)."""
    meta = manifest["splits"][split]["stacks"]
    layers = {"encoder": len(cfg.encoder_layers) + 1, "decoder": len(cfg.decoder_layers) + 1,
              "candidates": len(cfg.decoder_layers) + 1}
    return sum(m["num_tokens"] * layers[s] * manifest["model"]["d_model"] * 2 for s, m in meta.items())


def choose_tier(manifest: dict, cfg: SideConfig, device: torch.device, tier: str = "auto") -> str:
    """gpu if every split fits in half the free GPU memory, else ram if it fits in half the
    available host memory, else disk; an explicit tier is taken as given."""
    import os

    if tier != "auto":
        if tier == "gpu" and device.type != "cuda":
            raise UserError("--tier gpu needs --device cuda; use --tier ram or disk on the CPU")
        return tier
    need = sum(state_bytes(manifest, s, cfg) for s in manifest["splits"])
    if device.type == "cuda" and need < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return "gpu"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "ram" if need < 0.5 * available else "disk"


def reader_mode(text: str) -> str | int:
    """--reader: 'inline', 'thread' (or 0) or a positive number of reader processes."""
    word = text.strip().lower()
    if word in ("inline", "thread"):
        return word
    try:
        count = int(word)
    except ValueError:
        count = -1
    if count < 0:
        raise UserError(f"--reader {text!r} is not a reader mode; use inline, thread or a number of reader processes")
    return count or "thread"


def default_reader_workers(device: torch.device | None = None) -> str | int:
    """How the disk tier reads where --reader is not given. On a few CPUs a CPU training step uses
    every core, and reads stolen from it on another thread stall the step's parallel regions as
    well: reading inline, between steps, costs the read time once (measured on 2 CPUs: disk/RAM
    epoch 0.95-1.06x inline, 1.03-1.19x with a thread, 1.4-1.6x with a process). Beside a GPU the
    CPU is free while the step runs, so a background thread overlaps the reads; with more CPUs,
    one reader process."""
    if (os.cpu_count() or 1) > 4:
        return 1
    return "thread" if device is not None and device.type == "cuda" else "inline"


def materialize(sources: Sources, cfg: SideConfig, cache: str | None, tier: str = "ram", workers: str | int | None = None,
                device: torch.device | None = None) -> dict:
    """Create each split's data source for a side network's layers, in the given tier."""
    from side_train.streaming import StreamingSplit

    workers = default_reader_workers(device) if workers is None else workers
    out = {}
    for split, value in sources.splits.items():
        if sources.mode == "cache" and tier == "disk" and split == "train":
            out[split] = StreamingSplit(Path(cache), sources.manifest, split, cfg.encoder_layers, cfg.decoder_layers,
                                        workers, pin_memory=device is not None and device.type == "cuda")
        elif sources.mode == "cache":
            out[split] = CachedSplit(Path(cache), sources.manifest, split, cfg.encoder_layers, cfg.decoder_layers,
                                     device if tier == "gpu" else None)
        else:
            plan, candidate_ids = value
            out[split] = LiveSplit(sources.backbone, plan, candidate_ids if split != "train" else None,
                                   cfg.encoder_layers, cfg.decoder_layers)
    return out


def parse_side_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--side-layers {text!r} must be comma-separated integers") from None
    if len(set(layers)) != len(layers):
        raise UserError(f"--side-layers {text!r} names a layer twice; list each once")
    return sorted(layers)


def explicit_side_layers(args: argparse.Namespace) -> list[int] | None:
    """--side-layers as a sorted list (None: all, less --drop-layers); giving both flags is an error."""
    explicit = parse_side_layers(args.side_layers)
    if explicit and args.drop_layers:
        raise UserError("--side-layers and --drop-layers both choose the side layers; give one of them")
    return explicit


def side_config_for(backbone: Backbone, spec: TaskSpec, args: argparse.Namespace) -> SideConfig:
    """Size the side network from the backbone's config and the flags."""
    c = backbone.config
    explicit = explicit_side_layers(args)
    if backbone.family == "t5":
        cfg = SideConfig(
            family="t5", backbone_d=c.d_model, backbone_d_ff=c.d_ff, backbone_d_kv=c.d_kv, num_heads=c.num_heads,
            num_backbone_layers=c.num_layers, num_backbone_decoder_layers=c.num_decoder_layers,
            reduction=args.reduction, dropout=args.dropout,
            attention_dropout=args.attention_dropout, norm_eps=c.layer_norm_epsilon,
            feed_forward="gated-gelu" if "gated" in c.feed_forward_proj else "relu",
            relative_buckets=c.relative_attention_num_buckets,
            relative_max_distance=getattr(c, "relative_attention_max_distance", 128),
            vocab_size=c.vocab_size, lm_scale=backbone.lm_head()[1],
            num_labels=spec.num_labels, label_kind=spec.label_kind,
        )
        cfg.encoder_layers = side_layers(c.num_layers, args.drop_layers, explicit)
        cfg.decoder_layers = side_layers(c.num_decoder_layers, args.drop_layers, explicit)
    else:
        cfg = SideConfig(
            family="encoder", backbone_d=c.hidden_size, backbone_d_ff=c.intermediate_size,
            backbone_d_kv=c.hidden_size // c.num_attention_heads, num_heads=c.num_attention_heads,
            num_backbone_layers=c.num_hidden_layers, reduction=args.reduction, dropout=args.dropout,
            attention_dropout=args.attention_dropout,
            norm_eps=getattr(c, "layer_norm_eps", 1e-12), feed_forward="gelu",
            num_labels=spec.num_labels, label_kind=spec.label_kind, pooling=args.pooling,
        )
        cfg.encoder_layers = side_layers(c.num_hidden_layers, args.drop_layers, explicit)
    if cfg.family == "encoder" and cfg.d % cfg.num_heads:
        raise UserError(f"side width {cfg.d} is not divisible by {cfg.num_heads} heads; pick another --reduction")
    cfg.check()
    return cfg


def importance_scores(sources: Sources, init: str, cache: str | None, fisher_samples: int) -> dict | None:
    """Row scores for pruned init: the cache's stored Fisher, live Fisher, or magnitude."""
    from backbone_cache.importance import compute_importance, load_importance
    from side_train.prune import magnitude_scores

    if init == "random":
        return None
    if init == "magnitude":
        return magnitude_scores(dict(sources.backbone.model.state_dict()))
    if sources.manifest is not None:  # cached, or --cache --live: the cache's scores, so both init alike
        meta = sources.manifest.get("importance")
        if not meta or meta.get("kind") != "fisher":
            raise UserError(f"cache {cache} holds no Fisher importance; extract with --importance fisher or use --init magnitude")
        scores, _ = load_importance(Path(cache) / "importance.safetensors")
        return scores
    if "train" not in sources.splits:
        raise UserError("fisher init needs the train split")
    plan, _ = sources.splits["train"]
    return compute_importance(sources.backbone, sources.spec, plan, "fisher", fisher_samples, quiet=True)


def train_config_for(args: argparse.Namespace, spec: TaskSpec) -> TrainConfig:
    """The training settings of `side_train.run`'s flags (epochs default to the task's)."""
    return TrainConfig(
        epochs=args.epochs or spec.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        clip=args.clip, seed=args.seed, eval_mode=args.eval_mode, save_every=args.save_every, quiet=args.quiet,
        recompute=args.recompute, precision=args.precision,
    )


def build_side_network(cfg: SideConfig, backbone: Backbone, init: str, scores: dict | None, seed: int) -> LadderSideNetwork:
    """Construct, prune-initialise from the backbone (or not), and seed."""
    from side_train.prune import init_encoder_from_backbone, init_t5_from_backbone, random_init

    torch.manual_seed(seed)
    lm_head = backbone.lm_head()[0].detach().float().cpu() if cfg.family == "t5" else None
    model = LadderSideNetwork(cfg, lm_head)
    init_projections(model)
    if init == "random":
        random_init(model)
    else:
        state = {k: v.detach().float().cpu() for k, v in backbone.model.state_dict().items()}
        (init_t5_from_backbone if cfg.family == "t5" else init_encoder_from_backbone)(model, state, scores)
    torch.manual_seed(seed)  # the training RNG stream starts here for every source and init
    return model


def backbone_parameters(backbone: Backbone) -> int:
    return sum(p.numel() for p in {id(p): p for p in backbone.model.parameters()}.values())
