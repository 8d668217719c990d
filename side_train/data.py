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

from shared.cache_format import StackReader, from_bf16_bits, read_examples
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
        non_blocking = device.type == "cuda"
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and device.type == "cuda" and value.device.type == "cpu":
                value = value.pin_memory()
            moved[f.name] = value.to(device, non_blocking=non_blocking) if value is not None else None
        return Batch(**moved)

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
    return store[index], mask


def pad_ids(values: np.ndarray, offsets: np.ndarray, sequences: np.ndarray, fill: int) -> torch.Tensor:
    ids, mask = gather_padded(torch.from_numpy(values.astype(np.int64)), offsets, sequences)
    return ids.masked_fill(~mask, fill)


class CachedSplit:
    """A split's ladder states, loaded once into host memory (bfloat16, selected layers only)."""

    def __init__(self, cache_dir: Path, manifest: dict, split: str, enc_layers: list[int], dec_layers: list[int]):
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


def load_layers(reader: StackReader, positions: list[int]) -> torch.Tensor:
    """Read the selected layers of a whole stack into a bfloat16 tensor, one shard at a time."""
    total = int(reader.offsets[-1])
    out = torch.empty((total, len(positions), reader.hidden.shape[2]), dtype=torch.bfloat16)
    step = int(reader.meta["shard_tokens"])
    contiguous = positions == list(range(positions[0], positions[-1] + 1))
    for start in range(0, total, step):
        stop = min(start + step, total)
        if contiguous:
            bits = reader.read_tokens(start, stop, slice(positions[0], positions[-1] + 1))
        else:
            bits = reader.read_tokens(start, stop)[:, positions]
        out[start:stop] = from_bf16_bits(bits)
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


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, pool_batches: int = 50) -> list[np.ndarray]:
    """Shuffled, length-bucketed batches: permute, sort each pool of batches by length, shuffle batches.

    Deterministic in (seed, epoch); the same for cached and live sources.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    pool = batch_size * pool_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(num_examples: int, batch_size: int) -> list[np.ndarray]:
    """Storage order is already length-sorted, so consecutive rows batch well."""
    return [np.arange(s, min(s + batch_size, num_examples)) for s in range(0, num_examples, batch_size)]
