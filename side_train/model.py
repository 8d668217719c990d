"""The ladder side network (LST, Sung et al. 2022, §3.2-3.4), in one file.

The side network never sees the backbone's weights at run time, only its hidden states:

    s = down_emb(dropout(h_0))                       # embedding output, own down-projection
    for j, i in enumerate(side_layers):              # backbone block i feeds side block j
        mu = sigmoid(alpha_j / T)                    # alpha_j starts at 0, T = 0.1
        s = mu * s + (1 - mu) * ladder_j(h_{i+1})    # gate, then the side block
        s = block_j(s)
    s = dropout(final_norm(s))

T5 backbones get a side encoder and a side decoder (causal self-attention, cross-attention
to the side encoder), an up-projection to d and the frozen, tied LM head. BERT-family
backbones get a side encoder, an up-projection and a classification/regression head.
`states` tensors are [batch, tokens, 1 + len(side_layers), d]: the embedding output, then
the ladder input of each side layer, in order.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared.errors import UserError


@dataclass
class SideConfig:
    """Everything that fixes the side network's shape."""

    family: str  # "t5" or "encoder"
    backbone_d: int
    backbone_d_ff: int
    backbone_d_kv: int
    num_heads: int
    num_backbone_layers: int
    num_backbone_decoder_layers: int = 0
    reduction: int = 8
    encoder_layers: list[int] = field(default_factory=list)  # backbone block indices, 0-based
    decoder_layers: list[int] = field(default_factory=list)
    dropout: float = 0.1
    attention_dropout: float | None = None  # on the attention probabilities; None: `dropout` (the reference)
    gate_temperature: float = 0.1
    norm_eps: float = 1e-6
    feed_forward: str = "relu"  # T5: relu | gated-gelu; encoder: gelu
    relative_buckets: int = 32
    relative_max_distance: int = 128
    vocab_size: int = 0
    lm_scale: float = 1.0
    num_labels: int = 2
    label_kind: str = "class"
    pooling: str = "mean"

    @property
    def attention_p(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def d(self) -> int:
        return self.backbone_d // self.reduction

    @property
    def d_kv(self) -> int:
        return self.backbone_d_kv // self.reduction

    @property
    def d_ff(self) -> int:
        return self.backbone_d_ff // self.reduction

    def check(self) -> None:
        if self.reduction <= 0:
            raise UserError(f"--reduction must be positive, got {self.reduction}")
        for name, value in (("d", self.backbone_d), ("d_ff", self.backbone_d_ff), ("d_kv", self.backbone_d_kv)):
            if value % self.reduction:
                raise UserError(f"--reduction {self.reduction} does not divide the backbone's {name} = {value}; pick a divisor")
        for flag, value in (("--dropout", self.dropout), ("--attention-dropout", self.attention_p)):
            if not 0.0 <= value < 1.0:
                raise UserError(f"{flag} must be in [0, 1), got {value}")
        if self.d_kv == 0:
            raise UserError(f"--reduction {self.reduction} leaves no attention width; use a smaller reduction")
        for stack, layers, count in (
            ("encoder", self.encoder_layers, self.num_backbone_layers),
            ("decoder", self.decoder_layers, self.num_backbone_decoder_layers),
        ):
            if stack == "decoder" and self.family != "t5":
                continue
            if not layers:
                raise UserError(f"the side {stack} has no layers; give --side-layers or a smaller --drop-layers")
            if min(layers) < 0 or max(layers) >= count or sorted(set(layers)) != list(layers):
                raise UserError(f"side layers {layers} must be increasing block indices in 0..{count - 1}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> SideConfig:
        return cls(**obj)


def side_layers(num_layers: int, drop: int = 0, explicit: list[int] | None = None) -> list[int]:
    """Which backbone blocks feed side blocks: an explicit list, or all but `drop` interleaved (§3.4)."""
    if explicit:
        return sorted(explicit)
    if drop < 0 or drop >= num_layers:
        raise UserError(f"--drop-layers {drop} must be in 0..{num_layers - 1}")
    if drop == 0:
        return list(range(num_layers))
    # Drop evenly spaced blocks, starting from the bottom: 12 blocks, drop 3 -> [1,2,3,5,6,7,9,10,11].
    step = num_layers / drop
    dropped = {int(k * step) for k in range(drop)}
    return [i for i in range(num_layers) if i not in dropped]


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in float32, returned in the dtype the next products take: x's, or under
        autocast its dtype (one rounding; the q, k and v products then need no casts of their own)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(compute_dtype(x.device, x.dtype))


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
    def forward(ctx, states, keep, scale: float, weight, bias, dtype: torch.dtype):
        ctx.save_for_backward(states, keep, weight)
        ctx.scale, ctx.has_bias, ctx.dtype = scale, bias is not None, dtype
        return F.linear(_dropped(states.to(dtype), keep, scale), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        states, keep, weight = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        inputs = _dropped(states.to(ctx.dtype), keep, ctx.scale).to(rows.dtype)
        grad_weight = (rows.t() @ inputs.reshape(-1, inputs.shape[-1])).to(weight.dtype)
        grad_bias = rows.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_states = None
        if ctx.needs_input_grad[0]:
            grad_states = _dropped(grad_out @ weight.to(grad_out.dtype), keep, ctx.scale).to(states.dtype)
        return grad_states, None, None, grad_weight, grad_bias, None


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    # times the mask's uint8 view: on a CPU several times faster than torch.where or a bool
    # product; autograd keeps the 1-byte mask for the gradient, as before
    return x if keep is None else x.mul(keep.view(torch.uint8)).mul_(scale)


def ladder_projection(linear: nn.Linear, states: torch.Tensor, drop: Dropout | None = None) -> torch.Tensor:
    """`linear(drop(states))` for a low-precision `states` view, saving the view, not a float32 copy.

    Computes in the weight's dtype, or under autocast in its dtype: bfloat16 states then
    enter the product as they are, with no float32 round trip."""
    weight = linear.weight
    dtype = compute_dtype(states.device, weight.dtype)
    p = drop.p if drop is not None and drop.training else 0.0
    if states.dtype == weight.dtype or not torch.is_grad_enabled():
        x = states.to(dtype)
        return linear(drop(x) if drop is not None else x)
    keep, scale = keep_mask(states.shape, states.device, p) if p > 0 else (None, 1.0)
    return _LadderProjection.apply(states, keep, scale, weight, linear.bias, dtype)


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The autocast dtype where autocast is on for `device` (never on meta), else `default`."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return default


class Attention(nn.Module):
    """Multi-head attention; T5 style (no bias, no scaling) or BERT style (bias, 1/sqrt(d_head))."""

    def __init__(self, d: int, heads: int, d_head: int, bias: bool, scaled: bool, dropout: float):
        super().__init__()
        inner = heads * d_head
        self.q = nn.Linear(d, inner, bias=bias)
        self.k = nn.Linear(d, inner, bias=bias)
        self.v = nn.Linear(d, inner, bias=bias)
        self.o = nn.Linear(inner, d, bias=bias)
        self.heads, self.d_head, self.dropout = heads, d_head, dropout
        self.scale = d_head**-0.5 if scaled else 1.0

    def forward(self, x: torch.Tensor, mask: torch.Tensor, position_bias: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """mask: additive [B, 1, Lq or 1, L]; position_bias: [1, heads, Lq, L] (T5 self-attention)."""
        b, n, _ = x.shape
        context = x if context is None else context

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, self.d_head).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))
        p = self.dropout if self.training else 0.0
        if p and not q.is_cuda:
            # SDPA would take its math path here anyway (dropout off CUDA); this is that path
            # with the faster dropout mask, and the biases added in place (no [B, heads, Lq, L] sum).
            # Under bf16 autocast the maps are bf16 too: its softmax and adds are slower than
            # float32 ones on a CPU, but the products and the saved maps gain more (measured:
            # the same step at 32 tokens, 1.5x faster at 103; benchmarks/RESULTS.md)
            scores = q @ k.transpose(-2, -1)
            if self.scale != 1.0:
                scores.mul_(self.scale)
            if position_bias is not None:
                scores.add_(position_bias.to(scores.dtype))
            out = dropout(scores.add_(mask.to(scores.dtype)).softmax(-1), p) @ v
        else:
            # added here, per block: a [B, heads, Lq, L] sum made once per stack would be kept for backward
            bias = mask if position_bias is None else mask + position_bias
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p, scale=self.scale)
        return self.o(out.transpose(1, 2).reshape(b, n, self.heads * self.d_head))


class T5SideBlock(nn.Module):
    """A thin T5 block: pre-norm self-attention, [cross-attention], feed-forward."""

    def __init__(self, cfg: SideConfig, is_decoder: bool):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d, cfg.norm_eps)
        self.self_attn = Attention(cfg.d, cfg.num_heads, cfg.d_kv, bias=False, scaled=False, dropout=cfg.attention_p)
        self.is_decoder = is_decoder
        if is_decoder:
            self.cross_norm = RMSNorm(cfg.d, cfg.norm_eps)
            self.cross_attn = Attention(cfg.d, cfg.num_heads, cfg.d_kv, bias=False, scaled=False, dropout=cfg.attention_p)
        self.ff_norm = RMSNorm(cfg.d, cfg.norm_eps)
        self.gated = cfg.feed_forward.startswith("gated")
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d, bias=False)
        self.drop = Dropout(cfg.dropout)

    def forward(self, s, self_mask, position_bias=None, context=None, cross_mask=None):
        s = s + self.drop(self.self_attn(self.self_norm(s), self_mask, position_bias))
        if self.is_decoder:
            s = s + self.drop(self.cross_attn(self.cross_norm(s), cross_mask, context=context))
        h = self.ff_norm(s)
        h = F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h) if self.gated else F.relu(self.wi(h))
        return s + self.drop(self.wo(self.drop(h)))


class BertSideBlock(nn.Module):
    """A thin BERT layer: post-norm self-attention and GELU feed-forward, with biases."""

    def __init__(self, cfg: SideConfig):
        super().__init__()
        d_head = cfg.d // cfg.num_heads
        self.self_attn = Attention(cfg.d, cfg.num_heads, d_head, bias=True, scaled=True, dropout=cfg.attention_p)
        self.attn_norm = nn.LayerNorm(cfg.d, eps=cfg.norm_eps)
        self.wi = nn.Linear(cfg.d, cfg.d_ff)
        self.wo = nn.Linear(cfg.d_ff, cfg.d)
        self.ff_norm = nn.LayerNorm(cfg.d, eps=cfg.norm_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, s, self_mask, position_bias=None, context=None, cross_mask=None):
        s = self.attn_norm(s + self.drop(self.self_attn(s, self_mask)))
        return self.ff_norm(s + self.drop(self.wo(F.gelu(self.wi(s)))))


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's log-spaced relative position buckets."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out += (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    is_small = relative < exact
    large = exact + (
        torch.log(relative.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)
    ).long()
    large = torch.clamp(large, max=buckets - 1)
    return out + torch.where(is_small, relative, large)


def additive_mask(mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """[B, L] bool -> [B, 1, Lq, L] additive float mask (0 keep, -inf-ish drop)."""
    keep = mask[:, None, None, :]
    if causal:
        n = mask.shape[1]
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()[None, None]
    return torch.zeros(keep.shape, device=mask.device).masked_fill(~keep, torch.finfo(torch.float32).min)


class SideStack(nn.Module):
    """Down-projections, gates and thin blocks over one backbone stack's states."""

    def __init__(self, cfg: SideConfig, layers: list[int], is_decoder: bool):
        super().__init__()
        self.cfg, self.layers, self.is_decoder = cfg, list(layers), is_decoder
        self.t5 = cfg.family == "t5"
        self.down_emb = nn.Linear(cfg.backbone_d, cfg.d)
        self.ladders = nn.ModuleList(nn.Linear(cfg.backbone_d, cfg.d) for _ in layers)
        self.gate_alpha = nn.Parameter(torch.zeros(len(layers)))
        if self.t5:
            self.blocks = nn.ModuleList(T5SideBlock(cfg, is_decoder) for _ in layers)
            self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.num_heads)
            self.final_norm = RMSNorm(cfg.d, cfg.norm_eps)
        else:
            self.blocks = nn.ModuleList(BertSideBlock(cfg) for _ in layers)
        self.drop = Dropout(cfg.dropout)
        self.recompute = False  # set by LadderSideNetwork.set_recompute

    def position_bias(self, n: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(n, device=device)
        relative = positions[None, :] - positions[:, None]
        buckets = relative_position_bucket(relative, not self.is_decoder, self.cfg.relative_buckets, self.cfg.relative_max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1)[None]  # [1, heads, n, n]

    def forward(self, states, mask, context=None, context_mask=None):
        """states [B, L, 1 + len(layers), D] (any float dtype); mask [B, L] bool."""
        s = ladder_projection(self.down_emb, states[:, :, 0], self.drop)
        self_mask = additive_mask(mask, causal=self.is_decoder)
        position_bias = self.position_bias(mask.shape[1], mask.device) if self.t5 else None
        cross_mask = additive_mask(context_mask) if context is not None else None
        for j, block in enumerate(self.blocks):
            mu = torch.sigmoid(self.gate_alpha[j] / self.cfg.gate_temperature)
            s = mu * s + (1 - mu) * ladder_projection(self.ladders[j], states[:, :, j + 1])
            if self.recompute and torch.is_grad_enabled():
                # reentrant: the checkpoint saves the block's inputs through autograd (so
                # side_train.memory counts them) and re-runs the block, same dropout masks, in backward
                s = checkpoint(block, s, self_mask, position_bias, context, cross_mask, use_reentrant=True)
            else:
                s = block(s, self_mask, position_bias, context, cross_mask)
        if self.t5:
            s = self.final_norm(s)
        return self.drop(s)


class LadderSideNetwork(nn.Module):
    """The whole side network for either family, with save/load in safetensors."""

    def __init__(self, cfg: SideConfig, lm_head: torch.Tensor | None = None):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.encoder = SideStack(cfg, cfg.encoder_layers, is_decoder=False)
        self.upsample = nn.Linear(cfg.d, cfg.backbone_d)
        if cfg.family == "t5":
            self.decoder = SideStack(cfg, cfg.decoder_layers, is_decoder=True)
            if lm_head is None:
                raise ValueError("a T5 side network needs the backbone's LM head")
            self.register_buffer("lm_head", lm_head.detach().clone(), persistent=False)
            self._head_copy = (None, None)  # (key, tensor): the head's bf16 copy on a CPU (_lm_head_in)
        else:
            self.head_drop = Dropout(cfg.dropout)
            self.head = nn.Linear(cfg.backbone_d, cfg.num_labels)

    def set_recompute(self, enabled: bool) -> LadderSideNetwork:
        """Activation checkpointing of the side blocks: keep each block's inputs, recompute its
        activations in backward (about one more side forward per step; the same loss, gradients
        equal up to float summation order)."""
        for stack in self.stacks():
            stack.recompute = enabled
        return self

    def stacks(self) -> list[SideStack]:
        return [self.encoder] + ([self.decoder] if self.cfg.family == "t5" else [])

    # --- forward passes -------------------------------------------------------------------

    def encode(self, enc_states: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(enc_states, enc_mask)

    def lm_logits(self, side_encoded, enc_mask, dec_states, dec_mask) -> torch.Tensor:
        """T5: vocabulary logits [B, T, V] for teacher-forced decoder states."""
        return self.vocab_logits(self.decoder(dec_states, dec_mask, side_encoded, enc_mask))

    def vocab_logits(self, s: torch.Tensor) -> torch.Tensor:
        """Up-projection, T5's output scale and the frozen tied LM head E: (s W^T + b) c E^T.

        With many tokens the same product is taken as [s, 1] (c E [W, b])^T: the [V, d + 1] matrix
        is made once per call and every token then costs V x d, not V x D, multiplications
        (`_fold_pays`; equal up to float summation order)."""
        up, scale = self.upsample, self.cfg.lm_scale
        dtype = compute_dtype(s.device, up.weight.dtype)
        head = self._lm_head_in(dtype)
        if not _fold_pays(s.shape[0] * s.shape[1], self.cfg.d, self.cfg.backbone_d, torch.is_grad_enabled()):
            hidden = up(s) * scale
            return hidden @ head.to(hidden.dtype).t()
        # the bias rides as one more column of W and a column of ones after s: one pass over E
        folded = head @ (torch.cat([up.weight, up.bias[:, None]], 1).to(dtype) * scale)  # [V, d + 1]
        ones = torch.ones(*s.shape[:-1], 1, dtype=s.dtype, device=s.device)
        return torch.cat([s, ones], -1).to(dtype) @ folded.t()

    def _lm_head_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen LM head in `dtype`. On a CPU a bfloat16 copy is kept (casting the [V, D]
        matrix took ~10 ms a step); on a GPU the cast is cheap and would only hold memory."""
        if dtype == self.lm_head.dtype or self.lm_head.device.type != "cpu":
            self._head_copy = (None, None)
            return self.lm_head.to(dtype)
        key = (dtype, self.lm_head.data_ptr(), self.lm_head._version)  # _version: changed in place
        if self._head_copy[0] != key:
            self._head_copy = (key, self.lm_head.to(dtype))
        return self._head_copy[1]

    def classify(self, side_encoded: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
        """Encoder family: pooled logits [B, num_labels]."""
        hidden = self.upsample(side_encoded)
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = enc_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(self.head_drop(pooled))

    def loss(self, batch) -> torch.Tensor:
        """Training loss of a `Batch` (see side_train.data)."""
        encoded = self.encode(batch.enc_states, batch.enc_mask)
        if self.cfg.family == "t5":
            logits = self.lm_logits(encoded, batch.enc_mask, batch.dec_states, batch.dec_mask)
            return F.cross_entropy(logits.float().flatten(0, 1), batch.dec_labels.flatten(), ignore_index=-100)
        logits = self.classify(encoded, batch.enc_mask).float()
        if self.cfg.label_kind == "regression":
            return F.mse_loss(logits.squeeze(-1), batch.labels.float())
        return F.cross_entropy(logits, batch.labels.long())

    @torch.no_grad()
    def predict_classes(self, batch) -> torch.Tensor:
        """Encoder family: argmax class (or the regression value) per example."""
        logits = self.classify(self.encode(batch.enc_states, batch.enc_mask), batch.enc_mask).float()
        return logits.squeeze(-1) if self.cfg.label_kind == "regression" else logits.argmax(-1)

    @torch.no_grad()
    def score_candidates(self, batch) -> torch.Tensor:
        """T5: summed log-probability of each candidate label sequence, [B, K]."""
        encoded = self.encode(batch.enc_states, batch.enc_mask)
        k = batch.cand_states.shape[0] // encoded.shape[0]
        logits = self.lm_logits(
            encoded.repeat_interleave(k, 0), batch.enc_mask.repeat_interleave(k, 0), batch.cand_states, batch.cand_mask
        ).float()
        logp = logits.log_softmax(-1)
        labels = batch.cand_labels
        token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels >= 0)
        return token_logp.sum(-1).view(-1, k)

    # --- parameters and files -------------------------------------------------------------

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained(self, folder: Path) -> None:
        """side_config.json and model.safetensors (the frozen LM head is not saved)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors.tmp"))
        (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")
        (folder / "side_config.json").write_text(json.dumps(self.cfg.to_json(), indent=1))

    @classmethod
    def from_pretrained(cls, folder: Path, lm_head: torch.Tensor | None = None) -> LadderSideNetwork:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "side_config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise UserError(f"{folder} holds no side network (side_config.json and model.safetensors)")
        cfg = SideConfig.from_json(json.loads((folder / "side_config.json").read_text()))
        model = cls(cfg, lm_head)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model


def _fold_pays(tokens: int, d: int, backbone_d: int, training: bool) -> bool:
    """Whether the folded LM head (`LadderSideNetwork.vocab_logits`) takes fewer multiplications.

    Per vocabulary row: direct, tokens x D forward (and as much again for the gradient to the
    up-projection's output); folded, D x d to make the matrix plus tokens x d forward (and for
    training: the gradients to s and to the matrix, tokens x d each, and D x d back to W)."""
    if training:
        return 2 * backbone_d * d + 3 * tokens * d < 2 * tokens * backbone_d
    return backbone_d * d + tokens * d < tokens * backbone_d


def init_projections(model: LadderSideNetwork, std: float = 0.01) -> None:
    """Ladders, embedding down-projections and the up-projection: N(0, std), bias 0 (reference)."""
    stacks = model.stacks()
    linears = [model.upsample] + [m for s in stacks for m in [s.down_emb, *s.ladders]]
    for linear in linears:
        nn.init.normal_(linear.weight, 0.0, std)
        nn.init.zeros_(linear.bias)
    for stack in stacks:
        nn.init.zeros_(stack.gate_alpha)
