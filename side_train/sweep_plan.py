"""Planning a sweep: configurations from a grid or a file, one typed RunConfig each, memory and passes.

    configurations (--grid KEY=V1,V2 ..., --configs FILE) -> expand -> one RunConfig per
    configuration (the shared flags, then its own values) -> estimate each network's memory ->
    group by batch stream (batch size and seed fix the data order) -> split a group into passes
    that fit the memory budget.

Running is side_train.sweep_run, reporting side_train.sweep_report.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.errors import UserError
from side_train.memory import SavedTensorCounter, account, device_tensors, recompute_bytes
from side_train.model import parse_layer_list
from side_train.runs import Member, RunConfig
from side_train.train import uses_bf16


@dataclass
class SweepConfig:
    """A sweep (`python -m side_train.sweep` fills it from its flags)."""

    base: RunConfig  # the settings every configuration shares (its source must be a cache)
    out: str = "sweeps/sweep"
    grid: dict[str, list[str]] = field(default_factory=dict)  # key -> values to cross
    configs: list[dict[str, str]] = field(default_factory=list)  # explicit configurations (crossed with the grid)
    max_parallel: int = 0  # at most N networks per pass (0: as many as the memory allows)
    memory_budget: int | None = None  # bytes for one pass's networks (None: from the device)
    overwrite: bool = False
    quiet: bool = False
    shared_flags: list[str] = field(default_factory=list)  # the flags `base` came from (recorded, and checked against the grid)


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return word in ("true", "1", "yes")


def _layers(text: str) -> list[int]:
    return parse_layer_list(text) or []


# a grid key -> (the RunConfig section it sets, its parser); every other run setting is fixed for the sweep
OPTIONS = {
    "reduction": ("side", int), "side_layers": ("side", _layers), "drop_layers": ("side", int), "free_blocks": ("side", int),
    "dropout": ("side", float), "attention_dropout": ("side", float), "pooling": ("side", str), "merge_final": ("side", _bool),
    "standardize_ladders": ("side", _bool),
    "epochs": ("train", int), "max_steps": ("train", int), "batch_size": ("train", int), "eval_batch_size": ("train", int),
    "lr": ("train", float), "warmup_steps": ("train", int), "weight_decay": ("train", float), "clip": ("train", float),
    "seed": ("train", int), "save_every": ("train", int), "recompute": ("train", _bool), "precision": ("train", str),
    "init": ("run", str), "fisher_samples": ("run", int),
}
FIXED = {"cache", "out", "live", "overwrite", "quiet", "device", "model", "revision", "gguf_file", "trust_remote_code", "task", "data",
         "text_fields", "label_field", "label_kind", "max_length", "max_target_length", "limit", "prompt", "label_words", "eval_mode",
         "tier", "reader"}
SIZE_OPTIONS = ("reduction", "drop_layers", "side_layers", "free_blocks")  # what moves a point along the plots' x axes


def option_value(config: RunConfig, key: str):
    """A grid key's value in a RunConfig."""
    section = OPTIONS[key][0]
    holder = config if section == "run" else getattr(config, section)
    return getattr(holder, key)


def with_options(base: RunConfig, options: dict[str, str], context: str) -> RunConfig:
    """`base` with a configuration's values (strings, parsed as their setting's type)."""
    sections: dict[str, dict] = {"run": {}, "side": {}, "train": {}}
    for key, text in options.items():
        if key in FIXED:
            raise UserError(f"{context}: {key!r} is fixed for the whole sweep; give it once, outside the grid")
        if key not in OPTIONS:
            raise UserError(f"{context}: {key!r} is not a setting a sweep can vary (one of {', '.join(OPTIONS)})")
        section, parse = OPTIONS[key]
        try:
            sections[section][key] = parse(text)
        except ValueError:
            raise UserError(f"{context}: {key}={text!r} is not a valid {parse.__name__.strip('_')}") from None
    config = dataclasses.replace(base, side=dataclasses.replace(base.side, **sections["side"]),
                                 train=dataclasses.replace(base.train, **sections["train"]), **sections["run"])
    try:
        config.check()
    except UserError as err:
        raise UserError(f"{context}: {err}") from None
    return config


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
    if isinstance(value, bool):  # YAML's and JSON's true / false (merge_final, recompute)
        return "true" if value else "false"
    if value is None or isinstance(value, dict):
        raise UserError(f"configuration value {key}={value!r} must be a number, a string, a boolean or a list of numbers")
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
    """Every entry crossed with every grid point (entries' own values win).

    A named entry's name gains the grid values it does not set itself (`top` -> `top_lr=1e-3`),
    so that its grid points get distinct run folders."""
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] or [{}]
    members = []
    for entry in entries or [{}]:
        for point in points:
            member = {**point, **entry}
            tags = [f"{k}={v}" for k, v in point.items() if k not in entry]
            if "name" in entry and tags:
                member["name"] = "_".join([entry["name"], *tags])
            members.append(member)
    return members


def member_name(overrides: dict[str, str]) -> str:
    if "name" in overrides:
        name = overrides["name"]
    else:
        name = "_".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)


def check_grid_against_shared(options: dict[str, str], shared_flags: list[str], name: str) -> None:
    """A key both in a configuration and among the shared flags is ambiguous; say where to give it."""
    for key in options:
        flag = f"--{key.replace('_', '-')}"
        if any(given == flag or given.startswith(flag + "=") for given in shared_flags):
            raise UserError(f"configuration {name}: {key!r} is both in the grid and a shared flag ({flag}); give it in one place")


def member_configs(config: SweepConfig) -> list[tuple[str, dict[str, str], RunConfig]]:
    """(name, overrides, RunConfig) of every configuration, each in OUT/runs/<name>."""
    out, names = [], set()
    for overrides in expand(config.configs, config.grid):
        name = member_name(overrides)
        options = {k: v for k, v in overrides.items() if k != "name"}
        if name in names:
            raise UserError(f"two configurations are both named {name!r}; give them distinct 'name' entries")
        names.add(name)
        check_grid_against_shared(options, config.shared_flags, name)
        run_config = with_options(config.base, options, f"configuration {name}")
        run_config = dataclasses.replace(run_config, out=str(Path(config.out) / "runs" / name), overwrite=config.overwrite)
        out.append((name, options, run_config))
    return out


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


def estimate_memory(members: list[Member], train_views: dict, lm_head: torch.Tensor | None, device: torch.device | None = None) -> None:
    """Set each member's resident_bytes and step_bytes (float32: an upper bound under bf16 autocast,
    plus, for bf16 on a CPU, the bf16 copy of a frozen LM head each network keeps).

    Parameters, buffers, gradients and AdamW's two moments are counted exactly; the batch
    and what autograd saves (side_train.memory) are measured in one forward on the two
    longest training examples, on the CPU, and scaled to the batch size. A probe runs once
    per distinct shape, on a throwaway network and a forked RNG, so it changes nothing the
    members will draw.
    """
    from side_train.families import side_family

    probes: dict[str, tuple[int, int, int]] = {}
    for m in members:
        key = json.dumps([m.side_cfg.to_json(), m.train_cfg.batch_size, m.train_cfg.recompute])
        if key not in probes:
            view = train_views[m.name]
            longest = np.argsort(-np.asarray(view.lengths), kind="stable")[:2]
            network_class = side_family(m.side_cfg.family)
            with torch.random.fork_rng(devices=[]):
                model = (network_class(m.side_cfg, lm_head) if network_class.needs_lm_head else network_class(m.side_cfg))
                model.train().set_recompute(m.train_cfg.recompute)
                batch = view.batch(longest).to(torch.device("cpu"))
                inputs = batch.tensors()
                with SavedTensorCounter(exclude=[*device_tensors(model), *inputs]) as counter:
                    model.loss(batch)
                extra = recompute_bytes(model, functools.partial(model.loss, batch), [*device_tensors(model), *inputs])
                probe = account(model, inputs, counter, extra)
                scale = m.train_cfg.batch_size / len(longest)
                bf16_head = model.frozen_bytes_on_cpu(True)
                probes[key] = (probe.parameter_bytes + probe.optimizer_bytes,
                               probe.gradient_bytes + int((probe.saved_bytes + probe.recompute_bytes + probe.input_bytes) * scale),
                               bf16_head)
                del model, batch, counter
        m.resident_bytes, m.step_bytes, bf16_head = probes[key]
        if device is not None and device.type == "cpu" and uses_bf16(m.train_cfg.precision, device):
            m.resident_bytes += bf16_head


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


