"""Scaling out on this CPU: 1 against 2 process extraction, and cache reads from a local S3 server against local disk.

Extraction: the same plan (the embedded MiniLM, or --model, on the first --examples
Rotten Tomatoes training snippets, --init random so no Fisher pass) run as
  1 proc x T threads   `python -m backbone_cache.extract` with OMP_NUM_THREADS=T (T = CPUs: the whole machine);
  1 proc x 1 thread    the same with OMP_NUM_THREADS=1 (one torchrun worker's share);
  2 procs x 1 thread   `torchrun --standalone --nproc-per-node 2` (torchrun sets OMP_NUM_THREADS=1 per worker).
Each run writes a fresh cache; the figure is the manifest's `extract_seconds` (rank 0: from
the cache being ready to write until every rank's shards are written; model loading,
tokenization and imports are left out) and the command's whole wall time. The variants
alternate over --rounds; medians are reported. The 2-process cache is checked to hold the
same bytes as the 1 x 1 cache.

Reads: the 1 x 1 cache is copied to a moto S3 server (a separate `moto_server` process on
127.0.0.1) and every stack's states are read whole through `StackReader`: from local disk
(the direct shard reader), from local disk through zarr (the remote code path, for
comparison), and from s3:// through zarr's FsspecStore. Figures are decoded bf16 MB/s,
best of --reads. A 2048^3 fp32 matmul gives this machine's compute for the same balance.

    flock /tmp/bench.lock python benchmarks/bench_scale_extract.py --examples 512 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def extract(out: Path, args: list[str], procs: int, threads: int) -> tuple[float, float]:
    """(extract_seconds, wall seconds) of one extraction into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        command = [sys.executable, "-m", "backbone_cache.extract"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                   "-m", "backbone_cache.extract"]
    start = time.perf_counter()
    subprocess.run([*command, "--out", str(out), *args], cwd=REPO, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    return json.loads((out / "manifest.json").read_text())["extract_seconds"], wall


def same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "manifest.json")
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_all(where, manifest: dict, direct: bool = True) -> float:
    """Seconds to read every stack's states whole (decoded bf16 bits)."""
    from shared.cache_format import StackReader

    start = time.perf_counter()
    for split, split_meta in manifest["splits"].items():
        for stack, meta in split_meta["stacks"].items():
            reader = StackReader(where, split, stack, meta)
            if not direct:
                reader.fast_hidden = None
            reader.read_tokens(0, meta["num_tokens"])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded all-MiniLM-L6-v2")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-mib", type=float, default=2.0, help="small shards so 2 ranks share the plan")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reads", type=int, default=3)
    a = p.parse_args()
    args = ["--splits", "train", "--limit", str(a.examples), "--batch-size", str(a.batch_size), "--shard-mib", str(a.shard_mib),
            "--chunk-mib", "0.25", "--init", "random", "--quiet"] + (["--model", a.model] if a.model else [])
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        variants = {f"1 proc x {cpus} threads": (1, cpus), "1 proc x 1 thread": (1, 1), "2 procs x 1 thread (torchrun)": (2, 1)}
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for _ in range(a.rounds):
            for name, (procs, threads) in variants.items():
                results[name].append(extract(work / name.split(" (")[0].replace(" ", "_"), args, procs, threads))
        import torch

        x = torch.randn(2048, 2048)
        x @ x
        start = time.perf_counter()
        for _ in range(5):
            x @ x
        gflops = 5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9
        print(f"compute: fp32 2048^3 matmul, {torch.get_num_threads()} threads: {gflops:,.0f} GFLOP/s")
        one, two = work / "1_proc_x_1_thread", work / "2_procs_x_1_thread"
        manifest = json.loads((one / "manifest.json").read_text())
        tokens = manifest["splits"]["train"]["stacks"]["encoder"]["num_tokens"]
        shards = manifest["splits"]["train"]["stacks"]["encoder"]["num_shards"]
        print(f"extraction: {a.examples} examples, {tokens:,} tokens, {shards} shards, {manifest['model']['name']}, "
              f"{a.rounds} rounds; 2-process cache bytes equal the 1 x 1 cache: {same_bytes(one, two)}\n")
        print("| variant | extract_seconds (median) | tokens/s | command wall s (median) |\n|---|---|---|---|")
        for name, runs in results.items():
            seconds = statistics.median(r[0] for r in runs)
            print(f"| {name} | {seconds:.2f} | {tokens / seconds:,.0f} | {statistics.median(r[1] for r in runs):.1f} |")

        # reads: local disk against a local S3 server
        port = free_port()
        server = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import boto3

            endpoint = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                                          region_name="us-east-1")
                    client.create_bucket(Bucket="bench")
                    break
                except Exception:
                    time.sleep(0.1)
            from shared.stores import CacheLocation

            options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
            remote = CacheLocation("s3://bench/cache", options)
            for path in one.rglob("*"):
                if path.is_file():
                    remote.write_bytes(path.relative_to(one).as_posix(), path.read_bytes())
            stored = sum(remote.sizes().values())
            nbytes = sum(m["num_tokens"] * len(m["layers"]) * manifest["model"]["d_model"] * 2
                         for s in manifest["splits"].values() for m in s["stacks"].values())
            timings = {"local disk, direct shard reader": lambda: read_all(one, manifest),
                       "local disk, zarr LocalStore": lambda: read_all(one, manifest, direct=False),
                       "s3:// on moto (127.0.0.1), zarr FsspecStore": lambda: read_all(remote, manifest)}
            best = {name: min(fn() for _ in range(a.reads)) for name, fn in timings.items()}
            print(f"\nreads: {nbytes / 1e6:,.1f} MB of bf16 states ({stored / 1e6:,.1f} MB stored), best of {a.reads}\n")
            print("| source | seconds | MB/s (decoded) | vs local direct |\n|---|---|---|---|")
            base = best["local disk, direct shard reader"]
            for name, seconds in best.items():
                print(f"| {name} | {seconds:.3f} | {nbytes / seconds / 1e6:,.0f} | {base / seconds:.2f}x |")
        finally:
            server.terminate()
            server.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
