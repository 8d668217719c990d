"""Streaming ladder states from disk, a pool at a time, in worker processes.

The sampler (`side_train.data.epoch_batches`) draws each epoch's batches from pools of a
few blocks of consecutive stored examples. `StreamingSplit.stream` hands the pools to a
`torch.utils.data.DataLoader` over `PoolDataset`: each item is one whole pool, read as a
few contiguous token ranges (only the layers the side network uses) and cut into its
padded batches. Workers start with `spawn` and open the zarr arrays lazily; batches come
back in pinned memory when a GPU is used, and the loader prefetches the next pools while
the current ones train. With `workers="thread"` the same code runs in a background thread,
with `workers="inline"` in the training thread, a pool at a time between steps.

Under torchrun each rank's epoch plan holds its share of every global batch
(`side_train.data.rank_plan`), so its pools name only the rows it reads; `CachedSplit(share_of=ranks)`
holds a rank's contiguous share of an evaluation split.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from shared.allocator import keep_freed_memory
from shared.cache_format import StackReader, read_examples
from side_train.data import (
    Batch,
    EpochPlan,
    StackStore,
    assemble,
    example_lengths,
    read_ranges,
    sequences_of,
    split_meta,
    state_positions,
)


class PoolDataset(torch.utils.data.Dataset):
    """Item i = (pool index, [(batch index, Batch), ...]) for pools[i] of an epoch plan."""

    def __init__(self, cache_dir: Path, manifest: dict, split: str, positions: dict[str, list[int]],
                 labels: np.ndarray, plan: EpochPlan, first: int):
        self.cache_dir, self.split, self.positions, self.labels = cache_dir, split, positions, labels  # a location pickles
        self.meta = {s: manifest["splits"][split]["stacks"][s] for s in positions}
        self.pools, self.first = plan.pools, first
        self.start_pool = next(i for i, (a, b, _) in enumerate(plan.pools) if b > first) if first < len(plan) else len(plan.pools)
        self.plan = [np.asarray(b) for b in plan]
        self.readers: dict[str, StackReader] | None = None  # opened lazily, once per process

    def __len__(self) -> int:
        return len(self.pools) - self.start_pool

    def _open(self) -> dict[str, StackReader]:
        if self.readers is None:
            keep_freed_memory()  # a spawned worker is a fresh process: its pool stores reuse memory too
            self.readers = {s: StackReader(self.cache_dir, self.split, s, m) for s, m in self.meta.items()}
        return self.readers

    def __getitem__(self, item: int):
        readers = self._open()
        pool = self.start_pool + item
        first_batch, stop_batch, ranges = self.pools[pool]
        rows = np.concatenate([np.arange(a, b) for a, b in ranges])
        local = np.full(rows[-1] + 1, -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        stores = {}
        for stack, reader in readers.items():
            k = self.meta[stack]["sequences_per_example"]
            lengths = np.diff(reader.offsets)[sequences_of(rows, k)]
            token_ranges = [(int(reader.offsets[a * k]), int(reader.offsets[b * k])) for a, b in ranges]
            stores[stack] = StackStore(read_ranges(reader, token_ranges, self.positions[stack]),
                                       np.concatenate([[0], np.cumsum(lengths)]), k, reader.labels, reader.offsets)
        out = []
        for index in range(max(first_batch, self.first), stop_batch):
            batch_rows = self.plan[index]
            out.append((index, assemble(batch_rows, local[batch_rows], self.labels, stores)))
        return pool, out


class StreamingSplit:
    """A split read from disk as it is consumed (training), or a contiguous range at a time (evaluation)."""

    def __init__(self, cache_dir: Path, manifest: dict, split: str, layers: dict[str, list[int]],
                 workers: str | int = "inline", pin_memory: bool = False):
        meta = split_meta(manifest, split)
        self.cache_dir, self.manifest, self.split = cache_dir, manifest, split
        self.workers, self.pin_memory = workers, pin_memory
        self.readers = {s: StackReader(cache_dir, split, s, meta[s]) for s in layers}
        self.positions = {s: state_positions(r.layers, layers[s], s) for s, r in self.readers.items()}
        self.examples = read_examples(cache_dir, split)
        self.labels = np.asarray(self.examples.column("label").to_numpy(), dtype=np.float64)
        self.lengths = example_lengths(self.examples)

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> Batch:
        """Read the rows' span of storage once and cut the batch from it (rows should be close together)."""
        rows = np.asarray(rows, dtype=np.int64)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        stores = {}
        for stack, reader in self.readers.items():
            k = self.manifest["splits"][self.split]["stacks"][stack]["sequences_per_example"]
            start, stop = int(reader.offsets[lo * k]), int(reader.offsets[hi * k])
            stores[stack] = StackStore(read_ranges(reader, [(start, stop)], self.positions[stack]),
                                       reader.offsets[lo * k : hi * k + 1] - start, k, reader.labels, reader.offsets)
        return assemble(rows, rows - lo, self.labels, stores)

    def stream(self, plan: EpochPlan, first: int = 0) -> Iterator[tuple[int, Batch]]:
        """(index, Batch) for batches first.. of the epoch, pools read ahead by workers."""
        dataset = PoolDataset(self.cache_dir, self.manifest, self.split, self.positions, self.labels, plan, first)
        if self.workers == "inline":
            for item in range(len(dataset)):
                yield from dataset[item][1]
            return
        if self.workers == "thread":
            yield from _threaded(dataset, pin=self.pin_memory)
            return
        if isinstance(self.workers, int) and self.workers > 0:
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, shuffle=False, num_workers=self.workers, multiprocessing_context="spawn",
                prefetch_factor=2, pin_memory=self.pin_memory,
            )
            for _pool, batches in loader:
                yield from batches
            return
        raise ValueError(f"workers must be 'inline', 'thread' or a positive count, got {self.workers!r}")


def _threaded(dataset: PoolDataset, ahead: int = 2, pin: bool = False) -> Iterator[tuple[int, Batch]]:
    """Read pools on a background thread (decoding and torch copies release the GIL); with
    `pin`, the thread also moves each batch to pinned memory, ready for an asynchronous copy."""
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in range(len(dataset)):
                if stop.is_set():
                    return
                pool, batches = dataset[item]
                ready.put((pool, [(index, batch.pin_memory()) for index, batch in batches] if pin else batches))
        except BaseException as err:  # re-raised in the consumer
            ready.put(err)
        ready.put(None)

    thread = threading.Thread(target=produce, name="pool-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item[1]
    finally:
        stop.set()
        while thread.is_alive():
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(0.05)
