"""Running a sweep: every configuration trained from one cache, in passes over shared batch streams.

Walkthrough: the configurations (side_train.sweep_plan) -> one run folder per configuration
under OUT/runs/, with the identity a lone run would write -> load the cache once, for the union
of the layers all configurations read -> group configurations that share a batch stream
(same batch size and seed) -> split a group into passes that fit the memory budget -> each
pass goes through side_train.runs.train_pass, the loop a lone run uses -> results tables and
plots (side_train.sweep_report). A killed sweep, rerun with the same command, keeps finished
runs and resumes the others.

Under torchrun the configurations left to train are dealt to the ranks in turn (each rank
trains its own, on cuda:LOCAL_RANK beside GPUs, with no gradient sync between them); rank 0
prepares the run folders, and writes sweep.json and the one results table once every rank is
done. Each member's numbers are those it gets in a one-process sweep.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from shared.allocator import keep_freed_memory
from shared.distributed import all_gather_objects, barrier, broadcast_object, local_world_size, patient_group
from shared.errors import UserError
from side_train.data import LayerView
from side_train.recipe import backbone_parameters, choose_tier, data_sources, importance_scores, open_sources
from side_train.runs import (
    cache_name,
    check_out_path,
    finish_member,
    finished_before,
    job_device,
    make_member,
    on_rank_zero,
    positions_in,
    prepare_run_dir,
    release,
    train_pass,
    union_config,
    write_config,
)
from side_train.sweep_plan import SweepConfig, default_budget, estimate_memory, member_configs, pass_bytes, plan_passes
from side_train.sweep_report import write_results


def check_sweep_folder(out: Path) -> Path:
    """`out` may be new, empty or a sweep folder (sweep.json or runs/); never a file, a cache or a run."""
    check_out_path(out)
    if out.is_dir() and any(out.iterdir()) and not ((out / "sweep.json").is_file() or (out / "runs").is_dir()):
        kind = "a cache" if (out / "manifest.json").is_file() else "a run folder" if (out / "config.json").is_file() else "not a sweep"
        raise UserError(f"--out {out} is a non-empty folder that is {kind}; choose a new or empty folder, or an earlier sweep's")
    return out


def sweep(config: SweepConfig) -> list[dict]:
    """Train every configuration; returns the results table's rows, one per configuration (the Python API)."""
    keep_freed_memory()  # the steps' large temporaries reuse memory (shared.allocator)
    start = time.perf_counter()
    base = config.base
    if base.source.mode != "cache":
        raise UserError("a sweep trains from the cache only; drop --live")
    if base.train.eval_mode == "generate":
        raise UserError("--eval generate needs the live backbone; sweeps score candidates (drop --eval generate)")
    device, ranks = job_device(base.source.device)
    patient = patient_group()  # the final wait lasts as long as the slowest rank's members
    sources = open_sources(base.source, torch.device("cpu"))
    if "train" not in sources.splits:
        raise UserError("the cache has no train split; extract it with --splits train,...")
    members = [make_member(name, run_config, sources, device, overrides) for name, overrides, run_config in member_configs(config)]
    out = check_sweep_folder(Path(config.out))
    # importance scores before any run folder is written: a sweep refused for lack of them leaves nothing behind
    finished = broadcast_object([m.name for m in members if finished_before(m)] if ranks.is_main else None)
    unfinished = [m for m in members if m.name not in finished]
    scores = {init: importance_scores(sources, init, base.fisher_samples) for init in sorted({m.config.init for m in unfinished})}

    def prepare() -> None:
        out.mkdir(parents=True, exist_ok=True)
        for m in unfinished:
            try:
                prepare_run_dir(m)
            except UserError as err:
                raise UserError(f"configuration {m.name}: {err}") from None
            if not (m.run_dir / "config.json").is_file():
                write_config(m, sources)

    on_rank_zero(prepare, ranks)
    for m in members:
        m.finished = m.name in finished
    todo = [m for m in members if not m.finished][ranks.rank :: ranks.world_size]  # this rank's share
    total_params = backbone_parameters(sources.backbone)
    record = {"cache": cache_name(sources.cache), "shared_flags": config.shared_flags, "device": str(device),
              "members": [{"name": m.name, "overrides": m.overrides, "run_dir": str(m.run_dir)} for m in members], "passes": []}
    if ranks.distributed:
        record["world_size"] = ranks.world_size
    quiet = config.quiet or not ranks.is_main  # rank 0 shows its progress; every rank trains
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr))
    spread = f"; {ranks.world_size} ranks, this one trains {len(todo)}" if ranks.distributed else ""
    say(f"sweep: {len(members)} configurations, {len(finished)} already finished, {len(members) - len(finished)} to train{spread}")
    if todo:
        union = union_config(todo)
        tier = choose_tier(sources.manifest, union, device, base.source.tier)
        data = data_sources(sources, union, tier, base.source.reader, device)
        views = {m.name: LayerView(data["train"], positions_in(union, m.side_cfg)) for m in todo}
        head = sources.backbone.lm_head()
        estimate_memory(todo, views, head[0].detach().float().cpu() if head is not None else None, device)
        budget = config.memory_budget or default_budget(device)
        if budget and device.type == "cpu":
            budget //= local_world_size()  # the node's ranks share its RAM
        groups: dict[tuple[int, int], list] = {}
        for m in todo:
            groups.setdefault((m.train_cfg.batch_size, m.train_cfg.seed), []).append(m)
        plan = [(key, chunk) for key, group in sorted(groups.items()) for chunk in plan_passes(group, budget, config.max_parallel)]
        say(f"{len(groups)} batch stream(s) (one per batch size and seed), {len(plan)} pass(es) over the data; "
            f"states for layers {union.stack_layers()} in tier {tier}")
        for key, group in sorted(groups.items()):
            chunks = [chunk for k, chunk in plan if k == key]
            if len(chunks) > 1 and ranks.is_main:
                limit = f"memory budget {budget / 2**20:,.0f} MiB" if budget else "no memory limit"
                cap = f", --max-parallel {config.max_parallel}" if config.max_parallel else ""
                print(f"batch size {key[0]}, seed {key[1]}: {len(group)} networks need about {pass_bytes(group) / 2**20:,.0f} MiB "
                      f"together ({limit}{cap}); running them in {len(chunks)} passes of at most {max(map(len, chunks))}",
                      file=sys.stderr)
        for number, (key, chunk) in enumerate(plan, 1):
            info = {"pass": number, "passes": len(plan), "batch_size": key[0], "seed": key[1],
                    "members": [m.name for m in chunk], "memory_estimate_bytes": pass_bytes(chunk), "memory_budget_bytes": budget}
            if ranks.distributed:
                info["rank"] = ranks.rank
            record["passes"].append(info)
            if ranks.is_main:
                (out / "sweep.json").write_text(json.dumps(record, indent=1))
            train_pass(chunk, sources, data, union, scores, device, f"pass {number}/{len(plan)}", quiet,
                       track_memory=True, last_pass=number == len(plan))
            for m in chunk:
                finish_member(m, sources, total_params, device, tier, {"folder": str(out), **info})
            release(device)
            if ranks.is_main:
                write_results(out, members, sources.spec.metrics)
    if ranks.distributed:  # wait for every rank's members, however long they take
        record["passes"] = [p for part in all_gather_objects(record["passes"], patient) for p in part]
    record["wall_seconds"] = round(time.perf_counter() - start, 3)
    rows = None
    if ranks.is_main:
        (out / "sweep.json").write_text(json.dumps(record, indent=1))
        rows = write_results(out, members, sources.spec.metrics)
    if ranks.distributed:
        rows = broadcast_object(rows)
        barrier()
    return rows
