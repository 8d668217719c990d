"""Streaming benchmark (issue 4), one run, side by side on one machine.

1. one training epoch from the cache streamed from disk (a reader process, a reader thread,
   and inline reads between steps) vs the same epoch with every ladder state already in
   memory (the I/O overhead; target <= 1.15x);
2. a cached epoch vs a live epoch of the same side network on a T5-base-shaped backbone
   (random weights: the arithmetic of T5-base; target >= 10x on CPU);
3. reader throughput (a whole epoch of pools) vs a raw memmap read of the same bytes;
4. the arithmetic behind 2: FLOPs of the live backbone per batch and of one side step;
5. with --bf16: 1 and 2 again with the side step in bf16 autocast (`--precision bf16`).

With --codecs A,B,...: only 1 and 3, once per extraction codec (a cache each), rounds interleaved.

    python benchmarks/bench_stream.py --examples 600 --work /tmp/bench_stream
    python benchmarks/bench_stream.py --examples 2000 --work /tmp/bench_stream --codecs zstd1,blosc-lz4 --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True)


TRAIN_ARGS: list[str] = []  # --train-args, --device and --drop-layers
SHAPES = {"t5-base": {"d_model": 768, "layers": 12, "heads": 12, "d_ff": 3072},
          "t5-large": {"d_model": 1024, "layers": 24, "heads": 16, "d_ff": 4096}}


def epoch_seconds(cache: Path, out: Path, *extra: str) -> float:
    from side_train.run import parse_args, run

    summary = run(parse_args(["--cache", str(cache), "--out", str(out), "--epochs", "1", "--init", "magnitude",
                              "--quiet", "--overwrite", *TRAIN_ARGS, *extra]))
    return summary["seconds_per_epoch"]


def reader_throughput(cache: Path, work: Path) -> dict:
    """GB/s of bf16 states: our pool reader over one epoch vs np.memmap over the same bytes."""
    from bench_reader import epoch_of_pools

    ours, _, nbytes = epoch_of_pools(cache, direct=True)
    raw = work / "raw.bin"
    np.random.default_rng(0).integers(0, 2**16, nbytes // 2, dtype=np.uint16).tofile(raw)
    subprocess.run(["cat", str(raw)], stdout=subprocess.DEVNULL, check=True)  # page cache, like the warm zarr files
    t0 = time.perf_counter()
    mm = np.memmap(raw, dtype=np.uint16, mode="r")
    out = torch.empty(len(mm), dtype=torch.int16)
    out.numpy().view(np.uint16)[:] = mm
    limit = time.perf_counter() - t0
    raw.unlink()
    return {"bytes": int(nbytes), "reader_s": ours, "memmap_s": limit, "reader_GBps": nbytes / ours / 1e9,
            "memmap_GBps": nbytes / limit / 1e9}


def arithmetic(cache: Path, batches: int = 3) -> dict:
    """Matrix-product FLOPs (torch's FlopCounterMode) per training batch, over the first batches
    of epoch 0: the live backbone's forward (what caching removes) and one side-network step
    (forward and backward, what remains). 1 + backbone / side is the cached-vs-live ratio a
    side step would reach if it ran at the backbone's FLOP rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from side_train.data import epoch_batches
    from side_train.recipe import build_side_network, materialize, open_sources, side_config_for
    from side_train.run import parse_args

    args = parse_args(["--cache", str(cache), "--live", "--out", str(cache.parent / "flops"), "--init", "random", *TRAIN_ARGS])
    device = torch.device(args.device if args.device != "auto" else "cpu")
    sources = open_sources(args, device, splits=("train",))
    cfg = side_config_for(sources.backbone, sources.spec, args)
    model = build_side_network(cfg, sources.backbone, "random", None, 0).to(device).train()
    live = materialize(sources, cfg, None, "live", 0, device)["train"]
    plan = epoch_batches(live.lengths, 100, 0, 0)
    backbone_flops = side_flops = 0
    for rows in plan[:batches]:
        with FlopCounterMode(display=False) as counter:
            batch = live.batch(rows)
        backbone_flops += counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.loss(batch.to(device)).backward()
        side_flops += counter.get_total_flops()
    return {"backbone_gflop_per_batch": backbone_flops / batches / 1e9, "side_step_gflop_per_batch": side_flops / batches / 1e9,
            "ideal_live_over_cached": 1 + backbone_flops / side_flops}


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def codec_comparison(args: argparse.Namespace, model: Path, data: list[str]) -> dict:
    """The I/O overhead (disk with a reader thread / RAM) and the reader's throughput for one
    cache per codec, the epochs interleaved round by round."""
    codecs = [c for c in args.codecs.split(",") if c]
    work = Path(args.work)
    precision = ["--precision", "bf16"] if args.bf16 else []
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_before": os.getloadavg(), "examples": args.examples, "pack": args.pack, "shape": args.shape,
               "side_step": "bf16" if args.bf16 else "float32", "rounds": args.rounds}
    caches = {}
    for codec in codecs:
        caches[codec] = work / f"cache-{codec}"
        sh("backbone_cache.extract", "--model", str(model), "--out", str(caches[codec]), "--limit", str(args.examples),
           "--splits", "train,validation", "--init", "random", "--quiet", "--device", args.device, "--codec", codec, *data)
        results[f"{codec}_train_hidden_bytes"] = disk_bytes(caches[codec] / "train" / "encoder" / "hidden")
    for r in range(args.rounds):
        results[f"ram_{r}"] = epoch_seconds(caches[codecs[0]], work / "ram", "--tier", "ram", *precision)
        for codec in codecs:
            for mode in ("thread", "inline"):
                results[f"{codec}_disk_{mode}_{r}"] = epoch_seconds(caches[codec], work / "disk0", "--tier", "disk",
                                                                    "--reader", mode, *precision)
    ram = min(results[f"ram_{r}"] for r in range(args.rounds))
    for codec in codecs:
        throughput = reader_throughput(caches[codec], work)
        results.update({f"{codec}_{k}": v for k, v in throughput.items()})
        for mode in ("thread", "inline"):
            disk = min(results[f"{codec}_disk_{mode}_{r}"] for r in range(args.rounds))
            results[f"{codec}_ratio_disk_{mode}_over_ram"] = disk / ram
    results["load_after"] = os.getloadavg()
    return results


def packed_data(work: Path, pack: int) -> list[str]:
    """Local jsonl files whose examples are `pack` consecutive snippets joined (label of the first)."""
    from shared.tasks import load_default

    _, splits = load_default()
    flags = []
    for split in ("train", "validation"):
        rows = splits[split]
        path = work / f"{split}-pack{pack}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for i in range(0, len(rows) - pack + 1, pack):
                text = " ".join(r.texts[0] for r in rows[i:i + pack])
                handle.write(json.dumps({"text": text, "label": rows[i].label}) + "\n")
        flags += ["--data", f"{split}={path}"]
    return [*flags, "--text-fields", "text", "--label-field", "label"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--work", default="/tmp/bench_stream")
    p.add_argument("--codec", default=None, help="extraction codec (default: extract's default)")
    p.add_argument("--pack", type=int, default=1,
                   help="join N consecutive Rotten Tomatoes snippets into one example (longer inputs, GLUE-like lengths)")
    p.add_argument("--train-args", default="", help="more side_train.run flags for every epoch, e.g. '--attention-dropout 0'")
    p.add_argument("--shape", choices=sorted(SHAPES), default="t5-base", help="random-weight backbone of this model's shape")
    p.add_argument("--drop-layers", type=int, default=3, help="side layers dropped per stack")
    p.add_argument("--device", default="cpu", help="cpu or cuda (adds a GPU-tier round)")
    p.add_argument("--codecs", default=None,
                   help="comma-separated codecs: compare the I/O overhead and reader throughput of one cache per codec (no live epochs)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --codecs")
    p.add_argument("--bf16", action="store_true",
                   help="add RAM, disk (thread, inline) and live rounds with the side step in bf16 (--precision bf16)")
    args = p.parse_args()
    TRAIN_ARGS.extend(["--device", args.device, "--drop-layers", str(args.drop_layers), *args.train_args.split()])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from make_tiny_t5 import make_tiny_t5

    model = work / f"{args.shape}-shaped"
    if not (model / "model.safetensors").exists():
        make_tiny_t5(model, **SHAPES[args.shape])
    cache = work / "cache"
    t0 = time.perf_counter()
    codec = ["--codec", args.codec] if args.codec else []
    data = packed_data(work, args.pack) if args.pack > 1 else []
    if args.codecs:
        print(json.dumps(codec_comparison(args, model, data), indent=1))
        return
    sh("backbone_cache.extract", "--model", str(model), "--out", str(cache), "--limit", str(args.examples),
       "--splits", "train,validation", "--init", "random", "--quiet", "--device", args.device, *codec, *data)
    extract_s = time.perf_counter() - t0
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_before": os.getloadavg(), "examples": args.examples, "pack": args.pack, "train_args": args.train_args, "extract_seconds": round(extract_s, 1),
               "shape": args.shape, "device": args.device, "drop_layers": args.drop_layers}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    encoder = json.loads((cache / "manifest.json").read_text())["splits"]["train"]["stacks"]["encoder"]
    results["train_tokens_per_example"] = round(encoder["num_tokens"] / encoder["num_sequences"], 1)
    # two rounds, interleaved, to see the noise
    for r in range(2):
        results[f"ram_{r}"] = epoch_seconds(cache, work / "ram", "--tier", "ram")
        results[f"disk_{r}"] = epoch_seconds(cache, work / "disk", "--tier", "disk", "--reader", "1")
        results[f"disk_thread_{r}"] = epoch_seconds(cache, work / "disk0", "--tier", "disk", "--reader", "thread")
        results[f"disk_inline_{r}"] = epoch_seconds(cache, work / "disk0", "--tier", "disk", "--reader", "inline")
        if args.device.startswith("cuda"):
            results[f"gpu_{r}"] = epoch_seconds(cache, work / "gpu", "--tier", "gpu")
    results["live"] = epoch_seconds(cache, work / "live", "--live")
    # the same side network with its step in bf16 autocast (backbone as before: the cache's precision)
    if args.bf16:
        for r in range(2):
            results[f"ram_bf16_{r}"] = epoch_seconds(cache, work / "ram", "--tier", "ram", "--precision", "bf16")
            results[f"disk_thread_bf16_{r}"] = epoch_seconds(cache, work / "disk0", "--tier", "disk", "--reader", "thread",
                                                             "--precision", "bf16")
            results[f"disk_inline_bf16_{r}"] = epoch_seconds(cache, work / "disk0", "--tier", "disk", "--reader", "inline",
                                                             "--precision", "bf16")
        results["live_bf16"] = epoch_seconds(cache, work / "live", "--live", "--precision", "bf16")
    results.update(reader_throughput(cache, work))
    results.update(arithmetic(cache))
    results["load_after"] = os.getloadavg()
    ram = min(results["ram_0"], results["ram_1"])
    disk = min(results["disk_0"], results["disk_1"])
    disk0 = min(results["disk_thread_0"], results["disk_thread_1"])
    results["ratio_disk_over_ram"] = disk / ram
    results["ratio_disk_thread_over_ram"] = disk0 / ram
    results["ratio_disk_inline_over_ram"] = min(results["disk_inline_0"], results["disk_inline_1"]) / ram
    results["ratio_live_over_disk"] = results["live"] / disk
    results["ratio_live_over_ram"] = results["live"] / ram
    if args.bf16:
        ram_bf16 = min(results["ram_bf16_0"], results["ram_bf16_1"])
        results["ratio_live_over_ram_bf16"] = results["live_bf16"] / ram_bf16
        results["ratio_disk_thread_over_ram_bf16"] = min(results["disk_thread_bf16_0"], results["disk_thread_bf16_1"]) / ram_bf16
        results["ratio_disk_inline_over_ram_bf16"] = min(results["disk_inline_bf16_0"], results["disk_inline_bf16_1"]) / ram_bf16
        results["ram_fp32_over_bf16"] = ram / ram_bf16
    if args.device.startswith("cuda"):
        results["ratio_live_over_gpu_tier"] = results["live"] / min(results["gpu_0"], results["gpu_1"])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
