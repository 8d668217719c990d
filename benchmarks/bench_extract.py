"""Extraction overhead, cache size and decode speed per codec, measured side by side in one run.

For the embedded MiniLM on the first --examples Rotten Tomatoes training snippets:

  plain    the same model on the same length-sorted, padded batches (same batch size) under
           torch.inference_mode with output_hidden_states=True, results discarded;
  extract  `Extraction(parse_args([...])).run()` of backbone_cache.extract, --importance none,
           once per codec.

Model loading and tokenization are identical on both sides and left out of the timings.
Rounds interleave the runs (plain, then each codec, order rotated per round); the table
gives medians over rounds. Sizes are the bytes of the hidden array's shard files; decode
speed is a plain `zarr.open_array(...)[:]` of the whole hidden array from a warm page cache.

    python benchmarks/bench_extract.py --examples 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backbone_cache.extract import Extraction, pad, parse_args
from shared.cache_format import CODECS


def plain_pass(extraction: Extraction) -> float:
    """Seconds for the forward passes alone over the split's planned batches."""
    plan, model, device = extraction.plans["train"], extraction.backbone.model, extraction.device
    start = time.perf_counter()
    with torch.inference_mode():
        for rows in plan.batches:
            ids, mask = pad([plan.source_ids[i] for i in rows], device)
            kwargs = {}
            if plan.token_type_ids is not None:
                kwargs["token_type_ids"] = pad([plan.token_type_ids[i] for i in rows], device)[0]
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def extract_args(out: Path, args: argparse.Namespace, codec: str) -> argparse.Namespace:
    argv = ["--out", str(out), "--splits", "train", "--limit", str(args.examples), "--batch-size", str(args.batch_size),
            "--codec", codec, "--chunk-mib", str(args.chunk_mib), "--shard-mib", str(args.shard_mib),
            "--importance", "none", "--device", args.device, "--quiet"]
    return parse_args(argv)


def shard_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in (cache / "train" / "encoder" / "hidden" / "c").rglob("*") if f.is_file())


def decode_seconds(cache: Path) -> tuple[float, np.ndarray]:
    import zarr

    array = zarr.open_array(str(cache / "train" / "encoder" / "hidden"), mode="r")
    start = time.perf_counter()
    bits = array[:]
    return time.perf_counter() - start, bits


def machine_line() -> str:
    load = os.getloadavg()
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} CPUs ({cpu or 'unknown'}), torch threads {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=3000, help="training snippets (--limit of the extraction)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-mib", type=float, default=2.0)
    p.add_argument("--shard-mib", type=float, default=256.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", default=None, help="where the caches go (default: a temporary folder, removed after)")
    args = p.parse_args()
    codecs = [c for c in args.codecs.split(",") if c]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_extract_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_line()}")

    extractions = {codec: Extraction(extract_args(work / codec, args, codec)) for codec in codecs}
    reference = extractions[codecs[0]]
    plan = reference.plans["train"]
    tokens, layers, d = int(plan.offsets["encoder"][-1]), len(reference.layers["encoder"]), reference.info.d_model
    print(f"data: {plan.num_examples} examples, {tokens:,} tokens, {len(plan.batches)} batches of {args.batch_size}, "
          f"{layers} layers x d={d}; geometry (chunk, shard tokens) {reference.geometry['encoder']}")
    plain_pass(reference)  # warm-up: allocator, kernels

    times: dict[str, list[float]] = {"plain": [], **{c: [] for c in codecs}}
    ratios: dict[str, list[float]] = {c: [] for c in codecs}
    decode: dict[str, list[float]] = {c: [] for c in codecs}
    sizes: dict[str, int] = {}
    for round_index in range(args.rounds):
        order = codecs[round_index % len(codecs):] + codecs[: round_index % len(codecs)]
        plain = plain_pass(reference)
        times["plain"].append(plain)
        line = [f"round {round_index + 1}: plain {plain:.2f}s"]
        for codec in order:
            out = work / codec
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            extractions[codec].run()
            seconds = time.perf_counter() - start
            times[codec].append(seconds)
            ratios[codec].append(seconds / plain)
            sizes[codec] = shard_bytes(out)
            line.append(f"{codec} {seconds:.2f}s")
        print(", ".join(line), flush=True)
        bits0 = None
        for codec in codecs:
            seconds, bits = decode_seconds(work / codec)
            decode[codec].append(seconds)
            if bits0 is None:
                bits0 = bits
            elif not np.array_equal(bits0, bits):
                raise SystemExit(f"codec {codec} decoded different bits from {codecs[0]}")
        del bits0, bits

    raw = tokens * layers * d * 2
    med = statistics.median
    print(f"\nmachine after: {machine_line()}")
    print(f"plain pass: median {med(times['plain']):.2f}s ({tokens / med(times['plain']):,.0f} tokens/s), "
          f"all {', '.join(f'{t:.2f}' for t in times['plain'])}")
    print("\n| codec | extract s (median) | extract / plain (median of per-round ratios) | per-round ratios | "
          "bytes / token / layer | vs raw bf16 | decode GB/s (logical bf16) |")
    print("|---|---|---|---|---|---|---|")
    for codec in codecs:
        per_token_layer = sizes[codec] / (tokens * layers)
        print(f"| {codec} | {med(times[codec]):.2f} | {med(ratios[codec]):.3f} | {', '.join(f'{r:.3f}' for r in ratios[codec])} | "
              f"{per_token_layer:.1f} | {raw / sizes[codec]:.3f}x | {raw / med(decode[codec]) / 1e9:.2f} |")
    print(f"\nraw bf16: {2 * d} bytes / token / layer; all codecs decoded identical bits")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
