"""Extraction overhead, cache size and decode speed per codec (and chunk/shard size), in one run.

For the embedded MiniLM (or --model, or --bert-base-shaped: random weights of BERT-base's
shape) on the first --examples Rotten Tomatoes training snippets:

  plain    the same model on the same length-sorted, padded batches (same batch size) under
           torch.inference_mode with output_hidden_states=True, results discarded;
  extract  `Extraction(parse_args([...])).run()` of backbone_cache.extract, --importance none,
           once per variant (codec, --chunk-mib, --shard-mib).

Model loading and tokenization are identical on both sides and left out of the timings,
as are one-time first-use costs (an untimed extraction and plain pass run first).
Each extract run is paired with a plain pass run just before it (plain, variant 1, plain,
variant 2, ...; order rotated per round); the table gives medians of the per-pair ratios,
of wall time and of this process's CPU time (all threads), the fastest extract over the
fastest plain pass of the whole run (the least disturbed runs when other jobs share the
machine), and the CPU seconds spent off the forward path (compression and writing).
Sizes are the bytes of the hidden array's shard files. Decode speed is a
plain `zarr.open_array(...)[:]` of the whole hidden array from a warm page cache; the
random read is one example's token range, all layers, by its offsets.

    python benchmarks/bench_extract.py --examples 3000 --rounds 3
    python benchmarks/bench_extract.py --codecs zstd1 --geometries 2:256,1:256,4:256,2:64,2:128
    python benchmarks/bench_extract.py --bert-base-shaped --device cuda --examples 3000 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from backbone_cache.extract import parse_args
from backbone_cache.extraction import Extraction
from shared.cache_format import CODECS


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each live thread of this process, by thread id."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def timed(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the whole process, CPU seconds off the forward path) of fn().

    Off the forward path: Python threads other than the main one (writer, zarr's I/O loop
    and codec pool), live or ended during fn. The rest is the main thread and torch's
    intra-op workers.
    """
    before, wall, cpu = thread_cpu(), time.perf_counter(), time.process_time()
    fn()
    wall, cpu, after = time.perf_counter() - wall, time.process_time() - cpu, thread_cpu()
    python_threads = {t.native_id for t in threading.enumerate()} - {threading.main_thread().native_id}
    forward_path = sum(c - before.get(t, 0.0) for t, c in after.items() if t not in python_threads)
    return wall, cpu, max(0.0, cpu - forward_path)


def plain_pass(extraction: Extraction) -> None:
    """The backbone's forward passes alone (the family's `states`) over the split's planned batches, results discarded."""
    plan, backbone = extraction.plans["train"], extraction.backbone
    with torch.inference_mode():
        for rows in plan.batches:
            backbone.states(plan.token_batch(rows, backbone.device))
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()


def extract_args(out: Path, args: argparse.Namespace, codec: str, chunk_mib: float, shard_mib: float) -> argparse.Namespace:
    argv = ["--out", str(out), "--splits", "train", "--limit", str(args.examples), "--batch-size", str(args.batch_size),
            *(["--model", args.model] if args.model else []),
            "--codec", codec, "--chunk-mib", str(chunk_mib), "--shard-mib", str(shard_mib),
            "--init", "random", "--device", args.device, "--quiet"]
    return parse_args(argv)


def shard_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in (cache / "train" / "encoder" / "hidden" / "c").rglob("*") if f.is_file())


def decode_seconds(cache: Path) -> tuple[float, np.ndarray]:
    import zarr

    array = zarr.open_array(str(cache / "train" / "encoder" / "hidden"), mode="r")
    start = time.perf_counter()
    bits = array[:]
    return time.perf_counter() - start, bits


def random_read_ms(cache: Path, sequences: np.ndarray) -> float:
    """Mean milliseconds to read one whole example (all layers) by its offsets."""
    import zarr

    group = zarr.open_group(str(cache / "train" / "encoder"), mode="r")
    offsets, hidden = group["offsets"][:], group["hidden"]
    start = time.perf_counter()
    for i in sequences:
        hidden[offsets[i] : offsets[i + 1]]
    return (time.perf_counter() - start) / len(sequences) * 1e3


def machine_line() -> str:
    load = os.getloadavg()
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} CPUs ({cpu or 'unknown'}), torch threads {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=3000, help="training snippets (--limit of the extraction)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--geometries", default="2:256", help="comma-separated CHUNK_MIB:SHARD_MIB, each tried with every codec")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", default=None, help="where the caches go (default: a temporary folder, removed after)")
    p.add_argument("--model", default=None, help="an encoder backbone (default: the embedded MiniLM)")
    p.add_argument("--bert-base-shaped", action="store_true",
                   help="a BERT-base-shaped encoder with random weights, built in the work folder (no MiniLM weights needed)")
    args = p.parse_args()
    geometries = [tuple(float(x) for x in g.split(":")) for g in args.geometries.split(",") if g]
    variants = [(codec, chunk, shard) for chunk, shard in geometries for codec in args.codecs.split(",") if codec]
    names = [f"{codec} {chunk:g}:{shard:g}" for codec, chunk, shard in variants]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_extract_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.bert_base_shaped:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from make_tiny_t5 import make_random_encoder

        args.model = str(make_random_encoder(work / "bert-base-shaped"))
    print(f"machine before: {machine_line()}")

    extractions = {name: Extraction(extract_args(work / name.replace(" ", "_"), args, *variant)) for name, variant in zip(names, variants)}
    reference = extractions[names[0]]
    plan = reference.plans["train"]
    tokens, layers, d = int(plan.offsets["encoder"][-1]), len(reference.layers["encoder"]), reference.info.d_model
    print(f"data: {plan.num_examples} examples, {tokens:,} tokens, {len(plan.batches)} batches of {args.batch_size}, {layers} layers x d={d}")
    reference.run()  # warm-up, untimed: first-use imports (pyarrow loads pandas), zarr's thread pool
    shutil.rmtree(reference.args.out, ignore_errors=True)
    plain_pass(reference)  # warm-up: allocator, kernels

    plain: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}  # the plain pass run just before each extract
    extract: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    random_ms: dict[str, list[float]] = {n: [] for n in names}
    sizes: dict[str, int] = {}
    rng = np.random.default_rng(0)
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        line = [f"round {round_index + 1}:"]
        for name in order:
            folder = Path(extractions[name].args.out)
            plain[name].append(timed(lambda: plain_pass(reference)))
            shutil.rmtree(folder, ignore_errors=True)
            extract[name].append(timed(extractions[name].run))
            sizes[name] = shard_bytes(folder)
            line.append(f"plain {plain[name][-1][0]:.2f}s, {name} {extract[name][-1][0]:.2f}s;")
        print(" ".join(line), flush=True)
        reference_bits = None
        sequences = rng.choice(plan.num_examples, size=min(200, plan.num_examples), replace=False)
        for name in names:
            folder = Path(extractions[name].args.out)
            seconds, bits = decode_seconds(folder)
            decode[name].append(seconds)
            random_ms[name].append(random_read_ms(folder, sequences))
            if reference_bits is None:
                reference_bits = bits
            elif not np.array_equal(reference_bits, bits):
                raise SystemExit(f"variant {name} decoded different bits from {names[0]}")
        del reference_bits, bits

    raw = tokens * layers * d * 2
    med = statistics.median
    print(f"\nmachine after: {machine_line()}")
    all_plain = [w for n in names for w, _, _ in plain[n]]
    print(f"plain pass: median {med(all_plain):.2f}s ({tokens / med(all_plain):,.0f} tokens/s, "
          f"{plan.num_examples / med(all_plain):,.0f} examples/s) over {len(all_plain)} runs, min {min(all_plain):.2f}s, max {max(all_plain):.2f}s")
    print("\n| codec chunk:shard MiB | extract s (median) | extract / plain, wall (median) | per-pair wall ratios | "
          "fastest extract / fastest plain | "
          "extract / plain, CPU (median) | writer + zarr threads, CPU s (median) | same, / plain CPU | bytes / token / layer | "
          "vs raw bf16 | whole-array decode GB/s (logical bf16) | one random example, ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        wall = [e[0] / p[0] for e, p in zip(extract[name], plain[name])]
        cpu = [e[1] / p[1] for e, p in zip(extract[name], plain[name])]
        background = [e[2] for e in extract[name]]
        share = [e[2] / p[1] for e, p in zip(extract[name], plain[name])]
        print(f"| {name} | {med(e[0] for e in extract[name]):.2f} | {med(wall):.3f} | {', '.join(f'{r:.3f}' for r in wall)} | "
              f"{min(e[0] for e in extract[name]) / min(all_plain):.3f} | "
              f"{med(cpu):.3f} | {med(background):.2f} | {med(share):.3f} | {sizes[name] / (tokens * layers):.1f} | "
              f"{raw / sizes[name]:.3f}x | {raw / med(decode[name]) / 1e9:.2f} | {med(random_ms[name]):.2f} |")
    print(f"\nraw bf16: {2 * d} bytes / token / layer; every variant decoded identical bits")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
