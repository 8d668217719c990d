"""Issue 3 benchmark on the real all-MiniLM-L6-v2 and the Rotten Tomatoes split, one run:

- LST trained from the cache with Fisher, magnitude and random init (paper Fig. 7);
- the frozen-feature linear probe (mean-pooled last layer, logistic regression);
- one epoch of cached against one epoch of live training, side by side.

    python benchmarks/bench_minilm.py --limit 3000 --epochs 10 --work /tmp/bench_minilm
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
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(cache: Path, out: Path, *extra: str) -> dict:
    subprocess.run([sys.executable, "-m", "side_train.run", "--cache", str(cache), "--out", str(out), "--quiet", "--overwrite", *extra],
                   cwd=REPO, check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())


def linear_probe(cache: Path) -> float:
    """Logistic regression on the frozen, mean-pooled last layer (the 0.730 reference point's method)."""
    from sklearn.linear_model import LogisticRegression

    from shared.cache_format import StackReader, read_examples, read_manifest

    manifest = read_manifest(cache)
    features = {}
    for split in ("train", "test"):
        stack = manifest["primary_stack"]
        reader = StackReader(cache, split, stack, manifest["splits"][split]["stacks"][stack])
        last = reader.layers.index(max(reader.layers))
        states = torch.from_numpy(reader.read_tokens(0, int(reader.offsets[-1]), slice(last, last + 1)).view(np.int16))
        states = states.view(torch.bfloat16).float()[:, 0]
        sums = torch.zeros(reader.num_sequences, states.shape[1]).index_add_(
            0, torch.repeat_interleave(torch.arange(reader.num_sequences), torch.from_numpy(reader.lengths())), states)
        labels = read_examples(cache, split).column("label").to_numpy()
        features[split] = ((sums / torch.from_numpy(reader.lengths())[:, None]).numpy(), labels)
    probe = LogisticRegression(max_iter=2000).fit(*features["train"])
    return float((probe.predict(features["test"][0]) == features["test"][1]).mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=None, help="first N examples per split (default: all 12,808)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--fisher-samples", type=int, default=1024)
    p.add_argument("--work", default="/tmp/bench_minilm")
    args = p.parse_args()
    work = Path(args.work)
    cache = work / "cache"
    limit = ["--limit", str(args.limit)] if args.limit else []
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "load_before": os.getloadavg(),
               "limit": args.limit, "epochs": args.epochs}
    subprocess.run([sys.executable, "-m", "backbone_cache.extract", "--out", str(cache), *limit, "--fisher-samples",
                    str(args.fisher_samples), "--quiet"], cwd=REPO, check=True)
    results["linear_probe_test_accuracy"] = 100 * linear_probe(cache)
    for init in ("fisher", "magnitude", "random"):
        s = run(cache, work / f"lst-{init}", "--epochs", str(args.epochs), "--init", init)
        results[f"lst_{init}"] = {"test_last": s["test_last"]["accuracy"], "test_at_best_validation": s["test_at_best_validation"]["accuracy"],
                                  "trainable_share_%": 100 * s["trainable_share"], "seconds_per_epoch": s["seconds_per_epoch"]}
    cached = run(cache, work / "epoch-cached", "--epochs", "1", "--init", "magnitude")
    live = run(cache, work / "epoch-live", "--epochs", "1", "--init", "magnitude", "--live")
    results["epoch_seconds_cached"] = cached["seconds_per_epoch"]
    results["epoch_seconds_live"] = live["seconds_per_epoch"]
    results["live_over_cached"] = live["seconds_per_epoch"] / cached["seconds_per_epoch"]
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
