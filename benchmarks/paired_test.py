"""Paired comparison on one cached test split: which examples each method gets right, and an exact
McNemar test on the examples where exactly one of two methods is right.

    python benchmarks/paired_test.py --cache CACHE --bench OUT/gemma.json --run NAME=RUN_DIR [--run ...] [--out paired.md]

- LST runs (`--run`, side_train.run or side_train.sweep run folders): their best-validation side
  model's predictions for the cache's test split (`side_train.predict`'s, no backbone).
- The frozen probe and LoRA: the test predictions bench_gemma.py keeps in gemma.json, where it ran
  those arms (the probe in the cache's order, LoRA with its example ids, checked against the cache's).

Each method's test accuracy, then a row for every pair (each run against the probe and against
LoRA, and LoRA against the probe):
both accuracies, A right and B wrong, B right and A wrong, and the two-sided exact binomial p-value
of the split of those discordant examples (McNemar's exact test).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def mcnemar_exact(a_right: np.ndarray, b_right: np.ndarray) -> tuple[int, int, float]:
    """(A right and B wrong, B right and A wrong, two-sided exact p under 'either is as likely')."""
    only_a = int((a_right & ~b_right).sum())
    only_b = int((~a_right & b_right).sum())
    n = only_a + only_b
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


def run_predictions(run: Path, cache: Path, label_names: list[str]) -> np.ndarray:
    from side_train.predict import Predictor

    rows = Predictor.from_run(run, "cpu", best=True).predict_cache(cache, "test")
    return np.array([label_names.index(r["prediction"]) for r in rows])


def main(argv: list[str] | None = None) -> int:
    from shared.cache_format import open_complete, read_examples

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--bench", type=Path, default=None, help="bench_gemma.py's gemma.json (probe and LoRA predictions)")
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR of an LST run (repeat)")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)

    manifest = open_complete(args.cache)
    examples = read_examples(args.cache, "test")
    ids = examples.column("example_id").to_pylist()
    labels = np.asarray(examples.column("label").to_numpy()).astype(int)
    label_names = list(manifest["task"]["label_names"])
    predictions: dict[str, np.ndarray] = {}
    bench = json.loads(args.bench.read_text()) if args.bench else {}
    if "test_predictions" in bench.get("probe", {}):
        predictions["probe"] = np.asarray(bench["probe"]["test_predictions"])
    if "predictions" in bench.get("lora", {}).get("test", {}):
        if bench["lora"]["test_ids"] != ids:
            raise SystemExit(f"error: {args.bench}'s LoRA test examples are not {args.cache}'s; run bench_gemma.py with "
                             "the --limit the cache was extracted with")
        predictions["LoRA"] = np.asarray(bench["lora"]["test"]["predictions"]).astype(int)
    for item in args.run:
        name, _, folder = ("", "", item) if Path(item).exists() else item.partition("=")  # run folders' names hold "="
        predictions[name or Path(folder).name] = run_predictions(Path(folder), args.cache, label_names)
    for name, values in predictions.items():
        if values.shape != labels.shape:
            raise SystemExit(f"error: {name} has {len(values)} test predictions, the cache {len(labels)}")

    right = {name: values == labels for name, values in predictions.items()}
    baselines = [b for b in ("probe", "LoRA") if b in right]
    pairs = [(a, b) for a in right if a not in baselines for b in baselines]
    if "LoRA" in right and "probe" in right:
        pairs.append(("LoRA", "probe"))
    lines = [f"Test split: {len(labels)} examples of {args.cache}.", "", "| method | test accuracy |", "|---|---|"]
    lines += [f"| {name} | {100 * r.mean():.2f} |" for name, r in right.items()]
    lines += ["", "| A | B | A accuracy | B accuracy | A right, B wrong | B right, A wrong | exact McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        only_a, only_b, p_value = mcnemar_exact(right[a], right[b])
        lines.append(f"| {a} | {b} | {100 * right[a].mean():.2f} | {100 * right[b].mean():.2f} | {only_a} | {only_b} | {p_value:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
