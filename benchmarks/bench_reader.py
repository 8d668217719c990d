"""Reader benchmark (issue 4): one epoch of streaming pools through the direct shard reader
(shared/shard_reader.py) against the same reads through zarr-python, alternating, in one run.

Reports wall and CPU seconds (this process, all threads) per epoch of pools: on a machine
whose cores the training step already uses, the reader's CPU time is what it costs.

    python benchmarks/bench_reader.py /tmp/bench/stream2k/cache [more caches] --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def epoch_of_pools(cache: Path, direct: bool) -> tuple[float, float, int]:
    """(wall s, CPU s, decoded bytes) of reading one epoch's pools, all layers of both stacks."""
    from shared import cache_format
    from side_train.data import epoch_batches
    from side_train.streaming import PoolDataset, StreamingSplit

    opener = cache_format.ShardedArrayReader.open
    if not direct:
        cache_format.ShardedArrayReader.open = classmethod(lambda cls, path: None)
    try:
        manifest = cache_format.read_manifest(cache)
        split = StreamingSplit(cache, manifest, "train", list(range(12)), list(range(12)), workers="inline")
        plan = epoch_batches(split.lengths, 100, 0, 0)
        dataset = PoolDataset(cache, manifest, "train", split.positions, split.labels, plan, 0)
        dataset[0]  # open the readers, read the shard indexes
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(len(dataset)):
            dataset[i]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        nbytes = sum(r.offsets[-1] * len(split.positions[s]) * r.hidden.shape[2] * 2 for s, r in split.readers.items())
        return wall, cpu, int(nbytes)
    finally:
        cache_format.ShardedArrayReader.open = opener


def main() -> None:
    from shared.allocator import keep_freed_memory

    p = argparse.ArgumentParser()
    p.add_argument("caches", nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    keep_freed_memory()  # as in training
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_before": os.getloadavg()}
    for cache in map(Path, args.caches):
        rows = {"direct": [], "zarr": []}
        for _ in range(args.rounds):
            for name in ("direct", "zarr"):
                rows[name].append(epoch_of_pools(cache, name == "direct"))
        entry = {}
        for name, runs in rows.items():
            wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            entry[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "GBps": round(runs[0][2] / wall / 1e9, 3)}
        entry["cpu_direct_over_zarr"] = round(entry["direct"]["cpu_s"] / entry["zarr"]["cpu_s"], 3)
        entry["wall_direct_over_zarr"] = round(entry["direct"]["wall_s"] / entry["zarr"]["wall_s"], 3)
        results[str(cache)] = entry
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
