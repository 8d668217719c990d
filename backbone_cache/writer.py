"""Shard-aligned writing of one stack's token-major states, and the background writer thread.

Each stack has one writer that owns every shard of its array and writes whole shards in
order, so no two writes ever touch one shard (concurrent partial writes lose data in zarr).
The caller's thread rounds each batch to bfloat16 straight into a shard buffer (one pass,
no extra copy); a full buffer goes to the background thread, which compresses and writes it
while the caller fills the other buffer. A shard counts as done only after zarr's atomic
write returns; progress is then recorded for that shard (backbone_cache.extraction), so a
killed run resumes every shard not recorded. A writer may own only some of the shards (one
process of a torchrun job): it skips the tokens of the others.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np
import torch


class BackgroundWriter:
    """Runs jobs in order on one thread so the next forward pass overlaps compression and I/O."""

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


class StackWriter:
    """Buffers a stack's tokens in storage order and writes them one whole shard at a time.

    The writer owns the shards `shards` (default: every shard from `shards_done` on); tokens
    of other shards are skipped, so several processes can share one array, each writing
    only its own whole shards. `write` runs on the caller's thread; shard writes run on
    `background` when given (two buffers, so at most one shard is in flight), else inline.
    """

    def __init__(
        self,
        array,
        shard_tokens: int,
        total_tokens: int,
        shards_done: int,
        on_shard: Callable[[int], None],
        background: BackgroundWriter | None = None,
        encoder: Callable[[np.ndarray, int], dict[str, np.ndarray]] | None = None,
        group=None,
        shards: list[int] | None = None,
    ):
        self.array = array
        self.encoder, self.group = encoder, group  # fp8/int8: shard bits -> arrays of the stack's group
        self.shard_tokens = shard_tokens
        self.total_tokens = total_tokens
        num_shards = max(1, -(-total_tokens // shard_tokens))
        if shards is None:
            shards = list(range(shards_done, num_shards)) if total_tokens else []
        self.pending: list[int] = sorted(set(shards))  # shards still to fill, in order
        self.committed = min(shards_done * shard_tokens, total_tokens)  # tokens of the leading shards safely written
        self.on_shard = on_shard
        self.background = background
        self.fill = 0  # tokens of the current shard (pending[0]) in the buffer
        self.in_flight = 0
        self.bytes_written = 0
        shape = (min(shard_tokens, max(total_tokens, 1)), *array.shape[1:])
        self.free: queue.Queue = queue.Queue()  # buffers not being written
        for _ in range(2 if background is not None else 1):
            self.free.put(np.empty(shape, dtype=np.uint16))
        self.buffer: np.ndarray | None = None

    @property
    def start(self) -> int:
        """The first token of the shard being filled (total_tokens when none is left)."""
        return self.pending[0] * self.shard_tokens if self.pending else self.total_tokens

    @property
    def done(self) -> bool:
        """Every owned shard was handed off and written."""
        return not self.pending and self.in_flight == 0

    def write(self, first_token: int, states: torch.Tensor | np.ndarray) -> None:
        """Accept tokens [first_token, first_token + len(states)); tokens of shards not owned, or already
        taken, are skipped.

        `states` is a float tensor [tokens, layers, d] on any device (rounded to bfloat16 here)
        or bfloat16 bits as a uint16 array.
        """
        while len(states):
            position = self.start + self.fill  # the next token the current shard needs (the end when none is left)
            skip = position - first_token
            if skip < 0:
                raise RuntimeError(f"writer gap: expected token {position}, got {first_token}")
            if skip >= len(states) or not self.pending:
                return
            states, first_token = states[skip:], position
            if self.buffer is None:
                self.buffer = self._take_buffer()
            shard_end = min(self.start + self.shard_tokens, self.total_tokens)
            take = min(len(states), shard_end - position)
            target = self.buffer[self.fill : self.fill + take]
            if isinstance(states, np.ndarray):
                target[...] = states[:take]
            else:  # one pass: gather from the device and round to bfloat16 into the shard buffer
                torch.from_numpy(target.view(np.int16)).view(torch.bfloat16).copy_(states[:take])
            self.fill += take
            states, first_token = states[take:], first_token + take
            if position + take == shard_end:
                self._hand_off()

    def _take_buffer(self) -> np.ndarray:
        while True:  # wait for a buffer; stop waiting if the background write failed
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                if self.background is not None:
                    self.background._raise()

    def _hand_off(self) -> None:
        buffer, start, count = self.buffer, self.start, self.fill
        self.buffer, self.fill = None, 0
        self.pending.pop(0)
        self.in_flight += 1
        job = lambda: self._flush(buffer, start, count)  # noqa: E731
        if self.background is None:
            job()
        else:
            self.background.submit(job)

    def _flush(self, buffer: np.ndarray, start: int, count: int) -> None:
        try:
            if self.encoder is None:
                self.array[start : start + count] = buffer[:count]
            else:  # quantize the whole shard, then write each of its arrays
                for name, values in self.encoder(buffer[:count], start // self.shard_tokens).items():
                    self.group[name][start : start + count] = values
        finally:
            self.free.put(buffer)
        self.bytes_written += count * buffer[0].nbytes
        if start == self.committed:
            self.committed = start + count
        self.in_flight -= 1
        self.on_shard(start // self.shard_tokens)
