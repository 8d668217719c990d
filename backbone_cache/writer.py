"""Shard-aligned writing of one stack's token-major states, and the background writer thread.

Each stack has one writer that owns every shard of its array and writes whole shards in
order, so no two writes ever touch one shard (concurrent partial writes lose data in zarr).
A shard counts as done only after zarr's atomic write returns; progress is then recorded
in the manifest, so a killed run resumes from the first shard not recorded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np


class StackWriter:
    """Buffers a stack's tokens in storage order and writes them one whole shard at a time."""

    def __init__(self, array, shard_tokens: int, total_tokens: int, shards_done: int, on_shard: Callable[[int], None]):
        self.array = array
        self.shard_tokens = shard_tokens
        self.total_tokens = total_tokens
        self.committed = min(shards_done * shard_tokens, total_tokens)  # tokens safely on disk
        self.on_shard = on_shard
        self.buffer = np.empty((min(shard_tokens, max(total_tokens, 1)), *array.shape[1:]), dtype=np.uint16)
        self.fill = 0
        self.bytes_written = 0

    @property
    def done(self) -> bool:
        return self.committed >= self.total_tokens

    def write(self, first_token: int, bits: np.ndarray) -> None:
        """Accept tokens [first_token, first_token + len(bits)); tokens already committed are skipped."""
        position = self.committed + self.fill
        skip = position - first_token
        if skip >= len(bits):
            return
        if skip < 0:
            raise RuntimeError(f"writer gap: expected token {position}, got {first_token}")
        bits = bits[skip:]
        while len(bits):
            shard_end = min(self.committed + self.shard_tokens, self.total_tokens)
            take = min(len(bits), shard_end - self.committed - self.fill)
            self.buffer[self.fill : self.fill + take] = bits[:take]
            self.fill += take
            bits = bits[take:]
            if self.committed + self.fill == shard_end:
                self._flush()

    def _flush(self) -> None:
        stop = self.committed + self.fill
        self.array[self.committed : stop] = self.buffer[: self.fill]
        self.bytes_written += self.buffer[: self.fill].nbytes
        shard_index = self.committed // self.shard_tokens
        self.committed, self.fill = stop, 0
        self.on_shard(shard_index)


class BackgroundWriter:
    """Runs writes on one thread so the next forward pass overlaps compression and I/O."""

    def __init__(self, max_pending: int = 2):
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="cache-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as err:  # re-raised on the main thread
                    self.error = err

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
