"""Running a comparison: each method built from a fresh backbone, its memory counted, its steps
timed and, with `train_steps`, trained for an equal budget and scored.

    CompareConfig -> reference backbone (config and tokenizer only) -> plans (a task, or
    synthetic) -> per method: prepare -> measure_memory -> time_steps -> train_and_evaluate -> Row

Nothing here knows a backbone family: the family's side network class gives the stacks a
batch holds (`train_stacks`, `eval_stacks`), its config the backbone layers each stack feeds,
and its `baselines` (side_train.baselines.FamilyBaselines) the baselines' family-specific
parts. Reporting is side_train.compare_report, the command line side_train.compare.
"""

from __future__ import annotations

import functools
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from backbone_cache.plan import SplitPlan, offsets_from_lengths, plan_split
from shared.allocator import keep_freed_memory, release_freed_memory
from shared.backbones import DEFAULT_MODEL, load_backbone, pick_device, resolve_model_path
from shared.cli import positive
from shared.config import DataConfig, ModelConfig
from shared.errors import UserError
from shared.families import Backbone, family_of
from shared.metrics import compute_metrics
from shared.tasks import SPLITS, Example, TaskSpec
from side_train.baselines import (
    BASELINES,
    GPU_BASELINES,
    BaselineSizes,
    TokenInputs,
    build_baseline,
    family_baselines,
    qlora_unavailable,
)
from side_train.compare_report import Row
from side_train.data import Batch, eval_batches
from side_train.families import side_family
from side_train.memory import MemoryAccount, SavedTensorCounter, account, device_tensors, parameter_count, recompute_bytes
from side_train.model import SideNetwork, SideOptions
from side_train.recipe import INITS, network_config, standardize_ladders
from side_train.train import TrainConfig, Trainee, TrainState, epochs_for_steps, train_networks

LST_METHODS = ("lst-live", "lst-cached", "lst-cached-recompute")
METHODS = (*BASELINES, *LST_METHODS)  # the default list: every one runs on any device
KNOWN_METHODS = (*METHODS, *GPU_BASELINES)  # and those that only a CUDA GPU runs (elsewhere: a skipped row)
# Learning rates for the equal short budget: common values per method, not tuned here.
DEFAULT_LR = {"full": 5e-5, "adapter": 1e-3, "lora": 1e-3, "qlora": 1e-3, "bitfit": 3e-3, "prompt": 3e-2, "lst-live": 3e-3, "lst-cached": 3e-3,
              "lst-cached-recompute": 3e-3}
SYNTHETIC = "synthetic"  # --task synthetic: exactly max_length random tokens per example, random binary labels


@dataclass
class CompareConfig:
    """One comparison (`python -m side_train.compare` fills it from its flags)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # task "synthetic": random full-length tokens
    random_init: bool = False  # build the model from its config with random weights (shape studies)
    device: str = "auto"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    batch_size: int = 100
    memory_on: str = "device"  # or "meta"
    time_steps: int = 3
    time_batch_size: int | None = None  # None: batch_size
    train_steps: int = 0
    eval_batch_size: int = 100
    lrs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    seed: int = 0
    sizes: BaselineSizes = field(default_factory=BaselineSizes)
    side: SideOptions = field(default_factory=SideOptions)
    init: str = "fisher"  # LST's side init for training runs: fisher, magnitude or random
    fisher_samples: int = 1024
    cache: str | None = None  # LST-cached training: a cache of this model and data (None: extract into out/cache)
    out: str = "runs/compare"
    quiet: bool = False

    @property
    def synthetic(self) -> bool:
        return self.data.task == SYNTHETIC

    @property
    def timing_batch_size(self) -> int:
        return self.time_batch_size or self.batch_size

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in KNOWN_METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown method {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(KNOWN_METHODS)}")
        for name in ("batch_size", "time_batch_size", "eval_batch_size", "fisher_samples"):
            positive(getattr(self, name), f"--{name.replace('_', '-')}")
        for name in ("adapter_width", "lora_rank", "prompt_tokens"):
            positive(getattr(self.sizes, name), f"--{name.replace('_', '-')}", allow_none=False)
        positive(self.time_steps, "--time-steps", allow_zero=True)
        positive(self.train_steps, "--train-steps", allow_zero=True)
        self.data.check()
        self.side.check()
        if self.init not in INITS:
            raise UserError(f"--init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.memory_on not in ("device", "meta"):
            raise UserError(f"--memory-on {self.memory_on!r}: choose device or meta")
        for method, lr in self.lrs.items():
            if method not in KNOWN_METHODS or not lr > 0:
                raise UserError(f"--lr {method}={lr} must name a known method and a positive rate")
        if self.synthetic and self.train_steps:
            raise UserError("--task synthetic has random labels, so training it measures nothing; use a real task with --train-steps")
        if self.cache and not self.train_steps:
            raise UserError("--cache is read only to train LST-cached (--train-steps N); add --train-steps or drop --cache")
        if self.memory_on == "meta" and not self.synthetic:
            raise UserError("--memory-on meta needs unpadded batches; use it with --task synthetic (or use --memory-on device)")

    def train_config(self, method: str) -> TrainConfig:
        """The equal budget every method trains for: AdamW at the method's rate, 10% linear warmup then
        linear decay, clipping at 1.0, `train_steps` steps of the same batches in the same order."""
        return TrainConfig(max_steps=self.train_steps, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                           lr=self.lrs[method], warmup_steps=max(1, self.train_steps // 10), weight_decay=0.0, clip=1.0,
                           seed=self.seed, recompute=method.endswith("-recompute"),
                           precision="fp32",  # as its memory and step time are measured
                           quiet=self.quiet)


# --- backbones --------------------------------------------------------------------------------


def fresh_backbone(config: CompareConfig, device: torch.device) -> Backbone:
    """A new copy of the frozen backbone in fp32 (methods modify their copy); meta builds hold no data."""
    m = config.model
    if device.type != "meta" and not config.random_init:
        return load_backbone(m.name, device, dtype=torch.float32, revision=m.revision, trust_remote_code=m.trust_remote_code)
    # only the config and tokenizer are read: a folder of a config without weights will do (shape studies)
    path = resolve_model_path(None) if m.name in (None, DEFAULT_MODEL) else m.name
    hf_config, tokenizer = config_and_tokenizer(path, m.revision, m.trust_remote_code)
    family = family_of(hf_config)
    torch.manual_seed(config.seed)
    with torch.device(device if device.type == "meta" else "cpu"):
        model = family_baselines(family.family).random_model(hf_config)
    return family(model, tokenizer, m.name or DEFAULT_MODEL, m.revision, device, torch.float32)


@functools.lru_cache(maxsize=4)
def config_and_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    import transformers

    common = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": Path(path).is_dir()}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **common)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the config or tokenizer of {path!r}: {str(err).splitlines()[0][:200]}") from None
    return config, tokenizer


# --- data -------------------------------------------------------------------------------------


def synthetic_plans(backbone: Backbone, length: int, count: int, seed: int, max_target_length: int = 128
                    ) -> tuple[TaskSpec, dict[str, SplitPlan]]:
    """`count` examples of exactly `length` random tokens and a random binary label (shape studies).

    The family tokenizes empty texts as usual (so every stack it has is there, e.g. T5's target
    text); then the primary stack's ids become the random tokens and its other id arrays zeros."""
    spec = TaskSpec(SYNTHETIC, ["sentence"], "class", ["0", "1"], ["sentence:"], ["accuracy"], 1)
    rng = np.random.default_rng(seed)
    vocab = int(backbone.config.vocab_size)
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(count, length))
    labels = rng.integers(0, 2, size=count)
    examples = [Example(f"synthetic-{i}", [""], int(labels[i])) for i in range(count)]
    plan = plan_split("train", examples, spec, backbone, length, max_target_length, count, with_candidates=False)
    primary = plan.stacks[0].name
    stored = ids[plan.dataset_index].tolist()
    plan.inputs[primary] = {name: stored if name == "input_ids" else [[0] * length for _ in range(count)]
                            for name in plan.inputs[primary]}
    plan.offsets[primary] = offsets_from_lengths([length] * count)
    return spec, {"train": plan}


def task_plans(config: CompareConfig, backbone: Backbone) -> tuple[TaskSpec, dict[str, SplitPlan]]:
    """Tokenized splits in storage order (the same order an extracted cache has); evaluation
    splits hold the per-candidate stacks too, as a cache does."""
    spec, data = config.data.load()
    if "train" not in data:
        raise UserError("the data has no train split; add --data train=PATH")
    d = config.data
    plans = {split: plan_split(split, data[split], spec, backbone, d.max_length, d.max_target_length, config.batch_size,
                               with_candidates=split != "train")
             for split in SPLITS if split in data}
    return spec, plans


def token_inputs(plan: SplitPlan, rows: np.ndarray | range, stacks: tuple[str, ...] | list[str]) -> TokenInputs:
    """The padded ids of `rows` for `stacks` and their labels, on the CPU."""
    tokens = plan.token_batch(rows, torch.device("cpu"), list(stacks))
    labels = torch.tensor([float(plan.examples[i].label) for i in rows])
    return TokenInputs.of(tokens, labels)


# --- LST as a method --------------------------------------------------------------------------


def new_side_network(network_class: type[SideNetwork], cfg, backbone: Backbone, init: str = "random",
                     scores: dict | None = None, seed: int = 0) -> SideNetwork:
    """The side network; on the meta device (no data to prune from) built directly."""
    from side_train.recipe import build_side_network

    if backbone.device.type != "meta":
        return build_side_network(cfg, backbone, init, scores, seed)
    with torch.device("meta"):
        side = network_class(cfg, backbone.lm_head()[0].detach()) if network_class.needs_lm_head else network_class(cfg)
    side.init_projections()
    return side


def ladder_positions(side: SideNetwork) -> dict[str, list[int]]:
    """Per training stack, the backbone states the side network reads (0: the embedding output)."""
    layers = side.cfg.stack_layers()
    return {stack: [0] + [i + 1 for i in layers[stack]] for stack in side.train_stacks}


def live_ladder_batch(backbone: Backbone, inputs: TokenInputs, positions: dict[str, list[int]]) -> Batch:
    """Run the frozen backbone (inference mode) and keep the side network's layers, rounded to
    bfloat16 as the cache stores them (the same states as side_train.data.LiveSplit, kept on the device)."""
    states = backbone.states(inputs.model_tokens())
    batch = Batch(torch.arange(inputs.size, device=inputs.device), inputs.labels)
    for stack, kept in positions.items():
        tokens = inputs.tokens[stack]
        batch.states[stack] = states[stack][:, :, kept].to(torch.bfloat16).clone()
        batch.masks[stack] = tokens["attention_mask"].bool()
        if "labels" in tokens:
            batch.targets[stack] = tokens["labels"]
    return batch


def cached_ladder_batch(inputs: TokenInputs, side: SideNetwork, generator: torch.Generator | None = None) -> Batch:
    """States of the shape a cache holds for `inputs` (bfloat16, the side network's layers only),
    created on the inputs' device as if loaded from the cache; the values are random."""
    device = inputs.device
    batch = Batch(torch.arange(inputs.size, device=device), inputs.labels)
    for stack, kept in ladder_positions(side).items():
        tokens = inputs.tokens[stack]
        shape = (*tokens["input_ids"].shape, len(kept), side.cfg.backbone_d)
        if device.type == "meta":
            batch.states[stack] = torch.empty(shape, dtype=torch.bfloat16, device=device)
        else:
            batch.states[stack] = torch.randn(shape, generator=generator).to(device, torch.bfloat16)
        batch.masks[stack] = tokens["attention_mask"].bool()
        if "labels" in tokens:
            batch.targets[stack] = tokens["labels"]
    return batch


class LadderLive(nn.Module):
    """LST with the backbone on the device, run per step; only the side network trains."""

    def __init__(self, side: SideNetwork, backbone: Backbone):
        super().__init__()
        self.side = side
        self.frozen = backbone.model  # registered so it counts as device memory
        self.backbone = backbone
        self.positions = ladder_positions(side)

    def train(self, mode: bool = True) -> LadderLive:
        super().train(mode)
        self.frozen.eval()  # the cache stores eval-mode states; live matches it
        return self

    def loss(self, inputs: TokenInputs) -> torch.Tensor:
        return self.side.loss(live_ladder_batch(self.backbone, inputs, self.positions))


def side_network(module: nn.Module) -> nn.Module:
    """The side network of an LST method's module (a baseline's module is returned as it is)."""
    return module.side if isinstance(module, LadderLive) else module


# --- one method, ready to measure -------------------------------------------------------------


@dataclass
class Prepared:
    """A method's device-resident module and how to turn token inputs into its step inputs."""

    name: str
    module: nn.Module  # everything the method keeps on the device
    inputs: Callable[[TokenInputs], object]  # TokenInputs on the device -> what module.loss takes
    backbone_parameters: int
    network_class: type[SideNetwork]  # the family's side network class: the stacks a batch holds
    frozen: nn.Module | None = None  # the backbone model the step runs, if any


def prepare(method: str, config: CompareConfig, spec: TaskSpec, device: torch.device, init: str = "random",
            scores: dict | None = None) -> Prepared:
    """Build `method` on `device` from a fresh backbone."""
    backbone = fresh_backbone(config, device if not method.startswith("lst-cached") or device.type == "meta" else torch.device("cpu"))
    total = parameter_count(backbone.model)
    network_class = side_family(backbone.family)
    torch.manual_seed(config.seed)
    if method in BASELINES or method in GPU_BASELINES:
        module = build_baseline(method, backbone, spec, config.sizes, config.side).to(device)
        return Prepared(method, module, lambda b: b, total, network_class, backbone.model)
    cfg = network_config(network_class, backbone, spec, config.side)
    side = new_side_network(network_class, cfg, backbone, init, scores, config.seed).to(device)
    side.set_recompute(method.endswith("-recompute"))
    if method == "lst-live":
        head = backbone.lm_head()[0].detach() if network_class.needs_lm_head else None
        if head is not None and side.lm_head.shape == head.shape:
            side.lm_head = head  # reuse the backbone's frozen LM head, as the paper does (a side keeping some rows keeps its copy)
        return Prepared(method, LadderLive(side, backbone), lambda b: b, total, network_class, backbone.model)
    generator = torch.Generator().manual_seed(config.seed)
    return Prepared(method, side, lambda b: cached_ladder_batch(b, side, generator), total, network_class, None)


def training_step(module: nn.Module, inputs, optimizer: torch.optim.Optimizer) -> float:
    loss = module.loss(inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure_memory(prepared: Prepared, batch: TokenInputs, watch_backbone: bool = False) -> tuple[MemoryAccount, SavedTensorCounter]:
    """Account one training step's memory; on CUDA also record max_memory_allocated of a warm step.

    On the CPU and the meta device only the forward pass runs (saved tensors are all made there).
    """
    module = prepared.module.train()
    inputs = prepared.inputs(batch)
    device = batch.device
    optimizer = None
    exclude = [*device_tensors(module), *inputs.tensors()]
    side = side_network(module)
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
    memory = account(module, inputs.tensors(), counter, recompute)
    if optimizer is not None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        memory.cuda_peak_bytes = int(torch.cuda.max_memory_allocated(device))
    del loss
    return memory, counter


def time_steps(prepared: Prepared, batch: TokenInputs, steps: int, warmup: int = 2) -> float:
    """Mean seconds per training step (forward, backward, AdamW) after `warmup` untimed steps.

    The step inputs are made once beforehand: for LST-cached the states are already on the
    device, so reading the cache is not part of the step."""
    module = prepared.module.train()
    inputs = prepared.inputs(batch)
    device = batch.device
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


@dataclass
class TokenSource:
    """Batches of token ids for a method that runs the backbone itself (the baselines)."""

    plan: SplitPlan
    stacks: tuple[str, ...]

    def batch(self, rows: np.ndarray) -> TokenInputs:
        return token_inputs(self.plan, rows, self.stacks)


def train_module(method: str, module: nn.Module, source, lengths: np.ndarray, spec: TaskSpec, cfg: TrainConfig,
                 device: torch.device) -> tuple[float, float]:
    """`cfg.max_steps` steps of side_train.train's loop (AdamW on its schedule, clipping, the batches
    side_train.data.epoch_batches cuts: the same row order for every method), writing nothing.

    Returns (seconds, the last step's loss)."""
    cfg = replace(cfg, epochs=epochs_for_steps(lengths, cfg.batch_size, cfg.seed, cfg.max_steps))
    torch.manual_seed(cfg.seed)  # the dropout stream every method starts from
    state = TrainState(module, lengths, spec, cfg, None, device)
    trainee = Trainee(method, state)
    train_networks([trainee], source, device, label=method, quiet=cfg.quiet)
    return trainee.seconds, state.last_loss


@torch.no_grad()
def predict_baseline(module: nn.Module, plan: SplitPlan, stacks: tuple[str, ...], device: torch.device,
                     batch_size: int) -> np.ndarray:
    """The module's predicted label value for every example of a split, in the plan's order."""
    module.eval()
    predictions = np.zeros(plan.num_examples)
    for rows in eval_batches(plan.num_examples, batch_size):
        predictions[rows] = module.predict(token_inputs(plan, rows, stacks).to(device)).numpy()
    return predictions


def cache_for_training(config: CompareConfig, plans: dict[str, SplitPlan]) -> Path:
    """A complete cache of this model and data: `config.cache`, or one extracted into OUT/cache."""
    from backbone_cache.extraction import ExtractConfig, Extraction

    if config.cache:
        return Path(config.cache)
    folder = Path(config.out) / "cache"
    # no importance in the cache: compare computes the init scores once, for LST-live and LST-cached alike
    Extraction(ExtractConfig(out=str(folder), model=config.model, data=config.data, splits=list(plans), device=config.device,
                             init="random", quiet=config.quiet)).run()
    return folder


def lst_sources(config: CompareConfig, prepared: Prepared, reference: Backbone, spec: TaskSpec,
                plans: dict[str, SplitPlan]) -> dict:
    """Each split's source of ladder batches for the side network's layers: the live backbone
    (side_train.data.LiveSplit) or a cache (CachedSplit, in RAM), as side_train.run makes them."""
    from shared.cache_format import open_complete
    from side_train.recipe import Sources, data_sources

    side = side_network(prepared.module)
    if isinstance(prepared.module, LadderLive):
        return data_sources(Sources(spec, prepared.module.backbone, list(plans), "live", None, None, plans), side.cfg)
    folder = cache_for_training(config, plans)
    manifest = open_complete(folder)
    out = data_sources(Sources(spec, reference, list(plans), "cache", manifest, folder), side.cfg, tier="ram")
    for split, source in out.items():
        if not np.array_equal(source.lengths, plans[split].lengths):
            raise UserError(f"cache {folder} holds other examples than --task/--limit/--max-length give; "
                            "extract it with the same settings or drop --cache")
    return out


def train_and_evaluate(method: str, config: CompareConfig, spec: TaskSpec, plans: dict[str, SplitPlan], device: torch.device,
                       reference: Backbone, lst_init: tuple[str, dict | None], keep_predictions: bool = False) -> dict:
    """Train `method` for `config.train_steps` on the training split, then score validation and test.

    `reference` supplies the family and the tokenizer and holds no weights. With `keep_predictions`,
    each split's metrics also hold "predictions": the predicted label value of every example, in order
    (for paired comparisons between methods)."""
    from side_train.evaluate import evaluate, predict

    cfg = config.train_config(method)
    train_plan = plans["train"]
    evals = [s for s in ("validation", "test") if s in plans]
    prepared = prepare(method, config, spec, device, *lst_init)
    network = prepared.network_class
    out: dict = {"lr": cfg.lr}
    if method in BASELINES or method in GPU_BASELINES:
        module = prepared.module
        source = TokenSource(train_plan, network.train_stacks)
        out["train_seconds"], out["train_loss_last"] = train_module(method, module, source, train_plan.lengths, spec, cfg, device)
        values = {s: predict_baseline(module, plans[s], network.eval_stacks, device, cfg.eval_batch_size) for s in evals}
    else:
        side = side_network(prepared.module)
        sources = lst_sources(config, prepared, reference, spec, plans)
        if side.cfg.standardize_ladders:  # before training, from the states the arm trains on (live or cached)
            standardize_ladders(side, sources["train"])
        out["train_seconds"], out["train_loss_last"] = train_module(method, side, sources["train"], train_plan.lengths, spec, cfg,
                                                                    device)
        if spec.label_kind == "lm":  # scored by the response tokens' loss: no predicted values
            return {**out, **{s: evaluate(side, sources[s], spec, device, cfg.eval_batch_size) for s in evals}}
        values = {s: predict(side, sources[s], spec, device, cfg.eval_batch_size) for s in evals}
    for split in evals:
        out[split] = compute_metrics(spec.metrics, values[split], np.array([float(ex.label) for ex in plans[split].examples]))
        if keep_predictions:
            out[split]["predictions"] = values[split].tolist()
    return out


def lst_init_scores(config: CompareConfig, spec: TaskSpec, plans: dict[str, SplitPlan]) -> tuple[str, dict | None]:
    """One importance computation shared by LST-live and LST-cached, so both start alike."""
    from backbone_cache.importance import fisher_scores, magnitude_scores

    if config.init == "random":
        return "random", None
    backbone = fresh_backbone(config, pick_device(config.device))
    if config.init == "magnitude":
        return "magnitude", magnitude_scores(backbone)
    return "fisher", fisher_scores(backbone, spec, plans["train"], config.fisher_samples, quiet=config.quiet)


# --- the whole comparison ---------------------------------------------------------------------


def free(device: torch.device) -> None:
    """Release the last method's memory before the next one (on Linux, hand freed heap back to the OS)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    release_freed_memory()


def compare(config: CompareConfig) -> tuple[list[Row], dict]:
    """Measure every method; return the rows and the settings they were measured with."""
    config.check()
    keep_freed_memory()
    device = pick_device(config.device)
    memory_device = torch.device("meta") if config.memory_on == "meta" else device
    reference = fresh_backbone(config, torch.device("meta"))  # config and tokenizer only
    network = side_family(reference.family)
    batch_size, time_batch_size = config.batch_size, config.timing_batch_size
    if config.synthetic:
        spec, plans = synthetic_plans(reference, config.data.max_length, max(batch_size, time_batch_size), config.seed,
                                      config.data.max_target_length)
    else:
        spec, plans = task_plans(config, reference)
    train_plan = plans["train"]
    if train_plan.num_examples < max(batch_size, time_batch_size):
        raise UserError(f"the training split has {train_plan.num_examples} examples, fewer than the batch size; "
                        "raise --limit or lower --batch-size")
    memory_batch = token_inputs(train_plan, np.arange(batch_size), network.train_stacks)
    time_batch = token_inputs(train_plan, np.arange(time_batch_size), network.train_stacks)
    widths = {stack: int(t["input_ids"].shape[1]) for stack, t in memory_batch.tokens.items()}
    primary = train_plan.stacks[0].name
    settings = {"model": config.model.name or reference.name, "family": reference.family, "task": spec.name,
                "batch_size": batch_size, "source_tokens": widths[primary],
                "target_tokens": next((w for stack, w in widths.items() if stack != primary), None), "stack_tokens": widths,
                "device": str(device), "memory_on": config.memory_on, "time_batch_size": time_batch_size,
                "time_steps": config.time_steps, "train_steps": config.train_steps, "random_init": config.random_init,
                "adapter_width": config.sizes.adapter_width, "lora_rank": config.sizes.lora_rank,
                "prompt_tokens": config.sizes.prompt_tokens, "reduction": config.side.reduction,
                "drop_layers": config.side.drop_layers, "side_layers": config.side.side_layers,
                "free_blocks": config.side.free_blocks,
                "dropout": config.side.dropout, "merge_final": config.side.merge_final,
                "standardize_ladders": config.side.standardize_ladders,
                "init": config.init if config.train_steps else None,
                "lr": {m: config.lrs[m] for m in config.methods} if config.train_steps else None, "seed": config.seed}
    lst_init = ("random", None)
    if config.train_steps and any(m in LST_METHODS for m in config.methods):
        lst_init = lst_init_scores(config, spec, plans)
    rows = []
    for method in config.methods:
        skipped = qlora_unavailable(memory_device) or qlora_unavailable(device) if method in GPU_BASELINES else None
        if skipped:
            rows.append(Row(method, 0, 0, MemoryAccount(0, 0, 0, 0, 0, 0), skipped=skipped))
            if not config.quiet:
                tqdm.write(f"{method}: skipped ({skipped})", file=sys.stderr)
            continue
        prepared = prepare(method, config, spec, memory_device)
        memory, _ = measure_memory(prepared, memory_batch.to(memory_device))
        row = Row(method, parameter_count(prepared.module, trainable_only=True), prepared.backbone_parameters, memory)
        if config.time_steps:
            if memory_device != device:
                prepared = prepare(method, config, spec, device)
            row.seconds_per_step = time_steps(prepared, time_batch.to(device), config.time_steps)
        del prepared
        free(device)
        if config.train_steps:
            row.training = train_and_evaluate(method, config, spec, plans, device, reference, lst_init)
            free(device)
        rows.append(row)
        if not config.quiet:
            shown = f"{memory.total_bytes / 2**30:.3f} GiB accounted"
            if row.seconds_per_step is not None:
                shown += f", {row.seconds_per_step:.3f} s/step"
            if row.training.get("test"):
                shown += f", test {row.training['test']['score']:.2f}"
            tqdm.write(f"{method}: {shown}", file=sys.stderr)
    return rows, settings
