"""Token sequences to padded tensors: the one place where batches of ids are padded.

A `TokenBatch` holds, per stack (see `shared.families.base.StackSpec`), the padded id
arrays of its sequences (`input_ids`, and where a family has them `labels`,
`token_type_ids`, ...) and one `attention_mask`. Padding is on the right; labels are
padded with -100, every other id array with 0.
"""

from __future__ import annotations

import torch

LABEL_PAD = -100


def pad(sequences: list[list[int]], device: torch.device | str = "cpu", fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; return ids [S, L] and the 0/1 attention mask [S, L]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), fill, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def unpad(states: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """[S, L, all states, d] -> [sum of lengths, kept states, d], padding dropped; a view when nothing is dropped."""
    if layers != list(range(states.shape[2])):
        states = states[:, :, layers]
    flat, keep = states.flatten(0, 1), mask.flatten().bool()
    return flat if bool(keep.all()) else flat[keep]


TokenBatch = dict[str, dict[str, torch.Tensor]]  # stack -> {"input_ids", "attention_mask", ...} padded [S, L]


def pad_stack(arrays: dict[str, list[list[int]]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One stack's named id sequences (all the same lengths) padded together, with its attention mask."""
    out: dict[str, torch.Tensor] = {}
    for name, sequences in arrays.items():
        ids, mask = pad(sequences, device, LABEL_PAD if name == "labels" else 0)
        out[name] = ids
        out.setdefault("attention_mask", mask)
    return out
