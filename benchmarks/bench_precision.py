"""Storage precision benchmark (issue 4): bytes per token per layer, reconstruction error on the
non-outlier channels, and the test accuracy of the same side network trained from each cache.

Real all-MiniLM-L6-v2 on the Rotten Tomatoes split (embedded default), one run:

    python benchmarks/bench_precision.py --limit 4000 --epochs 8 --seeds 0,1,2 --work /tmp/bench_precision
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "/c/" in str(p))


def main() -> None:
    from shared.cache_format import StackReader, read_manifest
    from shared.quantize import choose_outliers, relative_error

    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--work", default="/tmp/bench_precision")
    p.add_argument("--seeds", default="0,1,2", help="side-network seeds per precision (accuracy: mean and spread)")
    args = p.parse_args()
    work = Path(args.work)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    caches = {}
    for precision in ("bf16", "fp8", "int8"):
        cache = work / precision
        subprocess.run([sys.executable, "-m", "backbone_cache.extract", "--out", str(cache), "--limit", str(args.limit),
                        "--init", "magnitude", "--storage", precision, "--quiet"], cwd=REPO, check=True)
        caches[precision] = cache
    reference = caches["bf16"]
    m = read_manifest(reference)
    meta = m["splits"]["train"]["stacks"]["encoder"]
    tokens = sum(s["num_tokens"] * len(s["layers"]) for sp in m["splits"].values() for s in sp["stacks"].values())
    bf16_bits = StackReader(reference, "train", "encoder", meta).read_tokens(0, meta["num_tokens"])
    outliers = choose_outliers(bf16_bits, 4)
    for precision, cache in caches.items():
        row = {"bytes_per_token_layer": disk_bytes(cache) / tokens}
        pm = read_manifest(cache)
        decoded = StackReader(cache, "train", "encoder", pm["splits"]["train"]["stacks"]["encoder"]).read_tokens(0, meta["num_tokens"])
        row["rel_error_non_outlier"] = relative_error(bf16_bits, decoded, exclude=outliers)
        row["rel_error_all"] = relative_error(bf16_bits, decoded)
        last, best = [], []
        for seed in [int(x) for x in args.seeds.split(",")]:
            run_dir = work / f"run-{precision}-seed{seed}"
            subprocess.run([sys.executable, "-m", "side_train.run", "--cache", str(cache), "--out", str(run_dir), "--seed", str(seed),
                            "--epochs", str(args.epochs), "--init", "magnitude", "--quiet", "--overwrite"], cwd=REPO,
                           check=True, capture_output=True, text=True)
            summary = json.loads((run_dir / "summary.json").read_text())
            last.append(summary["test_last"]["accuracy"])
            best.append(summary["test_at_best_validation"]["accuracy"])
        row["test_accuracy_last"] = last
        row["test_accuracy_at_best_validation"] = best
        row["test_accuracy_last_mean"] = float(np.mean(last))
        row["test_accuracy_at_best_validation_mean"] = float(np.mean(best))
        results[precision] = row
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=1, default=lambda x: float(np.asarray(x))))


if __name__ == "__main__":
    main()
