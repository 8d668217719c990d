"""What the per-step training-memory account (side_train.memory) costs a lone `side_train.run`.

Trains the same side network from one cache with the account on (the default on one process)
and off, alternating in one process (off, on, off, on, ...) so that both see the same machine
load, and reports each arm's seconds per epoch and the ratio of their medians.

    python benchmarks/bench_memory_tracking.py --cache CACHE --repeats 3 [--epochs 1] [-- extra side_train.run flags]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import side_train.runs as runs
    from side_train.run import parse_args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("extra", nargs="*", help="more side_train.run flags (after --)")
    args = p.parse_args(argv)
    real_train_pass = runs.train_pass
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    accounts = []
    tracking = {"on": False}

    def train_pass(*a, track_memory=False, **kw):  # run() passes True on one process; the arm decides here
        return real_train_pass(*a, track_memory=tracking["on"], **kw)

    runs.train_pass = train_pass
    try:
        with tempfile.TemporaryDirectory() as work:
            for repeat in range(args.repeats):
                for arm in ("off", "on"):
                    tracking["on"] = arm == "on"
                    config = parse_args(["--cache", args.cache, "--out", f"{work}/{arm}{repeat}", "--epochs", str(args.epochs),
                                         "--quiet", *args.extra])
                    summary = runs.run(config)
                    seconds[arm].append(summary["seconds_per_epoch"])
                    if arm == "on":
                        accounts.append(summary["training_memory_bytes"])
                    print(f"repeat {repeat} {arm}: {summary['seconds_per_epoch']:.2f} s per epoch", file=sys.stderr, flush=True)
    finally:
        runs.train_pass = real_train_pass
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    print(json.dumps({"seconds_per_epoch": seconds, "median_off": off, "median_on": on, "on_over_off": round(on / off, 4),
                      "training_memory_bytes": accounts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
