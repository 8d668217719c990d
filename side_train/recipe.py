"""Building blocks every training command uses: where states come from, the side network, its init.

Walkthrough: `open_sources` resolves a `SourceConfig` into the task, the backbone (on the CPU
when training from the cache, since only its config, LM head and init slices are used) and
the splits; `side_config` sizes the family's side network from `SideOptions`;
`build_side_network` initialises it; `data_sources` gives each split's source of batches in
its storage tier (GPU, RAM, disk, or the live backbone); `standardize_ladders` sets the
ladders' per-channel statistics from the training split (--standardize-ladders).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backbone_cache.plan import SplitPlan, plan_split
from shared.backbones import default_dtype, load_backbone
from shared.cache_format import open_complete
from shared.config import DataConfig, ModelConfig
from shared.distributed import Ranks, local_world_size
from shared.errors import UserError
from shared.families import Backbone
from shared.stores import CacheLocation
from shared.tasks import SPLITS, TaskSpec
from side_train.data import CachedSplit, LiveSplit
from side_train.families import side_family
from side_train.model import LadderStack, SideConfig, SideNetwork, SideOptions

INITS = ("fisher", "magnitude", "random")
TIERS = ("auto", "gpu", "ram", "disk")


@dataclass
class SourceConfig:
    """Where ladder states come from: a cache, or the backbone run live (on a model and data)."""

    cache: str | None = None  # a folder, or an object-storage URL (s3://bucket/prefix, gs://..., any fsspec URL)
    storage_options: dict = field(default_factory=dict)  # fsspec options of a URL cache (credentials, endpoint_url)
    live: bool = False  # with a cache: run its backbone on its data instead of reading its states
    model: ModelConfig = field(default_factory=ModelConfig)  # live without a cache
    data: DataConfig = field(default_factory=DataConfig)  # live without a cache
    device: str = "auto"
    tier: str = "auto"  # cached states: gpu, ram, disk, or auto (the first that fits)
    reader: str | int | None = None  # disk tier: inline, thread or N processes (None: by the machine)

    @property
    def mode(self) -> str:
        return "live" if self.live or not self.cache else "cache"


@dataclass
class Sources:
    spec: TaskSpec
    backbone: Backbone
    splits: list[str]
    mode: str  # "cache" or "live"
    manifest: dict | None
    cache: CacheLocation | None
    plans: dict[str, SplitPlan] = field(default_factory=dict)  # live: each split's tokens

    @property
    def network_class(self) -> type[SideNetwork]:
        return side_family(self.backbone.family)


def open_sources(config: SourceConfig, device: torch.device, splits: tuple[str, ...] = SPLITS) -> Sources:
    """Resolve a SourceConfig into a backbone, a task and the splits to train and evaluate on."""
    manifest, model = None, config.model
    cache = CacheLocation.of(config.cache, config.storage_options or None) if config.cache else None
    if cache is not None:
        cache.check_access()  # a missing bucket, bad credentials or an unreachable endpoint: one line, first
        manifest = open_complete(cache)
        name = manifest["model"]["name"]
        if config.model.name is not None and config.model.name != name:
            raise UserError(f"cache {config.cache} was built from model {name!r}, not --model {config.model.name!r}; "
                            "drop --model or use its cache")
        model = ModelConfig(None if name.endswith("(embedded)") else name, manifest["model"].get("revision"),
                            config.model.trust_remote_code)
    live = config.mode == "live"
    # cached: the backbone on the CPU for its config, tokenizer, LM head and pruned init only;
    # --cache --live: live states must equal the cached ones, so the backbone must compute in
    # the cache's dtype, which is this device's own (float32 on a CPU or an older GPU, else bf16)
    computes_in = str(default_dtype(device)).removeprefix("torch.")
    if live and manifest is not None and manifest["compute_dtype"] != computes_in:
        raise UserError(f"cache {config.cache} was computed in {manifest['compute_dtype']}, and this device computes in "
                        f"{computes_in}, so --live would not reproduce its states; "
                        "run --cache --live on the kind of device that built the cache, or train live without --cache")
    backbone = load_backbone(model.name, device if live else torch.device("cpu"), dtype=None if live else torch.float32,
                             revision=model.revision, trust_remote_code=model.trust_remote_code)
    if manifest is not None:
        found = backbone.info().to_json()
        for key in ("config_fingerprint", "tokenizer_fingerprint", "d_model", "num_layers"):
            if found[key] != manifest["model"][key]:
                raise UserError(f"the model {model.name!r} loaded now differs from the one the cache was built with ({key}); "
                                "rebuild the cache")
        if not live:
            return Sources(TaskSpec.from_json(manifest["task"]), backbone, [s for s in manifest["splits"] if s in splits],
                           "cache", manifest, cache)
    data = DataConfig.from_json(manifest["data_source"]) if manifest is not None else config.data
    spec, examples = data.load()
    batch_size = manifest["batch_size"] if manifest is not None else 64
    wanted = [s for s in (manifest["splits"] if manifest is not None else examples) if s in splits]
    plans = {s: plan_split(s, examples[s], spec, backbone, data.max_length, data.max_target_length, batch_size,
                           with_candidates=s != "train") for s in wanted}
    return Sources(spec, backbone, wanted, "live", manifest, cache, plans)


def side_config(sources: Sources, options: SideOptions) -> SideConfig:
    """The family's side network config for this backbone, task and options."""
    return network_config(sources.network_class, sources.backbone, sources.spec, options)


def network_config(network_class: type[SideNetwork], backbone: Backbone, spec: TaskSpec, options: SideOptions) -> SideConfig:
    """`network_class`'s config for this backbone, task and options (side_config without Sources)."""
    cfg = network_class.config_for(backbone, spec, options)
    cfg.standardize_ladders = options.standardize_ladders  # every family's ladders alike
    return cfg


STATISTICS_EXAMPLES = 512  # training examples, spread over the split, that fix standardized ladders' statistics


def ladder_input_statistics(source, stacks: tuple[str, ...], max_examples: int = STATISTICS_EXAMPLES,
                            batch_size: int = 32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per stack: the mean and standard deviation [1 + side layers, D] of each stored state's channels
    over the real tokens of up to `max_examples` training examples spread evenly over the split
    (storage order is length order, so the spread covers every length). Each sequence's first position
    is left out: a decoder's <bos> row is an attention sink, its channels ten times the median's."""
    n = source.num_examples
    rows = np.unique(np.linspace(0, n - 1, min(n, max_examples)).round().astype(np.int64))
    totals: dict[str, tuple] = {}  # per stack: (sum, sum of squares, tokens)
    for start in range(0, len(rows), batch_size):
        batch = source.batch(rows[start:start + batch_size])
        for stack in stacks:
            states, mask = batch.states[stack], batch.masks[stack].to(batch.states[stack].device).clone()
            mask[torch.arange(len(mask)), mask.int().argmax(1)] = False  # each sequence's first real position
            x = states[mask].double()  # [tokens, 1 + side layers, D]
            first, second, count = totals.get(stack, (0.0, 0.0, 0))
            totals[stack] = (first + x.sum(0).cpu(), second + x.square().sum(0).cpu(), count + len(x))
    out = {}
    for stack, (first, second, count) in totals.items():
        if count < 2:
            raise UserError(f"the train split holds too few tokens ({count}) to standardize the ladders; drop --standardize-ladders")
        mean = first / count
        out[stack] = (mean.float(), (second / count - mean.square()).clamp(min=0).sqrt().float())
    return out


def standardize_ladders(model: SideNetwork, train_source, statistics: dict | None = None) -> dict:
    """Set each training stack's ladder standardization from the training split's states (or from
    `statistics` already read for the same layers); returns the statistics."""
    if statistics is None:
        stacks = tuple(name for name in model.train_stacks if isinstance(getattr(model, name, None), LadderStack))
        statistics = ladder_input_statistics(train_source, stacks)
    for stack, (mean, std) in statistics.items():
        getattr(model, stack).set_input_statistics(mean, std)
    return statistics


def state_bytes(manifest: dict, split: str, cfg: SideConfig) -> int:
    """Bytes of the bf16 states a side network reads from one split (its layers only)."""
    meta = manifest["splits"][split]["stacks"]
    layers = cfg.stack_layers()
    return sum(m["num_tokens"] * (len(layers[s]) + 1) * manifest["model"]["d_model"] * 2 for s, m in meta.items() if s in layers)


def choose_tier(manifest: dict, cfg: SideConfig, device: torch.device, tier: str = "auto") -> str:
    """gpu if every split fits in half the free GPU memory, else ram if it fits in half the
    available host memory, else disk; an explicit tier is taken as given. Under torchrun every
    process on the node holds its own copy, so host memory must fit one per local rank."""
    if tier not in TIERS:
        raise UserError(f"--tier {tier!r}: choose one of {', '.join(TIERS)}")
    if tier != "auto":
        if tier == "gpu" and device.type != "cuda":
            raise UserError("--tier gpu needs --device cuda; use --tier ram or disk on the CPU")
        return tier
    need = sum(state_bytes(manifest, s, cfg) for s in manifest["splits"])
    if device.type == "cuda" and need < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return "gpu"
    return "ram" if need * local_world_size() < 0.5 * available_host_memory() else "disk"


def available_host_memory(meminfo_path: str = "/proc/meminfo", cgroup_path: str = "/proc/self/cgroup",
                          cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Bytes of host memory a new allocation can take without swapping: Linux's MemAvailable (free
    memory plus the page cache it can drop, such as a just-extracted cache's files), else free pages;
    no more than this process's cgroup memory limit leaves (a container's, a Slurm job's)."""
    host = None
    try:
        with open(meminfo_path) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if host is None:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limited = cgroup_available_memory(cgroup_path, cgroup_root)
    return host if limited is None else min(host, limited)


def cgroup_available_memory(cgroup_path: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """What this process's cgroup memory limit leaves (v2 memory.max, or v1 memory.limit_in_bytes): the
    limit less the usage, not counting the inactive page cache the kernel can drop; None without a limit."""
    def number(path: Path, key: str | None = None) -> int | None:
        try:
            text = path.read_text()
            if key is not None:
                text = next((line.split()[1] for line in text.splitlines() if line.split()[:1] == [key]), "")
            return int(text.strip())
        except (OSError, ValueError):
            return None

    try:
        lines = Path(cgroup_path).read_text().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:
        _, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            names, base = ("memory.max", "memory.current", "inactive_file"), Path(cgroup_root)
        elif "memory" in controllers.split(","):
            names, base = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"), Path(cgroup_root) / "memory"
        else:
            continue
        for folder in (base / group.lstrip("/"), base):  # the process's group, or the namespace's own root
            limit, usage = number(folder / names[0]), number(folder / names[1])
            if limit is not None and usage is not None:
                if limit < 1 << 60:  # v2 writes "max" (not a number) and v1 a huge one when unlimited
                    left.append(limit - usage + (number(folder / "memory.stat", names[2]) or 0))
                break
    return max(0, min(left)) if left else None


def reader_mode(text: str) -> str | int:
    """--reader: 'inline', 'thread' or a positive number of reader processes."""
    word = text.strip().lower()
    if word in ("inline", "thread"):
        return word
    try:
        count = int(word)
    except ValueError:
        count = 0
    if count <= 0:
        raise UserError(f"--reader {text!r} is not a reader mode; use inline, thread or a number of reader processes")
    return count


def default_reader(device: torch.device | None = None, remote: bool = False) -> str | int:
    """How the disk tier reads where --reader is not given. On a few CPUs a CPU training step uses
    every core, and reads stolen from it on another thread stall the step's parallel regions as
    well: reading inline, between steps, costs the read time once (measured on 2 CPUs: disk/RAM
    epoch 0.95-1.06x inline, 1.03-1.19x with a thread, 1.4-1.6x with a process). Beside a GPU the
    CPU is free while the step runs, so a background thread overlaps the reads; with more than 4
    CPUs, one reader process. A cache on object storage is never read inline: a background
    thread fetches the next pools while the current ones train (its wait is the network's)."""
    if (os.cpu_count() or 1) > 4:
        return 1
    return "thread" if remote or (device is not None and device.type == "cuda") else "inline"


def data_sources(sources: Sources, cfg: SideConfig, tier: str = "ram", reader: str | int | None = None,
                 device: torch.device | None = None, ranks: Ranks | None = None) -> dict:
    """Each split's source of batches for a side network's layers, in the given tier: training
    splits hold the network's training stacks, the others its evaluation stacks. With `ranks` of
    a data-parallel job, a cached evaluation split holds only this rank's share (its rows to score)."""
    from side_train.streaming import StreamingSplit

    network = sources.network_class
    layers = cfg.stack_layers()
    out = {}
    for split in sources.splits:
        stacks = network.train_stacks if split == "train" else network.eval_stacks
        wanted = {s: layers[s] for s in stacks}
        if sources.mode == "live":
            out[split] = LiveSplit(sources.backbone, sources.plans[split], wanted)
        elif tier == "disk" and split == "train":
            out[split] = StreamingSplit(sources.cache, sources.manifest, split, wanted,
                                        default_reader(device, not sources.cache.is_local) if reader is None else reader,
                                        pin_memory=device is not None and device.type == "cuda")
        else:  # a data-parallel rank holds only its share of an evaluation split
            out[split] = CachedSplit(sources.cache, sources.manifest, split, wanted, device if tier == "gpu" else None,
                                     share_of=ranks if split != "train" else None)
    return out


def importance_scores(sources: Sources, init: str, fisher_samples: int, quiet: bool = True) -> dict | None:
    """Row scores for pruned init: the cache's stored Fisher, live Fisher, or magnitude."""
    from backbone_cache.importance import fisher_scores, magnitude_scores

    if init not in INITS:
        raise UserError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    if init == "random":
        return None
    if init == "magnitude":
        return magnitude_scores(sources.backbone)
    if sources.manifest is not None:  # cached, or --cache --live: the cache's scores, so both init alike
        meta = sources.manifest.get("importance")
        if not meta or meta.get("kind") != "fisher":
            raise UserError(f"cache {sources.cache} holds no Fisher importance; extract with --init fisher or use --init magnitude")
        from safetensors.torch import load

        return load(sources.cache.read_bytes("importance.safetensors"))  # a local folder or an object store alike
    if "train" not in sources.plans:
        raise UserError("fisher init needs the train split")
    return fisher_scores(sources.backbone, sources.spec, sources.plans["train"], fisher_samples, quiet=quiet)


def build_side_network(cfg: SideConfig, backbone: Backbone, init: str, scores: dict | None, seed: int) -> SideNetwork:
    """Construct, prune-initialise from the backbone (or not), and seed."""
    network_class = side_family(cfg.family)
    torch.manual_seed(seed)
    if network_class.needs_lm_head:
        model = network_class(cfg, backbone.lm_head()[0].detach().float().cpu())
    else:
        model = network_class(cfg)
    model.init_projections()
    if init == "random":
        model.random_init()
    else:
        model.init_from_backbone({k: v.detach().float().cpu() for k, v in backbone.model.state_dict().items()}, scores)
    torch.manual_seed(seed)  # the training RNG stream starts here for every source and init
    return model


def backbone_parameters(backbone: Backbone) -> int:
    return sum(p.numel() for p in {id(p): p for p in backbone.model.parameters()}.values())
