"""Data-parallel training step time (issue 17): 1 process x T threads against N processes x 1 thread.

torchrun gives each worker OMP_NUM_THREADS=1, so on this CPU the fair comparison for N ranks
is one process with N intra-op threads on the same global batch: both use N cores. Each
configuration trains the same steps from the same cache (RAM tier, dropout 0); the step time
is the summary's train_seconds / steps (training only: evaluation and start-up excluded).
Rounds alternate the configurations, and the median per configuration is reported.

    flock /tmp/bench.lock python benchmarks/bench_ddp.py --work /tmp/bench_ddp --examples 400 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def extract(work: Path, examples: int) -> Path:
    """The embedded MiniLM on SST-2 (the default data): `examples` per split."""
    cache = work / "cache"
    if not (cache / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "backbone_cache.extract", "--out", str(cache), "--limit", str(examples),
                        "--batch-size", "32", "--init", "magnitude", "--quiet"], cwd=REPO, check=True)
    return cache


def train(cache: Path, out: Path, procs: int, threads: int, batch: int, epochs: int, tier: str) -> dict:
    """One run; returns its summary (batch: the global batch, split over `procs` ranks)."""
    flags = ["--cache", str(cache), "--out", str(out), "--overwrite", "--quiet", "--init", "magnitude", "--dropout", "0",
             "--epochs", str(epochs), "--warmup-steps", "5", "--batch-size", str(batch // procs), "--tier", tier]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd = [sys.executable, "-m", "side_train.run", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "side_train.run", *flags]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    summary["launch_wall_seconds"] = wall
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bench_ddp")
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tier", default="ram", choices=["ram", "disk"])
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = extract(work, args.examples)
    configs = {f"1 proc x {args.procs} threads": (1, args.procs), f"{args.procs} procs x 1 thread": (args.procs, 1),
               "1 proc x 1 thread": (1, 1)}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (procs, threads) in configs.items():
            results[name].append(train(cache, work / "run", procs, threads, args.batch, args.epochs, args.tier))
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "examples": args.examples,
              "global_batch": args.batch, "epochs": args.epochs, "tier": args.tier, "rounds": args.rounds, "configs": {}}
    base = None
    for name, runs in results.items():
        step_ms = [1000 * r["train_seconds"] / r["steps"] for r in runs]
        median = statistics.median(step_ms)
        base = base or median
        report["configs"][name] = {"step_ms_median": round(median, 2), "step_ms": [round(x, 2) for x in step_ms],
                                   "steps": runs[0]["steps"], "vs_first": round(median / base, 3),
                                   "launch_wall_s_median": round(statistics.median(r["launch_wall_seconds"] for r in runs), 1),
                                   "test_last": runs[-1].get("test_last")}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
