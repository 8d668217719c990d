"""CPU speed plumbing of the side step, kept apart from the model so `model.py` reads like one.

Everything here computes what a plain PyTorch expression computes (tested against it):
- `dropout` / `keep_mask`: inverted dropout whose CPU masks come from numpy's PCG64
  (about 4.5x faster than torch's), still fixed by torch's RNG state;
- `ladder_projection`: a ladder's Linear over the stored bf16 states (standardized per channel
  or not) that saves the bf16 view, not a float32 copy, for its weight gradient;
- `attention_with_dropout`: the math path of attention on a CPU, biases added in place;
- `vocab_logits` / `FrozenHead`: the frozen LM head, folded into the up-projection where that
  takes fewer multiplications, with a bf16 copy kept on a CPU under autocast.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The autocast dtype where autocast is on for `device` (never on meta), else `default`."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return default


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout (training): `F.dropout` on CUDA, the mask of `keep_mask` elsewhere."""
    if p == 0.0:
        return x
    if x.is_cuda:
        return F.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, x.device, p)
    return _dropped(x, keep, scale)


_MASK_LEVELS = 1 << 16  # CPU masks compare 16-bit draws: p is rounded to a multiple of 2**-16


def keep_mask(shape: torch.Size | tuple[int, ...], device: torch.device, p: float) -> tuple[torch.Tensor, float]:
    """A bool dropout mask, True with probability 1 - p, and the scale 1 / P(True).

    On a CPU the bits come from numpy's PCG64 (four 16-bit draws per 64-bit output), seeded
    by one draw from torch's global generator: about 4.5x faster than `torch.rand(shape) >= p`
    (mt19937, one draw per element), and still fixed by `torch.manual_seed` and replayed by
    restoring torch's RNG state (recomputation, resumed runs). p is rounded to a multiple of
    2**-16 (0.1 -> 0.100006) and the scale matches the rounded p, so the expectation is exact.
    Elsewhere (CUDA, meta): `torch.rand(shape) >= p` and 1 / (1 - p).
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p, 1.0 / (1.0 - p)
    dropped_levels = round(p * _MASK_LEVELS)
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, ()).item())
    draws = np.random.PCG64(seed).random_raw((count + 3) // 4).view(np.uint16)[:count]
    keep = torch.from_numpy(draws >= dropped_levels).view(shape)
    return keep, _MASK_LEVELS / (_MASK_LEVELS - dropped_levels)


class Dropout(nn.Module):
    """nn.Dropout with `dropout` above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p) if self.training else x


class _LadderProjection(torch.autograd.Function):
    """`linear(dropout(states.to(dtype)), weight, bias)` that saves `states` as given.

    A ladder's input is a bfloat16 view of the batch, already in memory. nn.Linear would save
    its float32 copy for the weight gradient (twice the batch's bytes per ladder); this saves
    the view (and a bool dropout mask, if any) and rebuilds the input in backward with the
    same operations. `dtype` is the weight's (float32: the same arithmetic as nn.Linear) or,
    under autocast, bfloat16 (the states enter as they are; dropout is then applied in bf16).
    """

    @staticmethod
    def forward(ctx, states, keep, scale: float, weight, bias, dtype: torch.dtype, shift=None, factor=None):
        ctx.save_for_backward(states, keep, weight, shift, factor)
        ctx.scale, ctx.has_bias, ctx.dtype = scale, bias is not None, dtype
        inputs = _dropped(_standardized(states.to(dtype), shift, factor), keep, scale)
        return F.linear(inputs, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        states, keep, weight, shift, factor = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        inputs = _dropped(_standardized(states.to(ctx.dtype), shift, factor), keep, ctx.scale).to(rows.dtype)
        grad_weight = (rows.t() @ inputs.reshape(-1, inputs.shape[-1])).to(weight.dtype)
        grad_bias = rows.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_states = None
        if ctx.needs_input_grad[0]:
            grad_states = _dropped(grad_out @ weight.to(grad_out.dtype), keep, ctx.scale)
            if factor is not None:
                grad_states = grad_states * factor.to(grad_states.dtype)
            grad_states = grad_states.to(states.dtype)
        return grad_states, None, None, grad_weight, grad_bias, None, None, None


def _standardized(x: torch.Tensor, shift: torch.Tensor | None, factor: torch.Tensor | None) -> torch.Tensor:
    """(x - shift) * factor per channel, or x as it is without a shift."""
    return x if shift is None else (x - shift.to(x.dtype)) * factor.to(x.dtype)


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    # times the mask's uint8 view: on a CPU several times faster than torch.where or a bool
    # product; autograd keeps the 1-byte mask for the gradient, as before
    return x if keep is None else x.mul(keep.view(torch.uint8)).mul_(scale)


def ladder_projection(linear: nn.Linear, states: torch.Tensor, drop: Dropout | None = None,
                      standardize: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`linear(drop(states))` for a low-precision `states` view, saving the view, not a float32 copy;
    with `standardize` = (shift, factor) per channel, `linear(drop((states - shift) * factor))`.

    Computes in the weight's dtype, or under autocast in its dtype: bfloat16 states then
    enter the product as they are, with no float32 round trip."""
    weight = linear.weight
    dtype = compute_dtype(states.device, weight.dtype)
    shift, factor = standardize if standardize is not None else (None, None)
    p = drop.p if drop is not None and drop.training else 0.0
    if states.dtype == weight.dtype or not torch.is_grad_enabled():
        x = _standardized(states.to(dtype), shift, factor)
        return linear(drop(x) if drop is not None else x)
    keep, scale = keep_mask(states.shape, states.device, p) if p > 0 else (None, 1.0)
    return _LadderProjection.apply(states, keep, scale, weight, linear.bias, dtype, shift, factor)


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           position_bias: torch.Tensor | None, scale: float, p: float) -> torch.Tensor:
    """softmax(q k^T * scale + position_bias + mask) with dropout p, times v: SDPA's math path
    (which it takes off CUDA with dropout anyway) with the faster dropout mask and the biases
    added in place (no [B, heads, Lq, L] sum). Under bf16 autocast the maps are bf16 too: its
    softmax and adds are slower than float32 ones on a CPU, but the products and the saved
    maps gain more (benchmarks/RESULTS.md)."""
    scores = q @ k.transpose(-2, -1)
    if scale != 1.0:
        scores.mul_(scale)
    if position_bias is not None:
        scores.add_(position_bias.to(scores.dtype))
    return dropout(scores.add_(mask.to(scores.dtype)).softmax(-1), p) @ v


class FrozenHead:
    """The frozen LM head E [V, D] in the dtype a product takes. On a CPU a bfloat16 copy is kept
    (casting the [V, D] matrix took ~10 ms a step); on a GPU the cast is cheap and would only hold memory."""

    def __init__(self):
        self._copy: tuple[tuple | None, torch.Tensor | None] = (None, None)

    def __call__(self, head: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype == head.dtype or head.device.type != "cpu":
            self._copy = (None, None)
            return head.to(dtype)
        key = (dtype, head.data_ptr(), head._version)  # _version: changed in place
        if self._copy[0] != key:
            self._copy = (key, head.to(dtype))
        return self._copy[1]


def vocab_logits(s: torch.Tensor, up: nn.Linear, scale: float, head: torch.Tensor, frozen: FrozenHead) -> torch.Tensor:
    """Up-projection, output scale and the frozen LM head E: (s W^T + b) c E^T.

    With many tokens the same product is taken as [s, 1] (c E [W, b])^T: the [V, d + 1] matrix
    is made once per call and every token then costs V x d, not V x D, multiplications
    (`fold_pays`; equal up to float summation order)."""
    dtype = compute_dtype(s.device, up.weight.dtype)
    head = frozen(head, dtype)
    if not fold_pays(s.shape[:-1].numel(), up.in_features, up.out_features, torch.is_grad_enabled()):
        hidden = up(s) * scale
        return hidden @ head.to(hidden.dtype).t()
    # the bias rides as one more column of W and a column of ones after s: one pass over E
    folded = head @ (torch.cat([up.weight, up.bias[:, None]], 1).to(dtype) * scale)  # [V, d + 1]
    ones = torch.ones(*s.shape[:-1], 1, dtype=s.dtype, device=s.device)
    return torch.cat([s, ones], -1).to(dtype) @ folded.t()


def fold_pays(tokens: int, d: int, backbone_d: int, training: bool) -> bool:
    """Whether the folded LM head (`vocab_logits`) takes fewer multiplications.

    Per vocabulary row: direct, tokens x D forward (and as much again for the gradient to the
    up-projection's output); folded, D x d to make the matrix plus tokens x d forward (and for
    training: the gradients to s and to the matrix, tokens x d each, and D x d back to W)."""
    if training:
        return 2 * backbone_d * d + 3 * tokens * d < 2 * tokens * backbone_d
    return backbone_d * d + tokens * d < tokens * backbone_d


