"""Benchmark: Gemma 3 270M on the embedded Rotten Tomatoes split, side by side in one process:

    python benchmarks/bench_gemma.py --model GEMMA_DIR --gguf-file gemma-3-270m-q4_k_m.gguf --cache CACHE --limit 500 \\
        [--epochs 4] [--batch-size 32] [--arms probe,lst-words,lst-last,live-epoch,merge-final,lora,memory] --out OUT

CACHE is `python -m backbone_cache.extract --model GEMMA_DIR --gguf-file ... --limit 500 --init magnitude --out CACHE`
(the first --limit examples of every split). Arms, all on those examples, with equal epochs and batch size:

- probe: the frozen last-token probe: the backbone's final-normed state of each prompt's last
  token (read from the cache: block 17's output, through Gemma's final norm), standardised, and
  an L2-regularised logistic regression (LBFGS; the L2 weight picked on validation).
- lst-words / lst-last: `side_train.run` from the cache (r = 8, magnitude init), label words or
  `--pooling last`.
- live-epoch: one epoch from the cache and one with `--live` (same seed and schedule), their
  epoch seconds and losses side by side.
- merge-final: lst-words with `--merge-final`, where side_train.run has that flag.
- lora: peft LoRA (side_train.compare's: rank 32 on q and v, lr 1e-3, AdamW, 10% warmup) on the
  same backbone with the same label-word scoring as LST (`DecoderTuned`), trained for the same
  epochs (steps = epochs x batches per epoch) and scored on validation and test.

The probe's and LoRA's test predictions are kept in gemma.json, for benchmarks/paired_test.py.

Training memory per arm: side_train.memory's accounting (parameters, gradients, AdamW state,
saved tensors, the batch) of one step at --batch-size on the longest training examples,
counted on the CPU (as side_train.compare does), plus each run's peak RSS where it reports one.
Writes OUT/gemma.json (after every arm), OUT/gemma.md (the table) and OUT/gemma.png.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from side_train import compare as C  # noqa: E402
from side_train import compare_run as R  # noqa: E402

LST_LR: list[str] = []  # ["--lr", X] with --lst-lr


def run_lst(cache: str, out: Path, epochs: int, batch: int, *extra: str) -> dict:
    from side_train.run import parse_args, run

    config = parse_args(["--cache", cache, "--init", "magnitude", "--batch-size", str(batch), "--epochs", str(epochs),
                         "--warmup-steps", "20", "--out", str(out), "--quiet", "--overwrite", *LST_LR, *extra])
    start = time.perf_counter()
    summary = run(config)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary["losses"] = [r["loss"] for r in lines if r["type"] == "train"]
    summary["epoch_seconds"] = [r["epoch_seconds"] for r in lines if r["type"] == "eval"]
    return summary


def cache_template(cache: str) -> list[str]:
    """The cache's --prompt and --label-words flags (none for the task's own template), so that the LoRA and
    memory arms render the prompts the cached states were computed from."""
    task = json.loads((Path(cache) / "manifest.json").read_text())["task"]
    prompt = ["--prompt", task["prompt"]] if task.get("prompt") else []
    return prompt + (["--label-words", ",".join(task["label_words"])] if task.get("label_words") else [])


def compare_config(args, *extra: str):
    limit = ["--limit", str(args.limit)] if args.limit else []
    return C.parse_args(["--model", args.model, *(["--gguf-file", args.gguf_file] if args.gguf_file else []), *limit,
                         *cache_template(args.cache),
                         "--batch-size", str(args.batch_size), "--eval-batch-size", "64", "--device", "cpu", "--init", "magnitude",
                         "--seed", str(args.seed), "--quiet", "--out", str(Path(args.out) / "compare"), *extra])


def accounted_memory(args, method: str, *extra: str) -> dict:
    """side_train.memory's accounting of one training step of `method` (compare's measure_memory)."""
    config = compare_config(args, *extra)
    reference = R.fresh_backbone(config, torch.device("meta"))
    spec, plans = R.task_plans(config, reference)
    prepared = R.prepare(method, config, spec, torch.device("cpu"))
    batch = R.token_inputs(plans["train"], np.arange(args.batch_size), prepared.network_class.train_stacks)
    memory, _ = R.measure_memory(prepared, batch)
    out = memory.to_json()
    out["trainable_parameters"] = sum(p.numel() for p in prepared.module.parameters() if p.requires_grad)
    out["backbone_parameters"] = prepared.backbone_parameters
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.nn.Linear:
    """Two-class logistic regression with an L2 penalty, LBFGS from zeros (convex)."""
    head = torch.nn.Linear(x.shape[1], 2)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def probe(args) -> dict:
    """The frozen last-token probe from the cache's final states."""
    from side_train.families.decoder import DecoderSideNetwork
    from side_train.model import SideOptions
    from side_train.recipe import SourceConfig, data_sources, open_sources

    start = time.perf_counter()
    sources = open_sources(SourceConfig(cache=args.cache), torch.device("cpu"))
    cfg = DecoderSideNetwork.config_for(sources.backbone, sources.spec, SideOptions())
    splits = data_sources(sources, cfg, tier="ram")
    norm = sources.backbone.text_model.norm  # a cache's backbone is loaded on the CPU (config, head, init)
    features, labels = {}, {}
    for split, source in splits.items():
        rows = np.arange(len(source.lengths))
        feats, labs = [], []
        for chunk in np.array_split(rows, max(1, len(rows) // 128)):
            batch = source.batch(chunk)
            states, mask = batch.states["decoder"], batch.masks["decoder"]
            last = mask.sum(1) - 1
            with torch.no_grad():
                feats.append(norm(states[torch.arange(len(states)), last, -1].float()).float())
            labs.append(batch.labels.long())
        features[split], labels[split] = torch.cat(feats), torch.cat(labs)
    mean, std = features["train"].mean(0), features["train"].std(0).clamp(min=1e-6)
    z = {s: (f - mean) / std for s, f in features.items()}
    best = None
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        head = fit_logistic(z["train"], labels["train"], l2)
        with torch.no_grad():
            acc = {s: 100 * float((head(z[s]).argmax(-1) == labels[s]).float().mean()) for s in z}
        if best is None or acc["validation"] > best["validation"]:
            best = {**acc, "l2": l2, "test_predictions": head(z["test"]).argmax(-1).tolist()}  # in the cache's order
    best["seconds"] = round(time.perf_counter() - start, 1)
    best["feature_bytes"] = int(sum(f.numel() * 4 for f in features.values()))
    best["trainable_parameters"] = z["train"].shape[1] * 2 + 2
    return best


def lora(args) -> dict:
    config = compare_config(args, "--methods", "lora")
    reference = R.fresh_backbone(config, torch.device("meta"))
    spec, plans = R.task_plans(config, reference)
    steps = args.epochs * math.ceil(plans["train"].num_examples / args.batch_size)
    config.train_steps = steps
    config.quiet = False
    start = time.perf_counter()
    out = R.train_and_evaluate("lora", config, spec, plans, torch.device("cpu"), reference, ("random", None), keep_predictions=True)
    out["test_ids"] = [ex.example_id for ex in plans["test"].examples]
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    out["steps"] = steps
    out["seconds_per_epoch"] = round(out["train_seconds"] / args.epochs, 1)
    return out


def has_merge_final() -> bool:
    help_text = subprocess.run([sys.executable, "-m", "side_train.run", "--help"], capture_output=True, text=True, cwd=REPO).stdout
    return "--merge-final" in help_text


def table(results: dict, args) -> str:
    gib = 2**30
    lines = ["| arm | trainable | test | validation | training memory (accounted) | peak RSS | s / epoch |", "|---|---|---|---|---|---|---|"]

    def row(name, trainable, test, val, memory, rss, epoch):
        cells = [name, trainable, test, val, memory, rss, epoch]
        lines.append("| " + " | ".join(cells) + " |")

    p = results.get("probe")
    if p:
        row("frozen last-token probe", f"{p['trainable_parameters'] / 1e3:.1f}k", f"{p['test']:.1f}", f"{p['validation']:.1f}",
            f"{p['feature_bytes'] / 2**20:.1f} MiB (features)", "", f"{p['seconds']:.0f} s to fit")
    for key, name in (("lst-words", "LST from the cache, label words"), ("lst-last", "LST from the cache, last-token head"),
                      ("merge-final", "LST from the cache, label words, --merge-final")):
        r = results.get(key)
        if r and "test_last" in r:
            mem = results.get(f"memory-{key}")
            row(name, f"{mem['trainable_parameters'] / 1e6:.2f}M" if mem else "", f"{r['test_last']['score']:.1f}",
                f"{r['validation_last']['score']:.1f}", f"{mem['total_bytes'] / gib:.3f} GiB" if mem else "",
                f"{r['peak_memory_bytes'] / gib:.2f} GiB" if r.get("peak_memory_bytes") else "", f"{r['seconds_per_epoch']:.1f}")
    r = results.get("lora")
    if r:
        mem = results.get("memory-lora")
        row("LoRA (q, v; rank 32)", f"{mem['trainable_parameters'] / 1e6:.2f}M" if mem else "", f"{r['test']['score']:.1f}",
            f"{r['validation']['score']:.1f}", f"{mem['total_bytes'] / gib:.3f} GiB" if mem else "", "", f"{r['seconds_per_epoch']:.1f}")
    for key, name in (("memory-lst-recipe", "LST from the cache, the standardized recipe (accounted only)"),
                      ("memory-lst-recipe-live", "LST live, the standardized recipe (accounted only)")):
        mem = results.get(key)  # the memory arm
        if mem:
            row(name, f"{mem['trainable_parameters'] / 1e6:.2f}M", "", "", f"{mem['total_bytes'] / gib:.3f} GiB", "", "")
    if results.get("memory-lora") and not r:
        mem = results["memory-lora"]
        row("LoRA (q, v; rank 32) (accounted only)", f"{mem['trainable_parameters'] / 1e6:.2f}M", "", "",
            f"{mem['total_bytes'] / gib:.3f} GiB", "", "")
    live = results.get("live-epoch")
    if live:
        mem = results.get("memory-lst-live")
        lines.append(f"\nOne epoch, cached vs live (same seed and schedule): {live['cached']['epoch_seconds'][0]:.1f} s vs "
                     f"{live['live']['epoch_seconds'][0]:.1f} s; largest loss difference over the epoch's "
                     f"{len(live['cached']['losses'])} steps: {live['max_loss_difference']:.2e}; accounted memory of a live step "
                     f"{mem['total_bytes'] / gib:.3f} GiB" if mem else "")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for key, name in (("lst-words", "LST words"), ("lst-last", "LST last-token"), ("merge-final", "LST merge-final")):
        if key in results and f"memory-{key}" in results and "test_last" in results[key]:
            points.append((name, results[f"memory-{key}"]["total_bytes"], results[key]["test_last"]["score"]))
    if "lora" in results and "memory-lora" in results:
        points.append(("LoRA", results["memory-lora"]["total_bytes"], results["lora"]["test"]["score"]))
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, x, y in points:
        ax.scatter([x / 2**30], [y])
        ax.annotate(name, (x / 2**30, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if "probe" in results:
        ax.axhline(results["probe"]["test"], ls="--", color="grey", lw=1)
        ax.text(0.02, results["probe"]["test"], "frozen last-token probe", transform=ax.get_yaxis_transform(), fontsize=8,
                color="grey", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("accounted training memory (GiB, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Gemma 3 270M, Rotten Tomatoes subset")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--cache", required=True)
    p.add_argument("--limit", type=int, default=None, help="the --limit the cache was extracted with (default: none, every example)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="the LoRA arm's seed (its init, dropout and batch order; the LST arms keep side_train.run's seed 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--arms", default="probe,lst-words,lst-last,live-epoch,merge-final,lora")
    p.add_argument("--lst-lr", type=float, default=None, help="side_train.run --lr for the LST arms (default: its default)")
    p.add_argument("--out", default="runs/bench_gemma")
    args = p.parse_args(argv)
    if args.lst_lr:
        LST_LR[:] = ["--lr", str(args.lst_lr)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads((out / "gemma.json").read_text()) if (out / "gemma.json").exists() else {}
    results["settings"] = {k: v for k, v in vars(args).items()}

    def save():
        (out / "gemma.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "gemma.md").write_text(table(results, args) + "\n")

    for arm in args.arms.split(","):
        start = time.perf_counter()
        print(f"--- {arm} ({time.strftime('%H:%M:%S', time.gmtime())} UTC)", file=sys.stderr, flush=True)
        if arm == "probe":
            results["probe"] = probe(args)
        elif arm == "lst-words":
            results["memory-lst-words"] = accounted_memory(args, "lst-cached")
            results["lst-words"] = run_lst(args.cache, out / "lst-words", args.epochs, args.batch_size)
        elif arm == "lst-last":
            results["memory-lst-last"] = accounted_memory(args, "lst-cached", "--pooling", "last")
            results["lst-last"] = run_lst(args.cache, out / "lst-last", args.epochs, args.batch_size, "--pooling", "last")
        elif arm == "live-epoch":
            results["memory-lst-live"] = accounted_memory(args, "lst-live")
            cached = run_lst(args.cache, out / "epoch-cached", 1, args.batch_size)
            live = run_lst(args.cache, out / "epoch-live", 1, args.batch_size, "--live")
            diff = max(abs(a - b) for a, b in zip(cached["losses"], live["losses"], strict=True))
            results["live-epoch"] = {"cached": cached, "live": live, "max_loss_difference": diff}
        elif arm == "merge-final":
            if has_merge_final():
                results["memory-merge-final"] = accounted_memory(args, "lst-cached")
                results["merge-final"] = run_lst(args.cache, out / "merge-final", args.epochs, args.batch_size, "--merge-final")
            else:
                results["merge-final"] = {"not_measured": "side_train.run has no --merge-final flag yet"}
        elif arm == "memory":  # accounting only, no training: the standardized recipe (RESULTS, session 15) and LoRA
            recipe = ("--reduction", "4", "--merge-final", "--standardize-ladders", "--dropout", "0")
            results["memory-lst-recipe"] = accounted_memory(args, "lst-cached", *recipe)
            results["memory-lst-recipe-live"] = accounted_memory(args, "lst-live", *recipe)
            results["memory-lora"] = accounted_memory(args, "lora")
        elif arm == "lora":
            results["memory-lora"] = accounted_memory(args, "lora")
            save()
            results["lora"] = lora(args)
        else:
            raise SystemExit(f"unknown arm {arm!r}")
        print(f"    {arm}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        save()
    plot(results, out / "gemma.png")
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
