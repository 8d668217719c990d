"""Two sources of ladder states, one batch type.

- `CachedSplit` reads a split's stored states (only the layers the side network uses).
- `LiveSplit` runs the frozen backbone under `torch.inference_mode` on each batch, and
  rounds its states to bfloat16 exactly as extraction stores them.

Both number examples in the cache's storage order (longest first; see backbone_cache.plan),
so the same seed gives the same batches, and a cached and a live run the same losses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from shared.cache_format import StackReader, read_examples
from shared.errors import UserError


@dataclass
class Batch:
    """Padded ladder inputs for one batch; states are [B, L, 1 + side layers, d] bfloat16."""

    rows: torch.Tensor
    enc_states: torch.Tensor
    enc_mask: torch.Tensor
    labels: torch.Tensor
    dec_states: torch.Tensor | None = None
    dec_mask: torch.Tensor | None = None
    dec_labels: torch.Tensor | None = None
    cand_states: torch.Tensor | None = None
    cand_mask: torch.Tensor | None = None
    cand_labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`; to a GPU through pinned memory, without waiting for the copy."""
        non_blocking = device.type == "cuda"
        source = self.pin_memory() if non_blocking else self
        return Batch(**{f.name: None if getattr(source, f.name) is None else getattr(source, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def pin_memory(self) -> Batch:
        """The batch's host tensors in page-locked memory (those already pinned or on a GPU are kept);
        torch's DataLoader calls this in its pinning thread."""
        def pinned(value: torch.Tensor | None) -> torch.Tensor | None:
            if value is None or value.device.type != "cpu" or value.is_pinned():
                return value
            return value.pin_memory()

        return Batch(**{f.name: pinned(getattr(self, f.name)) for f in fields(self)})

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
    """Token-major store [T, ...] -> padded [B, Lmax, ...] and a bool mask, in one gather."""
    starts = torch.from_numpy(offsets[sequences])
    lengths = torch.from_numpy(offsets[sequences + 1]) - starts
    width = int(lengths.max())
    steps = torch.arange(width)
    mask = steps[None, :] < lengths[:, None]
    index = torch.where(mask, starts[:, None] + steps[None, :], torch.zeros((), dtype=torch.long))
    if store.device.type == "cuda":  # a pageable copy would wait for the GPU to finish its queue
        index, mask = index.pin_memory().to(store.device, non_blocking=True), mask.pin_memory().to(store.device, non_blocking=True)
    return store[index], mask


def pad_ids(values: np.ndarray, offsets: np.ndarray, sequences: np.ndarray, fill: int) -> torch.Tensor:
    ids, mask = gather_padded(torch.from_numpy(values.astype(np.int64)), offsets, sequences)
    return ids.masked_fill(~mask, fill)


class CachedSplit:
    """A split's ladder states, loaded once into host memory or onto the GPU (bfloat16, selected layers only)."""

    def __init__(self, cache_dir: Path, manifest: dict, split: str, enc_layers: list[int], dec_layers: list[int],
                 device: torch.device | None = None):
        if split not in manifest["splits"]:
            raise UserError(f"the cache has no {split!r} split (it has {', '.join(manifest['splits'])}); extract it with --splits")
        self.split = split
        meta = manifest["splits"][split]["stacks"]
        self.examples = read_examples(cache_dir, split)
        self.labels = np.asarray(self.examples.column("label").to_numpy(), dtype=np.float64)
        self.stacks: dict[str, StackReader] = {}
        self.states: dict[str, torch.Tensor] = {}
        wanted = {"encoder": enc_layers, "decoder": dec_layers, "candidates": dec_layers}
        for stack in meta:
            reader = StackReader(cache_dir, split, stack, meta[stack])
            positions = state_positions(reader.layers, wanted[stack], stack)
            self.stacks[stack] = reader
            self.states[stack] = load_layers(reader, positions)
            if device is not None and device.type == "cuda":
                self.states[stack] = self.states[stack].to(device)
        self.lengths = self.stacks["encoder"].lengths()
        self.num_candidates = (
            self.stacks["candidates"].num_sequences // len(self.lengths) if "candidates" in self.stacks else 0
        )

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray, candidates: bool = False) -> Batch:
        rows = np.asarray(rows, dtype=np.int64)
        enc = self.stacks["encoder"]
        enc_states, enc_mask = gather_padded(self.states["encoder"], enc.offsets, rows)
        batch = Batch(torch.from_numpy(rows), enc_states, enc_mask, torch.from_numpy(self.labels[rows]))
        if "decoder" in self.stacks:
            dec = self.stacks["decoder"]
            batch.dec_states, batch.dec_mask = gather_padded(self.states["decoder"], dec.offsets, rows)
            batch.dec_labels = pad_ids(dec.labels, dec.offsets, rows, -100)
        if candidates and self.num_candidates:
            cand = self.stacks["candidates"]
            k = self.num_candidates
            sequences = (rows[:, None] * k + np.arange(k)[None, :]).reshape(-1)
            batch.cand_states, batch.cand_mask = gather_padded(self.states["candidates"], cand.offsets, sequences)
            batch.cand_labels = pad_ids(cand.labels, cand.offsets, sequences, -100)
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


def load_layers(reader: StackReader, positions: list[int]) -> torch.Tensor:
    """Read the selected layers of a whole stack into a bfloat16 tensor, one shard at a time."""
    total = int(reader.offsets[-1])
    out = torch.empty((total, len(positions), reader.hidden.shape[2]), dtype=torch.bfloat16)
    step = int(reader.meta["shard_tokens"])
    for start in range(0, total, step):
        stop = min(start + step, total)
        read_layers(reader, start, stop, positions, out[start:stop])
    return out


class LiveSplit:
    """Runs the frozen backbone per batch; same rows, layers and rounding as the cache."""

    def __init__(self, backbone, plan, candidate_ids: list[list[int]] | None, enc_layers: list[int], dec_layers: list[int]):
        self.backbone, self.plan, self.candidate_ids = backbone, plan, candidate_ids
        self.split = plan.name
        self.enc_positions = [0] + [i + 1 for i in enc_layers]
        self.dec_positions = [0] + [i + 1 for i in dec_layers]
        self.lengths = np.diff(plan.offsets["encoder"])
        self.labels = np.array([float(ex.label) for ex in plan.examples])
        self.num_candidates = len(candidate_ids) if candidate_ids is not None else 0

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray, candidates: bool = False) -> Batch:
        from backbone_cache.extract import pad

        rows = np.asarray(rows, dtype=np.int64)
        device, bb, plan = self.backbone.device, self.backbone, self.plan
        ids, mask = pad([plan.source_ids[i] for i in rows], device)
        types = pad([plan.token_type_ids[i] for i in rows], device)[0] if plan.token_type_ids is not None else None
        states, final = bb.encode(ids, mask, types)
        batch = Batch(
            torch.from_numpy(rows), _round(states[:, :, self.enc_positions]), mask.bool().cpu(), torch.from_numpy(self.labels[rows])
        )
        if bb.family == "t5":
            targets = [plan.target_ids[i] for i in rows]
            dec_ids, dec_mask = pad([bb.shift_right(t) for t in targets], device)
            batch.dec_states = _round(bb.decode(dec_ids, dec_mask, final, mask)[:, :, self.dec_positions])
            batch.dec_mask = dec_mask.bool().cpu()
            batch.dec_labels = pad(targets, torch.device("cpu"))[0].masked_fill(~batch.dec_mask, -100)
            if candidates and self.num_candidates:
                k = self.num_candidates
                cands = self.candidate_ids * len(rows)
                cand_ids, cand_mask = pad([bb.shift_right(c) for c in cands], device)
                cand = bb.decode(cand_ids, cand_mask, final.repeat_interleave(k, 0), mask.repeat_interleave(k, 0))
                batch.cand_states = _round(cand[:, :, self.dec_positions])
                batch.cand_mask = cand_mask.bool().cpu()
                batch.cand_labels = pad(cands, torch.device("cpu"))[0].masked_fill(~batch.cand_mask, -100)
        return batch


def _round(states: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 like the cache does, and leave the states on the backbone's device."""
    return states.to(torch.bfloat16).clone()


BLOCK_TOKENS = 4096  # examples are shuffled in blocks of about this many stored tokens
POOL_BLOCKS = 8  # blocks pooled (and read together from disk) before their examples are mixed


class EpochPlan(list):
    """An epoch's batches (lists of storage rows), plus the pools they come from.

    `pools[i] = (first_batch, stop_batch, row_ranges)`: batches first_batch:stop_batch use
    only rows inside `row_ranges`, so a streaming reader loads those ranges once per pool.
    """

    pools: list[tuple[int, int, list[tuple[int, int]]]]
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


def eval_batches(num_examples: int, batch_size: int) -> list[np.ndarray]:
    """Storage order is already length-sorted, so consecutive rows batch well."""
    return [np.arange(s, min(s + batch_size, num_examples)) for s in range(0, num_examples, batch_size)]
