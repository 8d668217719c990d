"""Training runs: run folders, their identity, and the passes that train them.

A run is one side network trained into one folder (config.json, metrics.jsonl, summary.json,
side_model/, best_side_model/, checkpoint/). `run(RunConfig)` trains one (under torchrun: data
parallel, with rank 0 writing the folder; see side_train.train.TrainState); a sweep
(side_train.sweep_plan) trains many, grouped into passes over one shared batch stream.
Both go through `train_pass`, so a run and a sweep of one are the same code and give the
same numbers. A killed run, rerun with the same settings, resumes from its checkpoint.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shared.allocator import keep_freed_memory
from shared.backbones import pick_device
from shared.cli import positive
from shared.distributed import Ranks, barrier, broadcast_object, check_devices, setup
from shared.errors import UserError
from side_train.data import LayerView
from side_train.evaluate import GENERATE_ON_LM
from side_train.memory import device_tensors, storage_bytes
from side_train.model import SideConfig, SideOptions
from side_train.recipe import (
    INITS,
    SourceConfig,
    Sources,
    backbone_parameters,
    build_side_network,
    choose_tier,
    data_sources,
    importance_scores,
    open_sources,
    side_config,
    standardize_ladders,
)
from side_train.train import TrainConfig, Trainee, TrainState, config_dict, train_networks, uses_bf16

RUN_FOLDER_VERSION = 2


@dataclass
class RunConfig:
    """One training run (`python -m side_train.run` fills it from its flags)."""

    source: SourceConfig = field(default_factory=SourceConfig)
    side: SideOptions = field(default_factory=SideOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str = "fisher"  # pruned init from fisher or magnitude importance, or random
    fisher_samples: int = 1024  # live fisher init: training examples
    out: str = "runs/lst"
    overwrite: bool = False

    def check(self) -> None:
        """One-line errors for settings out of range (before anything is loaded)."""
        t = self.train
        for name in ("batch_size", "eval_batch_size", "epochs", "max_steps", "lr"):
            positive(getattr(t, name), f"--{name.replace('_', '-')}")
        positive(self.fisher_samples, "--fisher-samples")
        for name in ("warmup_steps", "save_every", "clip", "weight_decay"):
            positive(getattr(t, name), f"--{name.replace('_', '-')}", allow_zero=True)
        if self.init not in INITS:
            raise UserError(f"--init {self.init!r}: choose one of {', '.join(INITS)}")
        if t.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision {t.precision!r}: choose auto, fp32 or bf16")
        if t.eval_mode not in ("candidates", "generate"):
            raise UserError(f"--eval {t.eval_mode!r}: choose candidates or generate")
        self.side.check()
        check_out_path(Path(self.out))


@dataclass
class Member:
    """One run of a pass: its settings, folder and identity, and its state while it trains."""

    name: str
    config: RunConfig
    side_cfg: SideConfig
    train_cfg: TrainConfig
    run_dir: Path
    identity: dict
    overrides: dict = field(default_factory=dict)  # a sweep's settings for this run
    finished: bool = False
    resident_bytes: int = 0  # estimate held for the whole pass: parameters, buffers, AdamW state
    step_bytes: int = 0  # estimate held during its own step only: gradients and saved activations
    seconds: float = 0.0
    trainee: Trainee | None = field(default=None, repr=False)


# --- run folders ---------------------------------------------------------------------------


def check_out_path(run_dir: Path) -> None:
    """--out and every folder above it that exists must be folders."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {run_dir}: {folder} is a file; choose a folder")


def stored_identity(run_dir: Path) -> dict | None:
    """A run folder's identity from its config.json (None without one); a folder written by
    another version of this tool is a user error."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON; choose another --out or pass --overwrite") from None
    if stored.get("run_folder_version") != RUN_FOLDER_VERSION:
        raise UserError(f"{run_dir} holds a run of another version of this tool; choose another --out or pass --overwrite")
    return stored.get("identity")


def first_difference(stored: dict, wanted: dict, path: str = "") -> str:
    """Name the first setting that differs between a run folder's identity and the settings given."""
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{path}{key}.")
            if found:
                return found
        elif a != b:
            return f"its {path}{key} is {a}, the flags give {b}"
    return ""


def finished_before(member: Member) -> bool:
    """The member's folder holds this very run, finished, and it is not to be redone."""
    if member.config.overwrite or not (member.run_dir / "summary.json").is_file():
        return False
    try:
        return stored_identity(member.run_dir) == member.identity
    except UserError:
        return False


def prepare_run_dir(member: Member) -> None:
    """Refuse to clobber a finished or different run; allow resuming the same one."""
    run_dir = member.run_dir
    check_out_path(run_dir)
    try:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            if member.config.overwrite:
                shutil.rmtree(run_dir)
            else:
                stored = stored_identity(run_dir)
                if stored is None:
                    raise UserError(f"--out {run_dir} is a non-empty folder that is not a run; choose another --out")
                if stored != member.identity:
                    raise UserError(f"--out {run_dir} holds a different run ({first_difference(stored, member.identity)}); "
                                    "choose another --out, repeat its flags to resume it, or pass --overwrite")
                if (run_dir / "summary.json").is_file():
                    raise UserError(f"--out {run_dir} already holds this finished run (see summary.json); pass --overwrite to redo it")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "probe").touch()
        (run_dir / "probe").unlink()
    except PermissionError:
        raise UserError(f"cannot write to --out {run_dir}; choose a folder you can write to") from None


PUBLIC_OPTIONS = ("endpoint_url", "client_kwargs", "anon", "region_name", "project")


def public_options(options: dict) -> dict:
    """--storage-options as recorded in a run folder: credentials replaced by "<hidden>"."""
    return {k: v if k in PUBLIC_OPTIONS else "<hidden>" for k, v in options.items()}


def write_config(member: Member, sources: Sources) -> None:
    """config.json: the run's identity, its settings, and `inputs`, the lengths its training inputs
    were cut at (a cache's own, else the data settings), which prediction repeats."""
    lengths = sources.manifest if sources.manifest is not None else asdict(member.config.source.data)
    inputs = {k: lengths[k] for k in ("max_length", "max_target_length")}
    settings = asdict(member.config)
    settings["source"]["storage_options"] = public_options(settings["source"]["storage_options"])
    record = {"run_folder_version": RUN_FOLDER_VERSION, "identity": member.identity, "settings": settings,
              "inputs": inputs}
    (member.run_dir / "config.json").write_text(json.dumps(record, indent=1, default=str))


# --- members ---------------------------------------------------------------------------------


def make_member(name: str, config: RunConfig, sources: Sources, device: torch.device, overrides: dict | None = None,
                world_size: int = 1) -> Member:
    """Size a run's side network and compute its identity (what a resumed run must repeat; a data
    parallel run's includes its world size, which sets the global batch)."""
    side_cfg = side_config(sources, config.side)
    train_cfg = config.train
    if train_cfg.epochs is None:
        train_cfg = TrainConfig(**{**asdict(train_cfg), "epochs": sources.spec.epochs})
    uses_bf16(train_cfg.precision, device)  # refuse bf16 where it is not native before any folder is made
    if train_cfg.eval_mode == "generate" and sources.spec.label_kind == "lm":
        raise UserError(GENERATE_ON_LM)
    if train_cfg.eval_mode == "generate" and (sources.mode != "live" or not sources.network_class.can_generate):
        raise UserError("--eval generate needs a backbone run live that can generate (T5: add --live), "
                        "or drop --eval generate")
    identity = {"side": side_cfg.to_json(), "train": config_dict(train_cfg, device), "init": config.init,
                "model": sources.backbone.info().to_json(), "task": sources.spec.to_json(),
                "cache": cache_name(sources.cache) if sources.cache else None, "mode": sources.mode}
    if world_size > 1:
        identity["world_size"] = world_size
    return Member(name, config, side_cfg, train_cfg, Path(config.out), identity, overrides or {})


def cache_name(cache) -> str:
    """How a run records its cache: a folder's absolute path, or the URL (never its credentials)."""
    return str(cache.path.resolve()) if cache.is_local else cache.url


def union_config(members: list[Member]) -> SideConfig:
    """One config whose stacks read every layer any member reads (the shared batches' layers)."""
    import dataclasses

    cfg = members[0].side_cfg
    union = {field_name: sorted({i for m in members for i in getattr(m.side_cfg, field_name)})
             for field_name in cfg.layer_fields}
    return dataclasses.replace(cfg, **union)


def positions_in(union: SideConfig, cfg: SideConfig) -> dict[str, list[int] | None]:
    """Per stack, the positions of [embeddings, *cfg's layers] among the union's loaded states (None: all)."""
    out = {}
    for stack, layers in cfg.stack_layers().items():
        everything = union.stack_layers()[stack]
        index = [0] + [1 + everything.index(i) for i in layers]
        out[stack] = None if index == list(range(len(everything) + 1)) else index
    return out


# --- training -----------------------------------------------------------------------------


def train_pass(members: list[Member], sources: Sources, data: dict, union: SideConfig, scores: dict, device: torch.device,
               label: str = "train", quiet: bool = False, track_memory: bool = False, last_pass: bool = True,
               ranks: Ranks | None = None) -> None:
    """Build and train a pass's members on one shared batch stream (they share batch size and seed;
    with `ranks` of a torchrun job, data parallel over the ranks).
    After the last pass's networks are built, a cached run's backbone weights are dropped (only the
    LM head, copied into a side network, is still needed)."""
    statistics: dict[str, dict] = {}  # one reading per set of layers, however many members standardize
    for m in members:
        model = build_side_network(m.side_cfg, sources.backbone, m.config.init, scores.get(m.config.init), m.train_cfg.seed)
        positions = positions_in(union, m.side_cfg)
        if m.side_cfg.standardize_ladders:  # before the checkpoint, which holds the same statistics, is loaded
            key = json.dumps(positions, sort_keys=True)
            statistics[key] = standardize_ladders(model, LayerView(data["train"], positions), statistics.get(key))
        state = TrainState(model, data["train"].lengths, sources.spec, m.train_cfg, m.run_dir, device, track_memory=track_memory,
                           ranks=ranks)
        evals = {s: LayerView(data[s], positions) for s in ("validation", "test") if s in data}
        m.trainee = Trainee(m.name, state, positions, evals)
    if sources.mode == "cache" and last_pass:
        sources.backbone.model = None
    train_networks([m.trainee for m in members], data["train"], device, label, quiet)
    for m in members:
        m.seconds += m.trainee.seconds


def finish_member(m: Member, sources: Sources, total_params: int, device: torch.device, tier: str,
                  pass_info: dict | None = None) -> dict:
    """side_model/ and summary.json (with a sweep's own figures when `pass_info` is given;
    data parallel: written by rank 0, returned on every rank)."""
    state = m.trainee.state
    summary = state.summary()
    if state.world > 1:
        summary["world_size"] = state.world
        summary["global_batch_size"] = state.global_batch
    if state.writes:
        state.model.save_pretrained(m.run_dir / "side_model")
    trainable = state.model.trainable_parameters()
    summary.update(trainable_parameters=trainable, backbone_parameters=total_params, trainable_share=trainable / total_params,
                   source=sources.mode, tier=tier, device=str(device), wall_seconds=round(m.seconds, 3),
                   task=sources.spec.name, model=sources.backbone.name)
    if state.memory is not None:  # None when data parallel, or when a resumed run had no step left
        summary["training_memory_bytes"] = state.memory.total_bytes
        summary["training_memory"] = state.memory.to_json()
        if sources.mode == "live":  # the frozen backbone sits beside the side network while it trains
            summary["live_backbone_bytes"] = sum(storage_bytes(device_tensors(sources.backbone.model)).values())
    if pass_info is not None:
        summary["peak_memory_kind"] += "_whole_sweep_process"
        summary["sweep"] = pass_info
    if state.writes:
        (m.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    m.trainee = None
    return summary


def parameter_count(cfg: SideConfig) -> int:
    """Trainable parameters of a side network of this config (built on the meta device: no memory)."""
    from side_train.families import side_family

    network_class = side_family(cfg.family)
    with torch.device("meta"):
        head = torch.empty(cfg.vocab_size, cfg.backbone_d) if network_class.needs_lm_head else None
        model = network_class(cfg, head) if network_class.needs_lm_head else network_class(cfg)
    return model.trainable_parameters()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def job_device(choice: str) -> tuple[torch.device, Ranks]:
    """The device of this process (under torchrun: cuda:LOCAL_RANK beside GPUs), having joined the job's process group."""
    from shared.distributed import ranks as job_ranks

    r = job_ranks()
    check_devices(choice, r)
    device = pick_device(choice)  # a bad --device is refused before the process group forms
    r = setup(device.type)
    if r.distributed and device.type == "cuda":
        device = torch.device("cuda", r.local_rank)
    return device, r


def on_rank_zero(fn, r: Ranks):
    """Run `fn` on rank 0 alone; a UserError it raises is raised on every rank (the same one line)."""
    if not r.distributed:
        return fn()
    message, result = None, None
    if r.is_main:
        try:
            result = fn()
        except UserError as err:
            message = str(err)
    message = broadcast_object(message)
    if message is not None:
        raise UserError(message)
    barrier()
    return result


def run(config: RunConfig) -> dict:
    """Train one side network into config.out and return its summary (the Python API of side_train.run).
    Under torchrun: data parallel over the job's ranks (`--batch-size` per rank)."""
    keep_freed_memory()  # the step's large temporaries reuse memory (shared.allocator)
    device, ranks = job_device(config.source.device)
    sources = open_sources(config.source, device)
    if "train" not in sources.splits:
        raise UserError("the data has no train split; extract it with --splits train,...")
    member = make_member(Path(config.out).name, config, sources, device, world_size=ranks.world_size)
    on_rank_zero(lambda: prepare_run_dir(member), ranks)
    scores = {config.init: importance_scores(sources, config.init, config.fisher_samples, quiet=config.train.quiet)}
    total = backbone_parameters(sources.backbone)
    tier = choose_tier(sources.manifest, member.side_cfg, device, config.source.tier) if sources.mode == "cache" else "live"
    data = data_sources(sources, member.side_cfg, tier, config.source.reader, device, ranks)
    if ranks.is_main and not (member.run_dir / "config.json").is_file():
        # written once every check has passed: a run refused above leaves no identity behind to block its corrected rerun
        write_config(member, sources)
    if not config.train.quiet and ranks.is_main:
        trainable = parameter_count(member.side_cfg)
        print(f"side network: {trainable:,} trainable parameters, {100 * trainable / total:.3f}% of the "
              f"{total:,}-parameter backbone; source: {sources.mode} ({tier}); device: {device}", file=sys.stderr)
    start = time.perf_counter()
    # the side network's largest step is accounted (side_train.memory) on one process; not under data parallel
    train_pass([member], sources, data, member.side_cfg, scores, device, quiet=config.train.quiet,
               track_memory=ranks.world_size == 1, ranks=ranks)
    member.seconds = time.perf_counter() - start
    return finish_member(member, sources, total, device, tier)
