"""`python -m side_train.sweep`: many side networks trained from one cache, one batch stream.

    python -m side_train.sweep --cache ./cache --out sweeps/r --grid reduction=8,16,32 lr=1e-3,3e-3 seed=0,1
    python -m side_train.sweep --cache ./cache --out sweeps/l --configs layers.yaml --epochs 5

Walkthrough: expand the grid (and/or the JSON/YAML file) into configurations, each parsed
exactly as `side_train.run` parses its flags -> one run folder per configuration under
OUT/runs/, with the identity a lone run would write -> load the cache once, for the union
of the layers all configurations read -> group configurations that share a batch stream
(same batch size and seed, since the seed fixes the data order) -> split a group into
passes when its networks do not fit the memory budget -> in each pass, read every batch
once and step each network on it, each with its own optimizer, schedule, dropout RNG,
evaluation and checkpoints (side_train.train.TrainState) -> results.csv/.md, runs.csv
and two plots (metric against trainable parameters and against training memory).
A killed sweep, rerun with the same command, keeps finished runs and resumes the others.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import gc
import io
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.allocator import keep_freed_memory
from shared.backbones import pick_device
from shared.errors import UserError, cli_entry
from side_train import run as solo
from side_train.data import Batch, epoch_batches, iter_batches
from side_train.memory import SavedTensorCounter, account, device_tensors, recompute_bytes
from side_train.model import LadderSideNetwork, SideConfig
from side_train.recipe import (
    backbone_parameters,
    build_side_network,
    choose_tier,
    importance_scores,
    materialize,
    open_sources,
    side_config_for,
    train_config_for,
)
from side_train.train import TrainConfig, TrainState, config_dict, uses_bf16

# run options a sweep fixes for all its configurations (the sweep's own flags or its data)
FIXED_OPTIONS = {"cache", "out", "live", "overwrite", "quiet", "device", "model", "task", "data", "text_fields", "label_field",
                 "label_kind", "max_length", "max_target_length", "limit", "trust_remote_code", "eval_mode", "tier", "reader_workers",
                 "reader"}
SIZE_OPTIONS = ("reduction", "drop_layers", "side_layers")  # what moves a point along the plots' x axes


@dataclass
class Member:
    """One configuration of the sweep and everything needed to train it."""

    name: str
    overrides: dict[str, str]
    args: argparse.Namespace
    side_cfg: SideConfig
    train_cfg: TrainConfig
    run_dir: Path
    identity: dict
    finished: bool = False
    resident_bytes: int = 0  # estimate held for the whole pass: parameters, buffers, AdamW state
    step_bytes: int = 0  # estimate held during its own step only: gradients and saved activations
    seconds: float = 0.0
    state: TrainState | None = field(default=None, repr=False)
    views: dict = field(default_factory=dict, repr=False)


# --- command line and configurations ---------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's own flags, and the rest: `side_train.run` flags shared by every configuration."""
    p = argparse.ArgumentParser(
        prog="python -m side_train.sweep", description=__doc__.split("\n")[0], allow_abbrev=False,
        epilog="Any other flag is a side_train.run flag shared by every configuration (e.g. --epochs 5 --init magnitude).",
    )
    p.add_argument("--cache", required=True, help="cache folder made by backbone_cache.extract")
    p.add_argument("--out", default="sweeps/sweep", help="sweep folder: runs/<name>/ per configuration, results, plots")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="values to cross, e.g. reduction=8,16 lr=1e-3,3e-3")
    p.add_argument("--configs", default=None, help="JSON or YAML file: a list of configurations, or {grid: {...}, configs: [...]}")
    p.add_argument("--max-parallel", type=int, default=0, help="at most N networks per pass (0: as many as the memory allows)")
    p.add_argument("--memory-budget", default=None,
                   help="memory for the networks of one pass, e.g. 8GiB (default: 90%% of free GPU memory, 80%% of available RAM)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="redo configurations whose run folders hold other or finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    args, rest = p.parse_known_args(argv)
    if not args.grid and not args.configs:
        raise UserError("give the configurations with --grid KEY=V1,V2 ... and/or --configs FILE")
    if args.max_parallel < 0:
        raise UserError(f"--max-parallel must be 0 or positive, got {args.max_parallel}")
    args.memory_budget_bytes = parse_bytes(args.memory_budget) if args.memory_budget else None
    return args, rest


def parse_bytes(text: str) -> int:
    """'8GiB', '500MiB', '2GB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise UserError(f"--memory-budget {text!r} is not a size; write e.g. 8GiB or 500MiB")
    unit = (match.group(2) or "").upper().rstrip("I")
    try:
        value = float(match.group(1)) * 1024 ** " KMGT".index(unit or " ")
    except ValueError:
        raise UserError(f"--memory-budget {text!r} is not a size; write e.g. 8GiB or 500MiB") from None
    if value <= 0:
        raise UserError(f"--memory-budget must be positive, got {text!r}")
    return int(value)


def parse_run_flags(argv: list[str], context: str) -> argparse.Namespace:
    """side_train.run's parsing of `argv`; its argparse complaint becomes one line naming `context`."""
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            return solo.parse_args(argv)
    except SystemExit:
        reason = complaint.getvalue().strip().splitlines()[-1:] or ["invalid flags"]
        raise UserError(f"{context}: {reason[0].removeprefix('python -m side_train.run: error: ')}") from None


def parse_shared(args: argparse.Namespace, rest: list[str]) -> argparse.Namespace:
    """The side_train.run flags every configuration shares, parsed and checked by side_train.run."""
    return parse_run_flags(["--cache", args.cache, "--out", str(Path(args.out) / "runs" / "shared-flags"), *rest],
                           "the shared flags (those that are not the sweep's own are side_train.run flags)")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise UserError(f"--grid item {item!r} must look like KEY=V1,V2 (e.g. lr=1e-3,3e-3)")
        if key in grid:
            raise UserError(f"--grid names {key!r} twice; give all its values in one KEY=V1,V2")
        grid[key] = choices
    return grid


def _option_value(key: str, value) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, dict):
        raise UserError(f"configuration value {key}={value!r} must be a number, a string or a list of numbers")
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def load_config_file(path: Path) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """A list of configurations, or {grid: {key: [values]}, configs: [{key: value, name?}]}."""
    if not path.is_file():
        raise UserError(f"--configs {path} is not a file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError("reading a YAML --configs file needs PyYAML (pip install pyyaml), or write it as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"--configs {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--configs {path} is not valid JSON ({err}); YAML files must end in .yaml or .yml") from None
    if isinstance(data, list):
        data = {"configs": data}
    if not isinstance(data, dict) or not set(data) <= {"grid", "configs"} or not data:
        raise UserError(f"--configs {path} must hold a list of configurations, or a mapping with 'grid' and/or 'configs'")
    grid_in = data.get("grid") or {}
    configs_in = data.get("configs") or []
    if not isinstance(grid_in, dict) or not isinstance(configs_in, list) or not all(isinstance(c, dict) for c in configs_in):
        raise UserError(f"--configs {path}: 'grid' must map keys to lists and 'configs' be a list of mappings")
    grid = {}
    for key, values in grid_in.items():
        values = values if isinstance(values, list) else [values]
        grid[key.replace("-", "_")] = [_option_value(key, v) for v in values]
    configs = [{k.replace("-", "_"): (str(v) if k == "name" else _option_value(k, v)) for k, v in c.items()} for c in configs_in]
    return grid, configs


def expand(entries: list[dict[str, str]], grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every entry crossed with every grid point (entries' own values win)."""
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] or [{}]
    return [{**point, **entry} for entry in (entries or [{}]) for point in points]


def member_name(overrides: dict[str, str]) -> str:
    if "name" in overrides:
        name = overrides["name"]
    else:
        name = "_".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)


# --- setting up the members ----------------------------------------------------------------


def make_members(args: argparse.Namespace, rest: list[str], sources, configurations: list[dict[str, str]]) -> list[Member]:
    """Parse each configuration as side_train.run would; compute its identity and run folder."""
    shared = vars(parse_shared(args, rest))
    defaults = vars(parse_shared(args, []))
    known = set(shared)
    info, task = sources.backbone.info().to_json(), sources.spec.to_json()
    members, names = [], set()
    device = pick_device(args.device)
    for overrides in configurations:
        name = member_name(overrides)
        options = {k: v for k, v in overrides.items() if k != "name"}
        for key in options:
            flag = f"--{key.replace('_', '-')}"
            # given literally, or (abbreviated) to a value other than the default
            if any(given == flag or given.startswith(flag + "=") for given in rest) or shared.get(key) != defaults.get(key):
                raise UserError(f"configuration {name}: {key!r} is both in the grid and a shared flag ({flag}); give it in one place")
            if key in FIXED_OPTIONS:
                raise UserError(f"configuration {name}: {key!r} is fixed for the whole sweep; give it once, outside the grid")
            if key not in known:
                raise UserError(f"configuration {name}: {key!r} is not a side_train.run option (see python -m side_train.run --help)")
        if name in names:
            raise UserError(f"two configurations are both named {name!r}; give them distinct 'name' entries")
        names.add(name)
        run_dir = Path(args.out) / "runs" / name
        argv = ["--cache", args.cache, "--out", str(run_dir), *rest, *(["--overwrite"] if args.overwrite else []),
                "--device", args.device]  # no --quiet: members do not print (the sweep does); it is not part of the identity
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", value]
        try:
            member_args = parse_run_flags(argv, f"configuration {name}")
            side_cfg = side_config_for(sources.backbone, sources.spec, member_args)
        except UserError as err:
            message = str(err)
            raise UserError(message if message.startswith("configuration ") else f"configuration {name}: {message}") from None
        if member_args.live:
            raise UserError("a sweep trains from the cache only; drop --live")
        if member_args.eval_mode == "generate":
            raise UserError("--eval generate needs the live backbone; sweeps score candidates (drop --eval generate)")
        train_cfg = train_config_for(member_args, sources.spec)
        try:
            uses_bf16(train_cfg.precision, device)
        except UserError as err:
            raise UserError(f"configuration {name}: {err}") from None
        identity = {"side": side_cfg.to_json(), "train": config_dict(train_cfg, device), "init": member_args.init, "model": info,
                    "task": task, "cache": str(Path(args.cache).resolve()), "mode": "cache"}
        members.append(Member(name, options, member_args, side_cfg, train_cfg, run_dir, identity))
    return members


def check_sweep_folder(out: Path) -> Path:
    """`out` may be new, empty or a sweep folder (sweep.json or runs/); never a file, a cache or a run."""
    solo.check_out_path(out)
    if out.is_dir() and any(out.iterdir()) and not ((out / "sweep.json").is_file() or (out / "runs").is_dir()):
        kind = "a cache" if (out / "manifest.json").is_file() else "a run folder" if (out / "config.json").is_file() else "not a sweep"
        raise UserError(f"--out {out} is a non-empty folder that is {kind}; choose a new or empty folder, or an earlier sweep's")
    return out


def finished_before(member: Member, overwrite: bool) -> bool:
    """The member's run folder holds this very run, finished, and it is not to be redone."""
    same = solo.stored_identity(member.run_dir / "config.json", member.identity) == member.identity
    return same and (member.run_dir / "summary.json").is_file() and not overwrite


def prepare_member(member: Member, overwrite: bool, manifest: dict | None = None) -> None:
    """Finished runs are kept; others get (or keep) their run folder, as side_train.run makes it."""
    config_path = member.run_dir / "config.json"
    if finished_before(member, overwrite):
        member.finished = True
        return
    try:
        solo.prepare_run_dir(member.run_dir, member.identity, overwrite)
    except UserError as err:
        raise UserError(f"configuration {member.name}: {err}") from None
    except PermissionError:
        raise UserError(f"cannot write to {member.run_dir}; choose an --out you can write to") from None
    if not config_path.is_file():
        solo.write_config(config_path, member.identity, member.args, manifest)


# --- one batch stream, many layer subsets ---------------------------------------------------


class LayerView:
    """One member's layers out of a source loaded for the union of all members' layers."""

    def __init__(self, source, enc_index: list[int] | None, dec_index: list[int] | None):
        self.source, self.enc_index, self.dec_index = source, enc_index, dec_index

    def __getattr__(self, name: str):
        return getattr(self.source, name)  # lengths, labels, num_examples, num_candidates ...

    def select(self, batch: Batch) -> Batch:
        """The member's states from a union batch: the same values a lone run reads."""
        def take(states, index):
            return states if states is None or index is None else states[:, :, index]

        if self.enc_index is None and self.dec_index is None:
            return batch
        return dataclasses.replace(batch, enc_states=take(batch.enc_states, self.enc_index),
                                   dec_states=take(batch.dec_states, self.dec_index),
                                   cand_states=take(batch.cand_states, self.dec_index))

    def batch(self, rows: np.ndarray, candidates: bool = False) -> Batch:
        return self.select(self.source.batch(rows, candidates))


def layer_index(union: list[int], layers: list[int]) -> list[int] | None:
    """Positions of [embeddings, *layers] among the union's loaded states; None when all of them."""
    index = [0] + [1 + union.index(i) for i in layers]
    return None if index == list(range(len(union) + 1)) else index


def union_config(members: list[Member]) -> SideConfig:
    enc = sorted({i for m in members for i in m.side_cfg.encoder_layers})
    dec = sorted({i for m in members for i in m.side_cfg.decoder_layers})
    return dataclasses.replace(members[0].side_cfg, encoder_layers=enc, decoder_layers=dec)


# --- memory planning -------------------------------------------------------------------------


def default_budget(device: torch.device) -> int | None:
    """90% of free GPU memory, or 80% of the RAM the OS reports available (None if unknown)."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(0.8 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return None


def estimate_memory(members: list[Member], train_source, lm_head: torch.Tensor | None,
                    device: torch.device | None = None) -> None:
    """Set each member's resident_bytes and step_bytes (float32: an upper bound under bf16 autocast,
    plus, for bf16 on a CPU, the bf16 copy of the LM head each network keeps).

    Parameters, buffers, gradients and AdamW's two moments are counted exactly; the batch
    and what autograd saves (side_train.memory) are measured in one forward on the two
    longest training examples, on the CPU, and scaled to the batch size. A probe runs once
    per distinct shape, on a throwaway network and a forked RNG, so it changes nothing the
    members will draw.
    """
    longest = np.argsort(-np.asarray(train_source.lengths), kind="stable")[:2]
    probes: dict[str, tuple[int, int]] = {}
    for m in members:
        key = json.dumps([m.side_cfg.to_json(), m.train_cfg.batch_size])
        if key not in probes:
            with torch.random.fork_rng(devices=[]):
                model = LadderSideNetwork(m.side_cfg, lm_head).train().set_recompute(m.train_cfg.recompute)
                batch = m.views["train"].batch(longest).to(torch.device("cpu"))
                inputs = [t for t in vars(batch).values() if torch.is_tensor(t)]
                with SavedTensorCounter(exclude=[*device_tensors(model), *inputs]) as counter:
                    model.loss(batch)
                extra = recompute_bytes(model, functools.partial(model.loss, batch), [*device_tensors(model), *inputs])
                probe = account(model, inputs, counter, extra)
                scale = m.train_cfg.batch_size / len(longest)
                probes[key] = (probe.parameter_bytes + probe.optimizer_bytes,
                               probe.gradient_bytes + int((probe.saved_bytes + probe.recompute_bytes + probe.input_bytes) * scale))
                del model, batch, counter
        m.resident_bytes, m.step_bytes = probes[key]
        if lm_head is not None and device is not None and device.type == "cpu" and uses_bf16(m.train_cfg.precision, device):
            m.resident_bytes += lm_head.numel() * 2  # LadderSideNetwork._lm_head_in keeps it on a CPU


def pass_bytes(members: list[Member]) -> int:
    """Networks step one at a time: all resident state, plus the largest single step."""
    return sum(m.resident_bytes for m in members) + max((m.step_bytes for m in members), default=0)


def plan_passes(members: list[Member], budget: int | None, max_parallel: int) -> list[list[Member]]:
    """Greedy: fill a pass while its memory estimate fits the budget and the count limit."""
    passes: list[list[Member]] = []
    current: list[Member] = []
    for m in members:
        fits = budget is None or pass_bytes([*current, m]) <= budget
        room = not max_parallel or len(current) < max_parallel
        if current and not (fits and room):
            passes.append(current)
            current = []
        current.append(m)
    if current:
        passes.append(current)
    return passes


# --- training ---------------------------------------------------------------------------------


def run_pass(members: list[Member], train_source, sources, scores: dict, device: torch.device, label: str, quiet: bool) -> None:
    """Train a pass's members on one shared batch stream (they share batch size and seed)."""
    for m in members:
        model = build_side_network(m.side_cfg, sources.backbone, m.args.init, scores.get(m.args.init), m.args.seed)
        m.state = TrainState(model, train_source.lengths, sources.spec, m.train_cfg, m.run_dir, device, track_memory=True)
        m.state.loss_reads_every = 1  # each member's step is timed: wait for it
        if m.state.resumed and not quiet:
            tqdm.write(f"{m.name}: resuming from step {m.state.progress['step']} (epoch {m.state.progress['epoch']})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch_size, seed = members[0].train_cfg.batch_size, members[0].train_cfg.seed
    remaining = sum(m.state.total_steps - m.state.step_count for m in members)
    bar = tqdm(total=remaining, desc=label, unit="step", disable=quiet, dynamic_ncols=True)
    try:
        first = min(m.state.progress["epoch"] for m in members)
        for epoch in range(first, max(m.train_cfg.epochs for m in members)):
            running = [m for m in members if m.state.trains_in(epoch)]
            if not running:
                continue
            batches = epoch_batches(train_source.lengths, batch_size, seed, epoch)
            starts = {m.name: m.state.first_batch(epoch) for m in running}
            seconds = dict.fromkeys(starts, 0.0)
            t0 = time.perf_counter()
            for index, batch in iter_batches(train_source, batches, min(starts.values())):
                if all(m.state.done for m in running):
                    break
                stepping = [m for m in running if index >= starts[m.name] and not m.state.done]
                if not stepping:
                    t0 = time.perf_counter()
                    continue
                batch = batch.to(device)
                read_share = (time.perf_counter() - t0) / len(stepping)  # waiting for the batch, shared
                for m in stepping:
                    t1 = time.perf_counter()
                    loss = m.state.step(m.views["train"].select(batch), epoch, index, len(batches))
                    seconds[m.name] += time.perf_counter() - t1 + read_share
                    bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", refresh=False)
                t0 = time.perf_counter()
            for m in running:
                t2 = time.perf_counter()
                evals = {s: m.views[s] for s in ("validation", "test") if s in m.views}
                record = m.state.end_epoch(epoch, seconds[m.name], evals)
                m.seconds += seconds[m.name] + time.perf_counter() - t2
                if not quiet:
                    shown = ", ".join(f"{k} {v['score']:.2f}" for k, v in record.items() if isinstance(v, dict))
                    tqdm.write(f"{m.name} epoch {epoch}: {shown}")
    finally:
        bar.close()
        for m in members:
            m.state.close()


def finish_member(m: Member, sources, total_params: int, device: torch.device, tier: str, pass_info: dict) -> dict:
    """side_model/ and summary.json, as side_train.run writes them, plus the sweep's own figures."""
    summary = m.state.summary()
    summary["peak_memory_kind"] += "_whole_sweep_process"
    m.state.model.save_pretrained(m.run_dir / "side_model")
    trainable = m.state.model.trainable_parameters()
    summary.update(trainable_parameters=trainable, backbone_parameters=total_params, trainable_share=trainable / total_params,
                   source=sources.mode, tier=tier, device=str(device), wall_seconds=round(m.seconds, 3),
                   task=sources.spec.name, model=sources.backbone.name)
    if m.state.memory is not None:  # None when a resumed run had no step left
        summary["training_memory_bytes"] = m.state.memory.total_bytes
        summary["training_memory"] = m.state.memory.to_json()
    summary["sweep"] = pass_info
    (m.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def sweep(args: argparse.Namespace, rest: list[str]) -> list[dict]:
    """Everything `main` does; returns the results table's rows, one per configuration (the Python API)."""
    keep_freed_memory()  # the steps' large temporaries reuse memory (shared.allocator)
    start = time.perf_counter()
    device = pick_device(args.device)
    grid = parse_grid(args.grid)
    entries: list[dict[str, str]] = []
    if args.configs:
        file_grid, entries = load_config_file(Path(args.configs))
        overlap = set(file_grid) & set(grid)
        if overlap:
            raise UserError(f"{', '.join(sorted(overlap))} is in both --grid and --configs; give it in one place")
        grid = {**file_grid, **grid}
    configurations = expand(entries, grid)
    base = parse_shared(args, rest)
    if base.live:
        raise UserError("a sweep trains from the cache only; drop --live")
    sources = open_sources(base, torch.device("cpu"))
    if "train" not in sources.splits:
        raise UserError("the cache has no train split; extract it with --splits train,...")
    members = make_members(args, rest, sources, configurations)
    out = check_sweep_folder(Path(args.out))
    # importance scores before any run folder is written: a sweep refused for lack of them leaves nothing behind
    unfinished = [m for m in members if not finished_before(m, args.overwrite)]
    scores = {init: importance_scores(sources, init, args.cache, base.fisher_samples)
              for init in sorted({m.args.init for m in unfinished})}
    out.mkdir(parents=True, exist_ok=True)
    for m in members:
        prepare_member(m, args.overwrite, sources.manifest)
    todo = [m for m in members if not m.finished]
    total_params = backbone_parameters(sources.backbone)
    record = {"cache": str(Path(args.cache).resolve()), "shared_flags": rest, "device": str(device),
              "members": [{"name": m.name, "overrides": m.overrides, "run_dir": str(m.run_dir)} for m in members], "passes": []}
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    say(f"sweep: {len(members)} configurations, {len(members) - len(todo)} already finished, {len(todo)} to train")
    if todo:
        union = union_config(todo)
        tier = choose_tier(sources.manifest, union, device, base.tier)
        data = materialize(sources, union, args.cache, tier, base.reader_workers, device)
        for m in todo:
            enc = layer_index(union.encoder_layers, m.side_cfg.encoder_layers)
            dec = layer_index(union.decoder_layers, m.side_cfg.decoder_layers) if union.decoder_layers else None
            m.views = {split: LayerView(source, enc, dec) for split, source in data.items()}
        lm_head = sources.backbone.lm_head()[0].detach().float().cpu() if union.family == "t5" else None
        estimate_memory(todo, data["train"], lm_head, device)
        budget = args.memory_budget_bytes or default_budget(device)
        groups: dict[tuple[int, int], list[Member]] = {}
        for m in todo:
            groups.setdefault((m.train_cfg.batch_size, m.train_cfg.seed), []).append(m)
        plan = [(key, chunk) for key, group in sorted(groups.items()) for chunk in plan_passes(group, budget, args.max_parallel)]
        say(f"{len(groups)} batch stream(s) (one per batch size and seed), {len(plan)} pass(es) over the data; "
            f"states for layers {union.encoder_layers} in tier {tier}")
        for key, group in sorted(groups.items()):
            chunks = [chunk for k, chunk in plan if k == key]
            if len(chunks) > 1:
                need = pass_bytes(group)
                limit = f"memory budget {budget / 2**20:,.0f} MiB" if budget else "no memory limit"
                cap = f", --max-parallel {args.max_parallel}" if args.max_parallel else ""
                print(f"batch size {key[0]}, seed {key[1]}: {len(group)} networks need about {need / 2**20:,.0f} MiB together "
                      f"({limit}{cap}); running them in {len(chunks)} passes of at most {max(map(len, chunks))}", file=sys.stderr)
        for number, (key, chunk) in enumerate(plan, 1):
            info = {"pass": number, "passes": len(plan), "batch_size": key[0], "seed": key[1],
                    "members": [m.name for m in chunk], "memory_estimate_bytes": pass_bytes(chunk),
                    "memory_budget_bytes": budget}
            record["passes"].append(info)
            (out / "sweep.json").write_text(json.dumps(record, indent=1))
            run_pass(chunk, data["train"], sources, scores, device, f"pass {number}/{len(plan)}", args.quiet)
            for m in chunk:
                finish_member(m, sources, total_params, device, tier, {"folder": str(out), **info})
                m.state = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_results(out, members, sources.spec.metrics)
    record["wall_seconds"] = round(time.perf_counter() - start, 3)
    (out / "sweep.json").write_text(json.dumps(record, indent=1))
    return write_results(out, members, sources.spec.metrics)


# --- results -----------------------------------------------------------------------------------


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def metric_names(metrics: list[str]) -> list[str]:
    return [*metrics, "score"] if len(metrics) > 1 else list(metrics)


def member_rows(members: list[Member], metrics: list[str]) -> list[dict]:
    """One row per finished member, from its summary.json; every option the sweep varies as a column."""
    keys = list(dict.fromkeys(k for m in members for k in m.overrides if k != "seed"))
    rows = []
    for m in members:
        path = m.run_dir / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        options = {k: m.overrides.get(k, str(getattr(m.args, k))) for k in keys}
        best = bool(s.get("validation_best"))
        row = {"name": m.name, "config": "_".join(f"{k}={v}" for k, v in options.items()) or "base", **options,
               "seed": m.train_cfg.seed, "trainable_parameters": s["trainable_parameters"],
               "trainable_share_pct": 100 * s["trainable_share"],
               "training_memory_mib": s["training_memory_bytes"] / 2**20 if s.get("training_memory_bytes") else None,
               "train_seconds": s["train_seconds"], "epochs": s["epochs"], "steps": s["steps"]}
        for name in metric_names(metrics):
            row[f"validation_{name}"] = (s.get("validation_best" if best else "validation_last") or {}).get(name)
            row[f"test_{name}"] = (s.get("test_at_best_validation" if best else "test_last") or {}).get(name)
        rows.append(row)
    return rows


def aggregate(rows: list[dict], metrics: list[str], option_keys: list[str]) -> list[dict]:
    """One row per configuration (options other than the seed): mean and sample standard deviation over seeds."""
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)
    out = []
    for config, group in by_config.items():
        first = group[0]
        agg = {"config": config, **{k: first[k] for k in option_keys}, "seeds": len(group),
               "trainable_parameters": first["trainable_parameters"], "trainable_share_pct": first["trainable_share_pct"],
               "training_memory_mib": _mean([r["training_memory_mib"] for r in group]),
               "train_seconds": float(np.mean([r["train_seconds"] for r in group]))}
        for split in ("validation", "test"):
            for name in metric_names(metrics):
                values = [r[f"{split}_{name}"] for r in group if r.get(f"{split}_{name}") is not None]
                agg[f"{split}_{name}_mean"] = float(np.mean(values)) if values else None
                agg[f"{split}_{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out.append(agg)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(configs: list[dict], metrics: list[str]) -> str:
    def pm(row: dict, key: str) -> str:
        mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
        if mean is None:
            return "-"
        return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"

    names = metric_names(metrics)
    head = ["configuration", "seeds", "trainable params", "share", "training memory", "train time"]
    head += [f"validation {n}" for n in names] + [f"test {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in configs:
        cells = [r["config"], str(r["seeds"]), f"{r['trainable_parameters']:,}", f"{r['trainable_share_pct']:.3f}%",
                 "-" if r["training_memory_mib"] is None else f"{r['training_memory_mib']:,.1f} MiB", f"{r['train_seconds']:,.1f} s"]
        cells += [pm(r, f"validation_{n}") for n in names] + [pm(r, f"test_{n}") for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TABLE_NOTE = ("Mean ± sample standard deviation over seeds (no ± with one seed). Validation: the best epoch; "
              "test: at the best validation epoch. Training memory: parameters, buffers, gradients, AdamW state, the batch "
              "and what autograd saves, in the largest step (side_train.memory). Train time: the network's own steps plus "
              "its share of batch reads.\n\n")


def write_results(out: Path, members: list[Member], metrics: list[str]) -> list[dict]:
    """runs.csv (one row per run), results.csv/.md (one row per configuration), two PNG plots."""
    rows = member_rows(members, metrics)
    if not rows:
        return []
    option_keys = [k for k in rows[0] if k in {k for m in members for k in m.overrides} and k != "seed"]
    configs = aggregate(rows, metrics, option_keys)
    write_csv(out / "runs.csv", rows)
    write_csv(out / "results.csv", configs)
    (out / "results.md").write_text(TABLE_NOTE + markdown_table(configs, metrics))
    plot_results(out, configs, metrics, option_keys)
    return configs


def plot_results(out: Path, configs: list[dict], metrics: list[str], option_keys: list[str]) -> None:
    """metric_vs_parameters.png and metric_vs_memory.png, after the paper's Figures 5 and 6.

    Configurations that differ only in size (reduction, drop_layers, side_layers) form one
    line; every other option that varies starts a new line. Error bars: std over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    key = "score" if len(metrics) > 1 else metrics[0]
    y_label = "test score (mean of the metrics)" if len(metrics) > 1 else f"test {key}"
    varying = [k for k in option_keys if len({str(c[k]) for c in configs}) > 1]
    size_keys = [k for k in varying if k in SIZE_OPTIONS]
    series: dict[str, list[dict]] = {}
    for c in configs:
        series.setdefault(", ".join(f"{k}={c[k]}" for k in varying if k not in SIZE_OPTIONS) or "LST", []).append(c)
    for x_key, x_label, filename, log in (
        ("trainable_share_pct", "trainable parameters (% of the backbone)", "metric_vs_parameters.png", True),
        ("training_memory_mib", "training memory (MiB)", "metric_vs_memory.png", False),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, points in series.items():
            points = sorted((p for p in points if p[f"test_{key}_mean"] is not None and p[x_key] is not None), key=lambda p: p[x_key])
            if not points:
                continue
            xs, ys = [p[x_key] for p in points], [p[f"test_{key}_mean"] for p in points]
            ax.errorbar(xs, ys, yerr=[p[f"test_{key}_std"] or 0.0 for p in points], marker="o", capsize=3, label=name)
            for p, x, y in zip(points, xs, ys, strict=True):
                tag = ", ".join(f"{k}={p[k]}" for k in size_keys) if size_keys else p["config"]
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if log:
            ax.set_xscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.set_title(f"{y_label} vs {x_label.split(' (')[0]}")
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    sweep(args, rest)
    table = Path(args.out) / "results.md"
    if table.is_file():
        print(table.read_text())
    print(f"sweep folder: {args.out} (results.csv, results.md, runs.csv, metric_vs_parameters.png, metric_vs_memory.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
