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
created on the device; for training: a cache made by backbone_cache.extract).

Writes compare.csv, compare.json and compare.png (memory against metric) to --out.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from backbone_cache.plan import SplitPlan, offsets_from_lengths, plan_split
from shared.allocator import keep_freed_memory, release_freed_memory
from shared.backbones import DEFAULT_MODEL, Backbone, EncoderBackbone, T5Backbone, default_model_dir, load_backbone, pick_device
from shared.errors import UserError, cli_entry
from shared.metrics import compute_metrics
from shared.tasks import SPLITS, Example, TaskSpec, load_task
from side_train.baselines import ADAPTER_WIDTH, BASELINES, LORA_RANK, PROMPT_TOKENS, TokenBatch, build_baseline
from side_train.data import Batch, epoch_batches, eval_batches
from side_train.memory import MemoryAccount, SavedTensorCounter, account, device_tensors, parameter_count, recompute_bytes
from side_train.model import LadderSideNetwork, SideConfig, init_projections
from side_train.train import TrainConfig, lr_at

LST_METHODS = ("lst-live", "lst-cached", "lst-cached-recompute")
METHODS = (*BASELINES, *LST_METHODS)
LABELS = {"full": "Full fine-tuning", "adapter": "Adapters", "lora": "LoRA", "bitfit": "BitFit", "prompt": "Prompt-tuning",
          "lst-live": "LST (live backbone)", "lst-cached": "LST (from cache)",
          "lst-cached-recompute": "LST (from cache, recompute)"}
# Learning rates for the equal short budget: common values per method, not tuned here.
DEFAULT_LR = {"full": 5e-5, "adapter": 1e-3, "lora": 1e-3, "bitfit": 3e-3, "prompt": 3e-2, "lst-live": 3e-3, "lst-cached": 3e-3,
              "lst-cached-recompute": 3e-3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m side_train.compare", description=__doc__.split("\n")[0])
    g = p.add_argument_group("backbone and data")
    g.add_argument("--model", default=None, help="hub name or folder (default: the embedded all-MiniLM-L6-v2)")
    g.add_argument("--random-init", action="store_true", help="build the model from its config with random weights (shape studies)")
    g.add_argument("--task", default=None, help="rotten_tomatoes (default), a GLUE task, local, or synthetic (random full-length tokens)")
    g.add_argument("--data", action="append", default=[], metavar="SPLIT=PATH", help="local data file")
    g.add_argument("--text-fields", default="", help="local data: text columns")
    g.add_argument("--label-field", default="label", help="local data: label column")
    g.add_argument("--label-kind", default="class", choices=["class", "regression"])
    g.add_argument("--max-length", type=int, default=128, help="source tokens per example (synthetic: exactly this many)")
    g.add_argument("--max-target-length", type=int, default=128, help="T5 target tokens")
    g.add_argument("--limit", type=int, default=None, help="first N examples of each split")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g = p.add_argument_group("what to measure")
    g.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
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
    g.add_argument("--drop-layers", type=int, default=0, help="LST: drop N interleaved layers (the paper drops 3 per T5-base stack)")
    g.add_argument("--lst-init", default="fisher", choices=["fisher", "magnitude", "random"], help="LST side init for training runs")
    g.add_argument("--fisher-samples", type=int, default=1024)
    g.add_argument("--cache", default=None, help="LST-cached training: a cache of this model and data (default: extract into OUT/cache)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise UserError(f"unknown method {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(METHODS)}")
    args.time_batch_size = args.time_batch_size or args.batch_size
    for name in ("batch_size", "time_batch_size", "eval_batch_size", "max_length", "max_target_length", "adapter_width",
                 "lora_rank", "prompt_tokens", "reduction", "fisher_samples"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.time_steps < 0 or args.train_steps < 0 or (args.limit is not None and args.limit <= 0):
        raise UserError("--time-steps and --train-steps must be 0 or more, --limit positive")
    args.lrs = dict(DEFAULT_LR)
    for item in args.lr:
        method, sep, value = item.partition("=")
        try:
            args.lrs[method] = float(value)
        except ValueError:
            method = ""
        if not sep or method not in METHODS or args.lrs[method] <= 0:
            raise UserError(f"--lr {item!r} must look like lora=1e-3 with a known method and a positive rate")
    if args.task == "synthetic" and args.train_steps:
        raise UserError("--task synthetic has random labels, so training it measures nothing; use a real task with --train-steps")
    if args.cache and not args.train_steps:
        raise UserError("--cache is read only to train LST-cached (--train-steps N); add --train-steps or drop --cache")
    if args.memory_on == "meta" and args.task != "synthetic":
        raise UserError("--memory-on meta needs unpadded batches; use it with --task synthetic (or use --memory-on device)")
    return args


# --- backbones --------------------------------------------------------------------------------


def fresh_backbone(args: argparse.Namespace, device: torch.device) -> Backbone:
    """A new copy of the frozen backbone in fp32 (methods modify their copy); meta builds hold no data."""
    if device.type != "meta" and not args.random_init:
        return load_backbone(args.model, device, dtype=torch.float32)
    import transformers

    config, tokenizer = config_and_tokenizer(args.model or str(default_model_dir()))
    is_t5 = getattr(config, "is_encoder_decoder", False)
    torch.manual_seed(args.seed)
    with torch.device(device if device.type == "meta" else "cpu"):
        model = transformers.T5ForConditionalGeneration(config) if is_t5 else transformers.AutoModel.from_config(config)
    adapter = T5Backbone if is_t5 else EncoderBackbone
    return adapter(model, tokenizer, args.model or DEFAULT_MODEL, None, device, torch.float32)


@functools.lru_cache(maxsize=4)
def config_and_tokenizer(path: str):
    import transformers

    local = Path(path).is_dir()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=local)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the config or tokenizer of {path!r}: {str(err).splitlines()[0][:200]}") from None
    return config, tokenizer


# --- data -------------------------------------------------------------------------------------


def synthetic_plans(backbone: Backbone, length: int, count: int, seed: int) -> tuple[TaskSpec, dict[str, SplitPlan]]:
    """`count` examples of exactly `length` random tokens and a random binary label (shape studies)."""
    spec = TaskSpec("synthetic", ["sentence"], "class", ["0", "1"], ["sentence:"], ["accuracy"], 1)
    rng = np.random.default_rng(seed)
    vocab = int(backbone.config.vocab_size)
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(count, length))
    labels = rng.integers(0, 2, size=count)
    examples = [Example(f"synthetic-{i}", [""], int(labels[i])) for i in range(count)]
    plan = SplitPlan("train", examples, ids.tolist(), None, dataset_index=np.arange(count))
    plan.offsets["encoder"] = offsets_from_lengths([length] * count)
    if backbone.family == "t5":
        plan.target_ids = backbone.tokenize_targets([spec.target_text(int(v)) for v in labels], 128)
        plan.offsets["decoder"] = offsets_from_lengths([len(t) for t in plan.target_ids])
    return spec, {"train": plan}


def task_plans(args: argparse.Namespace, backbone: Backbone) -> tuple[TaskSpec, dict[str, SplitPlan]]:
    """Tokenized splits in storage order (the same order an extracted cache has)."""
    from backbone_cache.extract import parse_data_files

    spec, data = load_task(args.task, parse_data_files(args.data), [f for f in args.text_fields.split(",") if f],
                           args.label_field, args.label_kind)
    if "train" not in data:
        raise UserError("the data has no train split; add --data train=PATH")
    plans = {}
    for split in [s for s in SPLITS if s in data]:
        examples = data[split][: args.limit] if args.limit else data[split]
        plans[split] = plan_split(split, examples, spec, backbone, args.max_length, args.max_target_length, args.batch_size, None)
    return spec, plans


def token_batch(plan: SplitPlan, rows: np.ndarray, backbone: Backbone) -> TokenBatch:
    """Padded token ids of `rows` on the CPU."""
    from backbone_cache.extract import pad

    cpu = torch.device("cpu")
    ids, mask = pad([plan.source_ids[i] for i in rows], cpu)
    types = pad([plan.token_type_ids[i] for i in rows], cpu)[0] if plan.token_type_ids is not None else None
    labels = torch.tensor([float(plan.examples[i].label) for i in rows])
    batch = TokenBatch(ids, mask, labels, types, padded=not bool(mask.all()))
    if backbone.family == "t5":
        targets = [plan.target_ids[i] for i in rows]
        batch.decoder_input_ids, batch.decoder_mask = pad([backbone.shift_right(t) for t in targets], cpu)
        batch.decoder_labels = pad(targets, cpu)[0].masked_fill(~batch.decoder_mask.bool(), -100)
        batch.padded = batch.padded or not bool(batch.decoder_mask.all())
    return batch


# --- LST as a method --------------------------------------------------------------------------


def lst_config(backbone: Backbone, spec: TaskSpec, args: argparse.Namespace) -> SideConfig:
    from side_train.recipe import side_config_for

    side_args = argparse.Namespace(reduction=args.reduction, side_layers=args.side_layers, drop_layers=args.drop_layers,
                                   dropout=0.1, attention_dropout=None, pooling="mean")
    return side_config_for(backbone, spec, side_args)


def new_side_network(cfg: SideConfig, backbone: Backbone, init: str = "random", scores: dict | None = None, seed: int = 0) -> LadderSideNetwork:
    """The side network; on the meta device (no data to prune from) built directly."""
    from side_train.recipe import build_side_network

    if backbone.device.type != "meta":
        return build_side_network(cfg, backbone, init, scores, seed)
    lm_head = backbone.lm_head()[0].detach() if cfg.family == "t5" else None
    with torch.device("meta"):
        side = LadderSideNetwork(cfg, lm_head)
    init_projections(side)
    return side


def live_ladder_batch(backbone: Backbone, batch: TokenBatch, cfg: SideConfig) -> Batch:
    """Run the frozen backbone (inference mode) and keep the side network's layers, rounded to
    bfloat16 as the cache stores them (the same states as side_train.data.LiveSplit, kept on the device)."""
    enc_positions = [0] + [i + 1 for i in cfg.encoder_layers]
    states, final = backbone.encode(batch.input_ids, batch.hf_mask(), batch.token_type_ids)
    mask = batch.attention_mask.bool()
    out = Batch(torch.arange(len(batch.labels)), states[:, :, enc_positions].to(torch.bfloat16).clone(), mask, batch.labels)
    if cfg.family == "t5":
        dec_positions = [0] + [i + 1 for i in cfg.decoder_layers]
        dec = backbone.decode(batch.decoder_input_ids, batch.hf_mask(decoder=True), final, batch.hf_mask())
        out.dec_states = dec[:, :, dec_positions].to(torch.bfloat16).clone()
        out.dec_mask, out.dec_labels = batch.decoder_mask.bool(), batch.decoder_labels
    return out


def cached_ladder_batch(batch: TokenBatch, cfg: SideConfig, generator: torch.Generator | None = None) -> Batch:
    """States of the shape a cache holds for `batch` (bfloat16, the side network's layers only),
    created on the batch's device as if loaded from the cache; the values are random."""
    device = batch.input_ids.device

    def states(tokens: int, layers: int) -> torch.Tensor:
        shape = (len(batch.labels), tokens, 1 + layers, cfg.backbone_d)
        if device.type == "meta":
            return torch.empty(shape, dtype=torch.bfloat16, device=device)
        return torch.randn(shape, generator=generator).to(device, torch.bfloat16)

    out = Batch(torch.arange(len(batch.labels)), states(batch.input_ids.shape[1], len(cfg.encoder_layers)),
                batch.attention_mask.bool(), batch.labels)
    if cfg.family == "t5":
        out.dec_states = states(batch.decoder_input_ids.shape[1], len(cfg.decoder_layers))
        out.dec_mask, out.dec_labels = batch.decoder_mask.bool(), batch.decoder_labels
    return out


class LadderLive(nn.Module):
    """LST with the backbone on the device, run per step; only the side network trains."""

    def __init__(self, side: LadderSideNetwork, backbone: Backbone):
        super().__init__()
        self.side = side
        self.frozen = backbone.model  # registered so it counts as device memory
        self.backbone = backbone

    def train(self, mode: bool = True) -> LadderLive:
        super().train(mode)
        self.frozen.eval()  # the cache stores eval-mode states; live matches it
        return self

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        return self.side.loss(live_ladder_batch(self.backbone, batch, self.side.cfg))


# --- one method, ready to measure -------------------------------------------------------------


@dataclass
class Prepared:
    """A method's device-resident module and how to turn token batches into its step inputs."""

    name: str
    module: nn.Module  # everything the method keeps on the device
    inputs: Callable[[TokenBatch], object]  # TokenBatch on the device -> what module.loss takes
    backbone_parameters: int
    frozen: nn.Module | None = None  # the backbone model the step runs, if any


def prepare(method: str, args: argparse.Namespace, spec: TaskSpec, device: torch.device, init: str = "random",
            scores: dict | None = None) -> Prepared:
    """Build `method` on `device` from a fresh backbone."""
    backbone = fresh_backbone(args, device if not method.startswith("lst-cached") or device.type == "meta" else torch.device("cpu"))
    total = parameter_count(backbone.model)
    torch.manual_seed(args.seed)
    if method in BASELINES:
        module = build_baseline(method, backbone.model, backbone.family, backbone.d_model, spec.num_labels, spec.label_kind,
                                args.adapter_width, args.lora_rank, args.prompt_tokens).to(device)
        return Prepared(method, module, lambda b: b, total, backbone.model)
    cfg = lst_config(backbone, spec, args)
    side = new_side_network(cfg, backbone, init, scores, args.seed).to(device).set_recompute(method.endswith("-recompute"))
    if method == "lst-live":
        if cfg.family == "t5":
            side.lm_head = backbone.lm_head()[0].detach()  # reuse the backbone's frozen LM head, as the paper does
        return Prepared(method, LadderLive(side, backbone), lambda b: b, total, backbone.model)
    generator = torch.Generator().manual_seed(args.seed)
    return Prepared(method, side, lambda b: cached_ladder_batch(b, cfg, generator), total, None)


def step_tensors(inputs) -> list[torch.Tensor]:
    if isinstance(inputs, TokenBatch):
        return inputs.tensors()
    return [getattr(inputs, f) for f in inputs.__dataclass_fields__ if isinstance(getattr(inputs, f), torch.Tensor)]


def training_step(module: nn.Module, inputs, optimizer: torch.optim.Optimizer) -> float:
    loss = module.loss(inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure_memory(prepared: Prepared, batch: TokenBatch, watch_backbone: bool = False) -> tuple[MemoryAccount, SavedTensorCounter]:
    """Account one training step's memory; on CUDA also record max_memory_allocated of a warm step.

    On the CPU and the meta device only the forward pass runs (saved tensors are all made there).
    """
    module = prepared.module.train()
    inputs = prepared.inputs(batch)
    device = batch.input_ids.device
    optimizer = None
    exclude = [*device_tensors(module), *step_tensors(inputs)]
    side = module.side if isinstance(module, LadderLive) else module
    # recomputation's extra forward runs first, so its graph is gone before the CUDA peak is taken
    recompute = recompute_bytes(side, lambda: module.loss(inputs), exclude)
    if device.type == "cuda":
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-12)
        training_step(module, inputs, optimizer)  # warm: optimizer state exists, kernels chosen
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    watch = [prepared.frozen] if watch_backbone and prepared.frozen is not None else []
    with SavedTensorCounter(exclude=exclude, watch=watch) as counter:
        loss = module.loss(inputs)
    memory = account(module, step_tensors(inputs), counter, recompute)
    if optimizer is not None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        memory.cuda_peak_bytes = int(torch.cuda.max_memory_allocated(device))
    del loss
    return memory, counter


def time_steps(prepared: Prepared, batch: TokenBatch, steps: int, warmup: int = 2) -> float:
    """Mean seconds per training step (forward, backward, AdamW) after `warmup` untimed steps.

    The step inputs are made once beforehand: for LST-cached the states are already on the
    device, so reading the cache is not part of the step."""
    module = prepared.module.train()
    inputs = prepared.inputs(batch)
    device = batch.input_ids.device
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-12)
    for _ in range(warmup):
        training_step(module, inputs, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        training_step(module, inputs, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


# --- equal-budget training --------------------------------------------------------------------


def train_for(module: nn.Module, loss_of_rows, lengths: np.ndarray, steps: int, lr: float, batch_size: int, seed: int,
              desc: str, quiet: bool) -> tuple[float, float]:
    """AdamW, 10% linear warmup then linear decay, clip 1.0; the same row order for every method.

    Returns (seconds, the last step's loss)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = TrainConfig(lr=lr, warmup_steps=max(1, steps // 10))
    module.train()
    torch.manual_seed(seed)
    step, epoch, start = 0, 0, time.perf_counter()
    with tqdm(total=steps, desc=desc, unit="step", disable=quiet, dynamic_ncols=True) as bar:
        while step < steps:
            for rows in epoch_batches(lengths, batch_size, seed, epoch):
                if step >= steps:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, schedule, steps)
                loss = loss_of_rows(rows)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            epoch += 1
    return time.perf_counter() - start, float(loss.detach())


@torch.no_grad()
def evaluate_baseline(module: nn.Module, plan: SplitPlan, backbone: Backbone, spec: TaskSpec, device: torch.device,
                      batch_size: int, candidate_ids: list[list[int]] | None) -> dict:
    """Encoders: the head's prediction. T5: the label string with the highest summed log-probability."""
    module.eval()
    predictions = np.zeros(plan.num_examples)
    candidates = None
    if backbone.family == "t5":
        candidates = [(torch.tensor([backbone.shift_right(c)], device=device), torch.tensor([c], device=device)) for c in candidate_ids]
    for rows in eval_batches(plan.num_examples, batch_size):
        batch = token_batch(plan, rows, backbone).to(device)
        if candidates is None:
            predictions[rows] = module.predict(batch).float().cpu().numpy()
        else:
            best = module.score_candidates(batch, candidates).argmax(-1).cpu().numpy()
            predictions[rows] = [float(spec.candidates()[b]) for b in best]
    labels = np.array([float(ex.label) for ex in plan.examples])
    return compute_metrics(spec.metrics, predictions, labels)


def cache_for_training(args: argparse.Namespace, plans: dict[str, SplitPlan]) -> Path:
    """A complete cache of this model and data: --cache, or one extracted into OUT/cache."""
    from backbone_cache.extract import Extraction
    from backbone_cache.extract import parse_args as extract_args

    folder = Path(args.cache) if args.cache else Path(args.out) / "cache"
    if not args.cache:
        argv = ["--out", str(folder), "--max-length", str(args.max_length), "--max-target-length", str(args.max_target_length),
                "--importance", "none", "--device", args.device, "--splits", ",".join(plans)]
        for flag, value in (("--model", args.model), ("--task", args.task), ("--limit", args.limit),
                            ("--text-fields", args.text_fields or None), ("--label-field", args.label_field),
                            ("--label-kind", args.label_kind)):
            if value is not None:
                argv += [flag, str(value)]
        for item in args.data:
            argv += ["--data", item]
        if args.quiet:
            argv.append("--quiet")
        Extraction(extract_args(argv)).run()
    return folder


def train_and_evaluate(method: str, args: argparse.Namespace, spec: TaskSpec, plans: dict[str, SplitPlan], device: torch.device,
                       reference: Backbone, lst_init: tuple[str, dict | None]) -> dict:
    """Train `method` for --train-steps on the training split, then score validation and test.

    `reference` supplies the tokenizer (target candidates, decoder inputs) and holds no weights."""
    from shared.cache_format import open_complete
    from side_train.data import CachedSplit, LiveSplit
    from side_train.evaluate import evaluate

    lr, train_plan = args.lrs[method], plans["train"]
    lengths = np.diff(train_plan.offsets["encoder"])
    evals = [s for s in ("validation", "test") if s in plans]
    candidate_ids = reference.tokenize_targets(spec.candidates(), args.max_target_length) if reference.family == "t5" else None
    prepared = prepare(method, args, spec, device, *lst_init)
    out: dict = {"lr": lr}
    if method in BASELINES:
        module = prepared.module

        def loss_of_rows(rows):
            return module.loss(token_batch(train_plan, rows, reference).to(device))

        out["train_seconds"], out["train_loss_last"] = train_for(module, loss_of_rows, lengths, args.train_steps, lr,
                                                                 args.batch_size, args.seed, method, args.quiet)
        for split in evals:
            out[split] = evaluate_baseline(module, plans[split], reference, spec, device, args.eval_batch_size, candidate_ids)
        return out
    side = prepared.module.side if method == "lst-live" else prepared.module
    cfg = side.cfg
    if method == "lst-live":
        sources = {s: LiveSplit(prepared.module.backbone, plans[s], candidate_ids if s != "train" else None,
                                cfg.encoder_layers, cfg.decoder_layers) for s in plans}
    else:
        folder = cache_for_training(args, plans)
        manifest = open_complete(folder)
        sources = {}
        for s in plans:
            sources[s] = CachedSplit(folder, manifest, s, cfg.encoder_layers, cfg.decoder_layers)
            if not np.array_equal(sources[s].lengths, np.diff(plans[s].offsets["encoder"])):
                raise UserError(f"cache {folder} holds other examples than --task/--limit/--max-length give; "
                                "extract it with the same settings or drop --cache")

    def loss_of_rows(rows):
        return side.loss(sources["train"].batch(rows).to(device))

    out["train_seconds"], out["train_loss_last"] = train_for(side, loss_of_rows, lengths, args.train_steps, lr, args.batch_size,
                                                             args.seed, method, args.quiet)
    for split in evals:
        out[split] = evaluate(side, sources[split], spec, device, args.eval_batch_size)
    return out


def lst_init_scores(args: argparse.Namespace, spec: TaskSpec, plans: dict[str, SplitPlan]) -> tuple[str, dict | None]:
    """One importance computation shared by LST-live and LST-cached, so both start alike."""
    from backbone_cache.importance import compute_importance
    from side_train.prune import magnitude_scores

    if args.lst_init == "random":
        return "random", None
    backbone = fresh_backbone(args, pick_device(args.device))
    if args.lst_init == "magnitude":
        return "magnitude", magnitude_scores(dict(backbone.model.state_dict()))
    return "fisher", compute_importance(backbone, spec, plans["train"], "fisher", args.fisher_samples, quiet=args.quiet)


# --- the whole comparison ---------------------------------------------------------------------


@dataclass
class Row:
    method: str
    trainable_parameters: int
    backbone_parameters: int
    memory: MemoryAccount
    seconds_per_step: float | None = None
    training: dict = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.trainable_parameters / self.backbone_parameters


def free(device: torch.device) -> None:
    """Release the last method's memory before the next one (on Linux, hand freed heap back to the OS)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    release_freed_memory()


def compare(args: argparse.Namespace) -> tuple[list[Row], dict]:
    """Measure every method; return the rows and the settings they were measured with."""
    keep_freed_memory()
    device = pick_device(args.device)
    memory_device = torch.device("meta") if args.memory_on == "meta" else device
    reference = fresh_backbone(args, torch.device("meta"))  # config and tokenizer only
    if args.task == "synthetic":
        spec, plans = synthetic_plans(reference, args.max_length, max(args.batch_size, args.time_batch_size), args.seed)
    else:
        spec, plans = task_plans(args, reference)
    train_plan = plans["train"]
    if train_plan.num_examples < max(args.batch_size, args.time_batch_size):
        raise UserError(f"the training split has {train_plan.num_examples} examples, fewer than the batch size; raise --limit or lower --batch-size")
    memory_batch = token_batch(train_plan, np.arange(args.batch_size), reference)
    time_batch = token_batch(train_plan, np.arange(args.time_batch_size), reference)
    settings = {"model": args.model or reference.name, "family": reference.family, "task": spec.name, "batch_size": args.batch_size,
                "source_tokens": int(memory_batch.input_ids.shape[1]), "target_tokens": None if memory_batch.decoder_input_ids is None
                else int(memory_batch.decoder_input_ids.shape[1]), "device": str(device), "memory_on": args.memory_on,
                "time_batch_size": args.time_batch_size, "time_steps": args.time_steps, "train_steps": args.train_steps,
                "random_init": args.random_init, "adapter_width": args.adapter_width, "lora_rank": args.lora_rank,
                "prompt_tokens": args.prompt_tokens, "reduction": args.reduction, "drop_layers": args.drop_layers,
                "side_layers": args.side_layers, "lst_init": args.lst_init if args.train_steps else None,
                "lr": {m: args.lrs[m] for m in args.methods} if args.train_steps else None, "seed": args.seed}
    lst_init = ("random", None)
    if args.train_steps and any(m in LST_METHODS for m in args.methods):
        lst_init = lst_init_scores(args, spec, plans)
    rows = []
    for method in args.methods:
        prepared = prepare(method, args, spec, memory_device)
        memory, _ = measure_memory(prepared, memory_batch.to(memory_device))
        row = Row(method, parameter_count(prepared.module, trainable_only=True), prepared.backbone_parameters, memory)
        if args.time_steps:
            if memory_device != device:
                prepared = prepare(method, args, spec, device)
            row.seconds_per_step = time_steps(prepared, time_batch.to(device), args.time_steps)
        del prepared
        free(device)
        if args.train_steps:
            row.training = train_and_evaluate(method, args, spec, plans, device, reference, lst_init)
            free(device)
        rows.append(row)
        if not args.quiet:
            shown = f"{memory.total_bytes / 2**30:.3f} GiB accounted"
            if row.seconds_per_step is not None:
                shown += f", {row.seconds_per_step:.3f} s/step"
            if row.training.get("test"):
                shown += f", test {row.training['test']['score']:.2f}"
            tqdm.write(f"{method}: {shown}", file=sys.stderr)
    return rows, settings


# --- reporting --------------------------------------------------------------------------------


def row_record(row: Row, full_bytes: int | None) -> dict:
    m = row.memory
    record = {"method": row.method, "trainable_parameters": row.trainable_parameters, "backbone_parameters": row.backbone_parameters,
              "trainable_percent": round(100 * row.share, 4), **m.to_json(),
              "memory_vs_full": round(m.total_bytes / full_bytes, 4) if full_bytes else None,
              "seconds_per_step": None if row.seconds_per_step is None else round(row.seconds_per_step, 4)}
    for split in ("validation", "test"):
        if split in row.training:
            record[f"{split}_score"] = round(row.training[split]["score"], 2)
    if row.training:
        record["train_seconds"] = round(row.training["train_seconds"], 1)
        record["train_loss_last"] = round(row.training["train_loss_last"], 5)
        record["lr"] = row.training["lr"]
    return record


def format_table(records: list[dict], settings: dict) -> str:
    """The shape of the paper's Table 1: method, updated parameters, memory, (score)."""
    gib = 2**30
    cuda = any(r["cuda_peak_bytes"] is not None for r in records)
    scored = any("test_score" in r for r in records)
    head = ["Method", "Update param. (%)", "Memory (GiB)", "vs full", "Saved (GiB)"]
    head += ["CUDA peak (GiB)"] if cuda else []
    head += ["s/step"] + (["Val.", "Test"] if scored else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [LABELS[r["method"]], f"{r['trainable_percent']:.3f}", f"{r['total_bytes'] / gib:.3f}",
                 "" if r["memory_vs_full"] is None else f"{r['memory_vs_full']:.3f}x",
                 f"{(r['saved_bytes'] + r['recompute_bytes']) / gib:.3f}"]
        if cuda:
            cells.append("" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / gib:.3f}")
        cells.append("" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}")
        if scored:
            cells += [f"{r.get('validation_score', float('nan')):.2f}", f"{r.get('test_score', float('nan')):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    where = "meta-device accounting" if settings["memory_on"] == "meta" else f"accounting on {settings['device']}"
    target = f", {settings['target_tokens']} target tokens" if settings["target_tokens"] else ""
    lines.append(f"\n{settings['model']} ({settings['family']}), task {settings['task']}, batch {settings['batch_size']} x "
                 f"{settings['source_tokens']} source tokens{target}; memory: {where}; "
                 f"s/step: batch {settings['time_batch_size']} on {settings['device']}")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Memory (x) against test score (y), or against the updated-parameter share when nothing was trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = all("test_score" in r for r in records)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        x = (r["cuda_peak_bytes"] or r["total_bytes"]) / 2**30
        y = r["test_score"] if scored else r["trainable_percent"]
        ax.scatter([x], [y])
        ax.annotate(LABELS[r["method"]], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("training memory (GiB)")
    ax.set_ylabel("test score" if scored else "updated parameters (%)")
    if not scored:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[Row], settings: dict, out: Path) -> list[dict]:
    full = next((r.memory.total_bytes for r in rows if r.method == "full"), None)
    records = [row_record(r, full) for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(out / "compare.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    (out / "compare.json").write_text(json.dumps({"settings": settings, "methods": records}, indent=1))
    plot(records, out / "compare.png")
    return records


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    rows, settings = compare(args)
    records = write_outputs(rows, settings, out)
    print(format_table(records, settings))
    print(f"written: {out / 'compare.csv'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
