"""Wall time of a K = 8 sweep in one pass against one configuration trained alone, side by side.

    python benchmarks/bench_sweep.py --cache ./cache-3k --epochs 2 --threads 1

Runs, as subprocesses, alternately: `side_train.run` alone and `side_train.sweep` with 8
configurations sharing one batch stream (reduction x lr x dropout; same seed and batch
size), --repeats times, then one more lone run, so a drift in machine load shows; the
ratio is of medians. The cache files are read once beforehand (untimed) so no run pays
for a cold page cache. The lone run's configuration is one of the eight, and its
metrics.jsonl must equal the sweep member's.
Without --cache, a MiniLM cache of --limit examples per split is extracted first (not timed).
Prints a Markdown block for benchmarks/RESULTS.md and writes it to OUT/bench_sweep.md.
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
GRID = ["reduction=8,16", "lr=1e-3,3e-3", "dropout=0.1,0.0"]
ALONE = ["--reduction", "8", "--lr", "3e-3", "--dropout", "0.1"]  # = sweep member reduction=8_lr=3e-3_dropout=0.1
MEMBER = "reduction=8_lr=3e-3_dropout=0.1"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"} for line in path.read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=None, help="a MiniLM cache (default: extract one into OUT/cache)")
    p.add_argument("--limit", type=int, default=3000, help="examples per split when extracting")
    p.add_argument("--out", default="/tmp/bench_sweep")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both runs (0: leave as is)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="alone/sweep pairs (then one more alone)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    py = sys.executable
    cache = Path(args.cache) if args.cache else out / "cache"
    if not args.cache and not (cache / "manifest.json").is_file():
        print(f"extracting a MiniLM cache of {args.limit} examples per split into {cache} (not timed)", file=sys.stderr)
        timed([py, "-m", "backbone_cache.extract", "--out", str(cache), "--limit", str(args.limit),
               "--init", "magnitude", "--quiet"], env)
    shared = ["--init", "magnitude", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--quiet",
              "--overwrite", "--device", args.device]
    alone_cmd = [py, "-m", "side_train.run", "--cache", str(cache), "--out", str(out / "alone"), *shared, *ALONE]
    sweep_cmd = [py, "-m", "side_train.sweep", "--cache", str(cache), "--out", str(out / "sweep"), "--grid", *GRID, *shared]
    for path in cache.rglob("*"):  # warm the page cache, untimed
        if path.is_file():
            path.read_bytes()
    rows = []
    schedule = [("alone", alone_cmd), ("sweep", sweep_cmd)] * args.repeats + [("alone", alone_cmd)]
    for label, cmd in schedule:
        before = load()
        seconds = timed(cmd, env)
        rows.append((label, seconds, before, load()))
        print(f"{label}: {seconds:.1f} s (load {before} -> {load()})", file=sys.stderr)
    alone = statistics.median(s for label, s, _, _ in rows if label == "alone")
    swept = statistics.median(s for label, s, _, _ in rows if label == "sweep")
    ratio = swept / alone
    member = out / "sweep" / "runs" / MEMBER
    same = records(member / "metrics.jsonl") == records(out / "alone" / "metrics.jsonl")
    alone_summary = json.loads((out / "alone" / "summary.json").read_text())
    plan = json.loads((out / "sweep" / "sweep.json").read_text())
    member_seconds = [json.loads((Path(m["run_dir"]) / "summary.json").read_text())["train_seconds"] for m in plan["members"]]
    manifest = json.loads((cache / "manifest.json").read_text())
    sizes = {s: v["num_examples"] for s, v in manifest["splits"].items()}
    import torch

    lines = [
        f"### Sweep of K = 8 in one pass vs one configuration alone ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}, device {args.device}; load averages noted per run.",
        f"- Cache: {manifest['model']['name']}, examples per split {sizes}; {args.epochs} epochs, batch size {args.batch_size}, "
        "init magnitude.",
        f"- Sweep grid: {' '.join(GRID)} (one seed, one batch size: one batch stream, {len(plan['passes'])} pass).",
        "- Times are whole-process wall times (`python -m ...`), imports and cache loading included.",
        "",
        "| order | run | wall time | load averages before -> after |",
        "|---|---|---|---|",
        *[f"| {i} | {label} | {seconds:.1f} s | {before} -> {after} |" for i, (label, seconds, before, after) in enumerate(rows, 1)],
        "",
        f"- **Sweep / alone: {ratio:.2f}x** (medians: {swept:.1f} s / {alone:.1f} s; "
        f"8 separate runs would be 8 x {alone:.1f} s = {8 * alone:.0f} s, computed, not run).",
        f"- Inside the processes (last runs): alone, {alone_summary['train_seconds']:.1f} s of training steps and "
        f"{alone_summary['wall_seconds']:.1f} s with evaluation and saving; sweep members, {sum(member_seconds):.1f} s of "
        f"training steps in all ({min(member_seconds):.1f}-{max(member_seconds):.1f} s each), "
        f"{plan['wall_seconds']:.1f} s for the whole sweep.",
        f"- The sweep member {MEMBER} and the lone run wrote {'identical' if same else 'DIFFERENT'} metrics.jsonl "
        "(every loss and evaluation).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "bench_sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
