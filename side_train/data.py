"""Where ladder states come from, one batch type, one way to assemble it.

- `CachedSplit` reads a split's stored states once (only the layers the side network uses)
  into host memory or onto the GPU;
- `side_train.streaming.StreamingSplit` reads them from disk a pool at a time;
- `LiveSplit` runs the frozen backbone on each batch and rounds its states to bfloat16
  exactly as extraction stores them.

All of them cut batches with `assemble`, number examples in the cache's storage order
(longest first; see backbone_cache.plan), and hold the stacks the side network reads
(`SideNetwork.train_stacks` for training, `eval_stacks` for evaluation), so the same seed
gives the same batches, and a cached and a live run the same losses. No code here knows a
backbone family: stacks are names, and a per-candidate stack is one with K sequences per example.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from shared.cache_format import StackReader, read_examples
from shared.distributed import Ranks
from shared.errors import UserError
from shared.tokens import LABEL_PAD


@dataclass
class Batch:
    """Padded ladder inputs for one batch. Per stack: states [S, L, 1 + side layers, d] bfloat16,
    mask [S, L] bool and, where the stack has token labels, targets [S, L] (-100 on padding);
    S is the batch size, or batch size x K for a per-candidate stack (example-major)."""

    rows: torch.Tensor  # storage rows of the examples
    labels: torch.Tensor  # per-example label values (float64)
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [self.rows, self.labels, *self.states.values(), *self.masks.values(), *self.targets.values()]

    def _map(self, fn) -> Batch:
        return Batch(fn(self.rows), fn(self.labels), {k: fn(v) for k, v in self.states.items()},
                     {k: fn(v) for k, v in self.masks.items()}, {k: fn(v) for k, v in self.targets.items()})

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`; to a GPU through pinned memory, without waiting for the copy."""
        non_blocking = device.type == "cuda"
        source = self.pin_memory() if non_blocking else self
        return source._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch's host tensors in page-locked memory (those already pinned or on a GPU are kept);
        torch's DataLoader calls this in its pinning thread."""
        return self._map(lambda t: t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory())

    def select(self, positions: dict[str, list[int] | None]) -> Batch:
        """The batch with only the given state positions of each stack (None: all of them)."""
        states = {k: v if positions.get(k) is None else v[:, :, positions[k]] for k, v in self.states.items()}
        return replace(self, states=states)

    @property
    def size(self) -> int:
        return len(self.rows)


def state_positions(stored_layers: list[int], side_layers: list[int], stack: str) -> list[int]:
    """Positions, in a stack's stored layer list, of the embedding and each side layer's input."""
    wanted = [0] + [i + 1 for i in side_layers]
    missing = [w for w in wanted if w not in stored_layers]
    if missing:
        raise UserError(
            f"the cache's {stack} stack lacks state {missing[0]} (stored: {stored_layers}); "
            "choose --side-layers among the stored ones or re-extract with --layers all"
        )
    return [stored_layers.index(w) for w in wanted]


def gather_padded(store: torch.Tensor, offsets: np.ndarray, sequences: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-major store [T, ...] -> padded [S, Lmax, ...] and a bool mask, in one gather."""
    starts = torch.from_numpy(offsets[sequences])
    lengths = torch.from_numpy(offsets[sequences + 1]) - starts
    width = int(lengths.max())
    steps = torch.arange(width)
    mask = steps[None, :] < lengths[:, None]
    index = torch.where(mask, starts[:, None] + steps[None, :], torch.zeros((), dtype=torch.long))
    if store.device.type == "cuda":  # a pageable copy would wait for the GPU to finish its queue
        index, mask = index.pin_memory().to(store.device, non_blocking=True), mask.pin_memory().to(store.device, non_blocking=True)
    return store[index], mask


def sequences_of(rows: np.ndarray, per_example: int) -> np.ndarray:
    """Sequence indices of `rows` in a stack with `per_example` sequences per example (example-major)."""
    return rows if per_example == 1 else (rows[:, None] * per_example + np.arange(per_example)[None, :]).reshape(-1)


@dataclass
class StackStore:
    """One stack's states for some examples, token-major, with what `assemble` needs to cut batches."""

    states: torch.Tensor  # [tokens held, positions, d] bfloat16
    offsets: np.ndarray  # sequence boundaries within `states` (local numbering)
    per_example: int
    labels: np.ndarray | None = None  # the split's token labels, or None
    label_offsets: np.ndarray | None = None  # the split's sequence boundaries (global numbering)


def assemble(rows: np.ndarray, local_rows: np.ndarray, labels: np.ndarray, stores: dict[str, StackStore]) -> Batch:
    """The one place a batch is cut from stored states, for every tier: `rows` number the examples
    in the split, `local_rows` the same examples within the stores."""
    batch = Batch(torch.from_numpy(rows), torch.from_numpy(labels[rows]))
    for stack, store in stores.items():
        local = sequences_of(local_rows, store.per_example)
        batch.states[stack], batch.masks[stack] = gather_padded(store.states, store.offsets, local)
        if store.labels is not None:
            ids, mask = gather_padded(torch.from_numpy(store.labels.astype(np.int64)), store.label_offsets,
                                      sequences_of(rows, store.per_example))
            batch.targets[stack] = ids.masked_fill(~mask, LABEL_PAD)
    return batch


def read_layers(reader: StackReader, start: int, stop: int, positions: list[int], out: torch.Tensor) -> None:
    """Read tokens start:stop of the given layer positions into `out` (bf16), one contiguous run of layers at a time.

    Inner chunks hold one layer each, so layers the side network does not use are never read.
    """
    column = 0
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    bits = out.view(torch.int16).numpy().view(np.uint16)  # the same memory, as the stored bits
    for run in runs:
        reader.read_tokens(start, stop, slice(run[0], run[-1] + 1), out=bits[:, column : column + len(run)])
        column += len(run)


def read_ranges(reader: StackReader, token_ranges: list[tuple[int, int]], positions: list[int]) -> torch.Tensor:
    """The selected layers of the given token ranges, one after another, in a new bfloat16 store."""
    total = sum(b - a for a, b in token_ranges)
    out = torch.empty((total, len(positions), reader.hidden.shape[2]), dtype=torch.bfloat16)
    cursor = 0
    for start, stop in token_ranges:
        read_layers(reader, start, stop, positions, out[cursor : cursor + stop - start])
        cursor += stop - start
    return out


def split_meta(manifest: dict, split: str) -> dict:
    if split not in manifest["splits"]:
        raise UserError(f"the cache has no {split!r} split (it has {', '.join(manifest['splits'])}); extract it with --splits")
    return manifest["splits"][split]["stacks"]


class CachedSplit:
    """A split's ladder states, loaded once into host memory or onto the GPU (bfloat16, selected layers only).

    share_of: the ranks of a data-parallel job: load only this rank's contiguous share of the
    examples (`share_bounds`, what it scores in evaluation); only those rows can be batched."""

    def __init__(self, cache_dir: Path, manifest: dict, split: str, layers: dict[str, list[int]],
                 device: torch.device | None = None, share_of: Ranks | None = None):
        meta = split_meta(manifest, split)
        self.split = split
        self.examples = read_examples(cache_dir, split)
        self.labels = np.asarray(self.examples.column("label").to_numpy(), dtype=np.float64)
        self.lengths = example_lengths(self.examples)
        whole = share_of is None or not share_of.distributed
        self.lo, self.hi = (0, len(self.lengths)) if whole else share_bounds(self.lengths, share_of.world_size)[share_of.rank]
        self.stores: dict[str, StackStore] = {}
        for stack, side_layers in layers.items():
            if stack not in meta:
                raise UserError(f"the cache's {split} split has no {stack!r} stack; it was extracted for another use")
            reader = StackReader(cache_dir, split, stack, meta[stack])
            positions = state_positions(reader.layers, side_layers, stack)
            k = meta[stack]["sequences_per_example"]
            if whole:
                start, ranges = 0, shard_ranges(reader)
            else:
                start, stop = int(reader.offsets[self.lo * k]), int(reader.offsets[self.hi * k])
                ranges = [(start, stop)] if stop > start else []  # more ranks than rows: none
            states = read_ranges(reader, ranges, positions)
            if device is not None and device.type == "cuda":
                states = states.to(device)
            self.stores[stack] = StackStore(states, reader.offsets[self.lo * k : self.hi * k + 1] - start, k,
                                            reader.labels, reader.offsets)

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < self.lo or rows.max() >= self.hi):
            raise ValueError(f"rows outside the loaded share {self.lo}:{self.hi} of the {self.split} split")
        return assemble(rows, rows - self.lo, self.labels, self.stores)


def example_lengths(examples) -> np.ndarray:
    """Tokens of each stored example's primary stack (the sampler's lengths), from examples.parquet."""
    return np.asarray(examples.column("n_tokens").to_numpy(), dtype=np.int64)


def shard_ranges(reader: StackReader) -> list[tuple[int, int]]:
    """The whole stack as token ranges of one shard each (the read unit)."""
    total, step = int(reader.offsets[-1]), int(reader.meta["shard_tokens"])
    return [(start, min(start + step, total)) for start in range(0, total, step)]


class LiveSplit:
    """Runs the frozen backbone per batch; same rows, layers and rounding as the cache."""

    def __init__(self, backbone, plan, layers: dict[str, list[int]]):
        self.backbone, self.plan = backbone, plan
        self.split = plan.name
        self.positions = {stack: [0] + [i + 1 for i in side] for stack, side in layers.items()}
        self.stacks = [s for s in layers if s in plan.inputs]
        self.lengths = plan.lengths
        self.labels = np.array([float(ex.label) for ex in plan.examples])

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows, dtype=np.int64)
        tokens = self.plan.token_batch(rows, self.backbone.device, self.stacks)
        states = self.backbone.states(tokens)
        batch = Batch(torch.from_numpy(rows), torch.from_numpy(self.labels[rows]))
        for stack in self.stacks:
            # rounded to bfloat16 like the cache, left on the backbone's device
            batch.states[stack] = states[stack][:, :, self.positions[stack]].to(torch.bfloat16).clone()
            batch.masks[stack] = tokens[stack]["attention_mask"].bool().cpu()
            if "labels" in tokens[stack]:
                batch.targets[stack] = tokens[stack]["labels"].cpu()
        return batch


class LayerView:
    """One network's state positions out of a source loaded for several networks' layers."""

    def __init__(self, source, positions: dict[str, list[int] | None]):
        self.source, self.positions_in_source = source, positions

    def __getattr__(self, name: str):
        return getattr(self.source, name)  # lengths, labels, num_examples, plan ...

    def batch(self, rows: np.ndarray) -> Batch:
        return self.source.batch(rows).select(self.positions_in_source)


BLOCK_TOKENS = 4096  # examples are shuffled in blocks of about this many stored tokens
POOL_BLOCKS = 8  # blocks pooled (and read together from disk) before their examples are mixed


class EpochPlan(list):
    """An epoch's batches (lists of storage rows), plus the pools they come from.

    `pools[i] = (first_batch, stop_batch, row_ranges)`: batches first_batch:stop_batch use
    only rows inside `row_ranges`, so a streaming reader loads those ranges once per pool.
    """

    pools: list[tuple[int, int, list[tuple[int, int]]]]
    weightless: set[int]  # (a rank's plan) batches whose rows are another rank's, taken only to join the step
    seed: int
    epoch: int
    batch_size: int


def block_bounds(lengths: np.ndarray, block_tokens: int = BLOCK_TOKENS) -> np.ndarray:
    """Row boundaries of consecutive blocks of about `block_tokens` stored tokens."""
    ends = np.cumsum(lengths)
    cuts = np.searchsorted(ends, np.arange(block_tokens, int(ends[-1]), block_tokens), side="left") + 1
    return np.unique(np.concatenate([[0], cuts[cuts < len(lengths)], [len(lengths)]]))


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> EpochPlan:
    """Block shuffle: permute blocks, pool POOL_BLOCKS of them, permute the pool's examples,
    cut length-bucketed batches, shuffle the pool's batches.

    Deterministic in (seed, epoch, lengths) and the same for every source and tier, so
    cached, streamed and live runs see identical batches.
    """
    rng = np.random.default_rng([seed, epoch])
    bounds = block_bounds(np.asarray(lengths))
    order = rng.permutation(len(bounds) - 1)
    plan = EpochPlan()
    plan.pools, plan.seed, plan.epoch, plan.batch_size = [], seed, epoch, batch_size
    plan.weightless = set()
    for p in range(0, len(order), POOL_BLOCKS):
        ranges = sorted((int(bounds[b]), int(bounds[b + 1])) for b in order[p : p + POOL_BLOCKS])
        rows = np.concatenate([np.arange(a, b) for a, b in ranges])
        rows = rows[rng.permutation(len(rows))]
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        pool_batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        first = len(plan)
        plan.extend(pool_batches[i] for i in rng.permutation(len(pool_batches)))
        plan.pools.append((first, len(plan), ranges))
    return plan


def iter_batches(source, plan: EpochPlan, first: int = 0):
    """(index, Batch) for batches first.. of an epoch; streaming sources read whole pools."""
    if hasattr(source, "stream"):
        yield from source.stream(plan, first)
        return
    for index in range(first, len(plan)):
        yield index, source.batch(plan[index])


def eval_batches(num_examples: int, batch_size: int, start: int = 0) -> list[np.ndarray]:
    """Rows start:num_examples in batches; storage order is already length-sorted, so consecutive rows batch well."""
    return [np.arange(s, min(s + batch_size, num_examples)) for s in range(start, num_examples, batch_size)]


# --- data parallel: each rank's share of every global batch, and of an evaluation split ---------

MERGE_GAP = 4  # a rank reads the rows between two of its runs when at most this many lie between


def rank_share(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """One rank's part of a global batch: the batch's rows in storage order, cut into `world`
    consecutive parts whose sizes differ by at most one. A batch holds examples of about one
    length, which storage keeps together, so each rank's part is a near-contiguous run of storage."""
    return np.array_split(np.sort(np.asarray(rows, dtype=np.int64)), world)[rank]


def row_runs(rows: np.ndarray, gap: int = MERGE_GAP) -> list[tuple[int, int]]:
    """Sorted distinct `rows` as (start, stop) runs; runs at most `gap` rows apart are merged (fewer,
    longer reads: on a block-shuffled plan a rank of two then reads about 54% of each pool's rows,
    in about 8 runs, against 50% in about 80)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows) > gap) + 1
    return [(int(part[0]), int(part[-1]) + 1) for part in np.split(rows, cuts)]


def rank_plan(plan: EpochPlan, rank: int, world: int) -> EpochPlan:
    """An epoch plan of global batches -> this rank's shares (`rank_share`), with each pool's
    row ranges narrowed to the rows this rank reads. A global batch with fewer rows than ranks
    leaves some ranks nothing: they take its first row, weighted 0 in the step (`weightless`),
    so every rank still runs the step's collectives."""
    out = EpochPlan()
    out.pools, out.seed, out.epoch, out.batch_size = [], plan.seed, plan.epoch, plan.batch_size
    out.weightless = set()
    for first, stop, _ranges in plan.pools:
        for index in range(first, stop):
            share = rank_share(plan[index], rank, world)
            if len(share) == 0:
                share = np.sort(np.asarray(plan[index], dtype=np.int64))[:1]
                out.weightless.add(index)
            out.append(share)
        out.pools.append((first, stop, row_runs(np.concatenate(out[first:stop]))))
    return out


def share_bounds(lengths: np.ndarray, world: int) -> list[tuple[int, int]]:
    """Each rank's contiguous rows of an evaluation split, cut at about equal stored tokens, so a
    rank loads and scores only its own part."""
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    total = int(ends[-1]) if len(ends) else 0
    cuts = [0, *(int(np.searchsorted(ends, total * r / world, side="left")) for r in range(1, world)), len(ends)]
    cuts = list(np.maximum.accumulate(cuts))
    return [(int(cuts[r]), int(cuts[r + 1])) for r in range(world)]
