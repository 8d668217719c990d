"""The decoder side network: thin blocks of the backbone's own kind over a causal LM's prompt states.

Each side block is the backbone's block at width d/r (shared.families.decoder reads it from the
loaded model): pre-norm RMSNorm (Gemma's x̂(1 + w) where the backbone's norm has that form;
Gemma 2/3's extra norms after attention and after the MLP), grouped-query attention with rotary
embeddings at the backbone's frequencies for the block's layer type (Gemma 3: theta 1e4 on
sliding layers, 1e6 on global ones), q/k RMSNorm where the backbone has it (Qwen3, Gemma 3),
the backbone's biases, attention scale and logit softcap, a causal mask plus the layer's
sliding window, and the backbone's gated MLP and activation. Ladders and gates are the paper's
(`side_train.model.LadderStack`), then a final norm and the up-projection d/r -> d.

Geometry: the side keeps the backbone's group size (query heads per KV head); the reduction r is
split between KV groups and head dims, g = gcd(r, KV heads): KV heads / g groups of head dim
head_dim / (r / g) (Gemma 3 270M, 1 KV head, r = 8: 1 group of 4 query heads, head dim 32).

Heads (`DecoderSideConfig.head`):
- "words" (class tasks, the default): label words scored through the frozen LM head, only the
  candidates' rows of it (never the whole vocabulary). Training: cross-entropy over the label
  words' distinct first tokens at the prompt's last position. Evaluation: each candidate's
  log-probability summed over its tokens, the first over the first tokens, later ones over all
  the candidates' tokens (the `candidates` stack, only read when some word has 2+ tokens).
  Words that share their first token are told apart only at evaluation.
- "last" (regression, or `pooling="last"`): a linear head on the up-projected state of the last
  real token.
- "lm" (instruction tasks): next-token cross-entropy on the response tokens through the whole
  frozen head, a chunk of tokens at a time in forward and backward
  (`shared.families.decoder.chunked_token_nll`), only at the response positions.

`--merge-final` (QST's output, Zhang et al. 2024): before the head, the up-projected side state
is mixed with the backbone's own final state, its last block's output through its frozen final
norm: h = (1 - σ(z)) · up(s) + σ(z) · norm(h_L), z per channel [D], starting at 1.0 as QST's.
It needs the last backbone block among the side layers (its output is that ladder's input).

Generation (`generate_batch`): prompts left-padded together; the live backbone runs with its KV
cache (`DecoderBackbone.step_states`, given the padding mask and each row's positions) and the side
decoder with its own (`SideKVCache`: per block the rotated keys and the values, their positions and
whether each is a real token, sliding layers keeping only their window), greedy or sampled
(`GenerationConfig`); logits over the whole vocabulary at the last position only.

Free blocks (`--free-blocks N`; xLadder, Zheng et al. 2025): N more side blocks after the laddered
ones, which read no ladder. With `--side-layers` on the top backbone blocks they give the side
network more depth above the backbone's deepest states. Free block k is built like laddered block k
(mod their count), copies its init and starts as the identity (`DecoderSideBlock.start_as_identity`).

Pruned init (`init_from_backbone`), chained through every backbone block like T5's: the kept
residual dims K start from the embedding columns; per block, whole KV groups are kept by the
summed row scores of their query heads, key and value; within them the same head dims for
every query head and the key, as whole rotary pairs (j, j + head_dim/2), whose frequencies the
side block then uses (buffer `rope_pairs`), and the same value dims for v and o's columns; o's
rows give the next K, then gate/up rows (summed scores) and down's rows.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError
from shared.families import Backbone
from shared.families.decoder import chunked_token_nll, first_token_classes, is_llama_style, softcapped
from shared.tasks import TaskSpec
from shared.tokens import LABEL_PAD
from side_train.kernels import Dropout, attention_with_dropout, compute_dtype
from side_train.model import (
    GenerationConfig,
    LadderStack,
    RMSNorm,
    SideConfig,
    SideNetwork,
    SideOptions,
    backbone_record,
    side_layers,
)
from side_train.prune import copy_slice, top_rows


def activation(name: str):
    """transformers' activation function of that name (the backbone's hidden_act / hidden_activation)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise UserError(f"the backbone's activation {name!r} is not supported")
    return ACT2FN[name]


@dataclass(kw_only=True)
class DecoderSideConfig(SideConfig):
    layer_fields: ClassVar[tuple[str, ...]] = ("decoder_layers",)

    family: str = "decoder"
    num_kv_heads: int  # the backbone's
    backbone_head_dim: int
    backbone_d_ff: int
    num_backbone_layers: int
    decoder_layers: list[int] = field(default_factory=list)
    free_blocks: int = 0  # side blocks after the laddered ones, fed by no ladder (xLadder); block k mirrors laddered block k
    norm_eps: float = 1e-6
    norm_offset: bool = False  # Gemma: x̂ (1 + w)
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP too
    qk_norm: bool = False  # Qwen3, Gemma 3
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"
    attention_scaling: float = 0.0  # the backbone's q.k multiplier (0: head_dim^-0.5)
    attn_softcap: float | None = None  # Gemma 2
    final_softcap: float | None = None  # Gemma 2
    layer_windows: list[int | None] = field(default_factory=list)  # per backbone layer: sliding window or None
    layer_rope: list[str] = field(default_factory=list)  # per backbone layer: key into rope_inv_freq
    rope_inv_freq: dict[str, list[float]] = field(default_factory=dict)  # the backbone's frequencies, head_dim / 2 each
    rope_scaling: dict[str, float] = field(default_factory=dict)  # cos/sin factor per rope kind (1.0 but for YaRN and kin)
    head: str = "words"  # "words": label words through the LM head; "last": a head on the last real token; "lm": all tokens
    merge_final: bool = False  # QST's gated mix of the backbone's final normed state before the head
    final_norm_weight: list[float] = field(default_factory=list)  # merge_final: the backbone's final norm (frozen)
    candidate_tokens: list[list[int]] = field(default_factory=list)  # each label word's token ids
    candidate_values: list[float] = field(default_factory=list)
    vocab_size: int = 0
    text_model: str = "model"  # where the backbone's blocks are (state dict prefix)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def group_reduction(self) -> int:
        return math.gcd(self.reduction, self.num_kv_heads)

    @property
    def side_kv_heads(self) -> int:
        return self.num_kv_heads // self.group_reduction

    @property
    def side_heads(self) -> int:
        return self.side_kv_heads * self.group_size

    @property
    def head_dim(self) -> int:
        return self.backbone_head_dim // (self.reduction // self.group_reduction)

    @property
    def d_ff(self) -> int:
        return self.backbone_d_ff // self.reduction

    @property
    def block_layers(self) -> list[int]:
        """The backbone layer each side block is built and initialized from: the laddered blocks', then
        for free block k that of laddered block k (mod their count)."""
        n = len(self.decoder_layers)
        return list(self.decoder_layers) + [self.decoder_layers[k % n] for k in range(self.free_blocks)]

    @property
    def vocabulary(self) -> list[int]:
        """The candidates' distinct tokens, in order of first use: the LM head rows the network keeps."""
        return list(dict.fromkeys(t for word in self.candidate_tokens for t in word))

    def stack_layers(self) -> dict[str, list[int]]:
        return {"decoder": self.decoder_layers, "candidates": self.decoder_layers}

    def check(self) -> None:
        super().check()
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        head_reduction = self.reduction // self.group_reduction
        if self.backbone_d_ff % self.reduction:
            raise UserError(f"--reduction {self.reduction} does not divide the backbone's d_ff = {self.backbone_d_ff}; pick a divisor")
        if self.backbone_head_dim % head_reduction or self.head_dim % 2:
            raise UserError(f"--reduction {self.reduction} leaves head dim {self.backbone_head_dim}/{head_reduction}, "
                            "which must be a whole, even number; pick another reduction")
        if self.head not in ("words", "last", "lm"):
            raise UserError(f"unknown decoder head {self.head!r}; use words, last or lm")
        if self.head == "words" and not self.candidate_tokens:
            raise UserError("label-word scoring needs label words; this task has none (regression uses the last-token head)")
        if self.free_blocks < 0:
            raise UserError(f"--free-blocks must be 0 or more, got {self.free_blocks}")
        layers = self.decoder_layers
        if not layers:
            raise UserError("the side decoder has no layers; give --side-layers or a smaller --drop-layers")
        if min(layers) < 0 or max(layers) >= self.num_backbone_layers or sorted(set(layers)) != list(layers):
            raise UserError(f"side layers {layers} must be increasing block indices in 0..{self.num_backbone_layers - 1}")
        if self.merge_final and layers[-1] != self.num_backbone_layers - 1:
            raise UserError(f"--merge-final mixes in the last backbone block's output, so block {self.num_backbone_layers - 1} "
                            "must feed a side block; add it to --side-layers")
        if self.merge_final and len(self.final_norm_weight) != self.backbone_d:
            raise UserError("--merge-final needs the backbone's final norm weights; build the config with config_for")


def make_norm(cfg: DecoderSideConfig, width: int) -> RMSNorm:
    """An RMSNorm of the backbone's form (Gemma: 1 + w)."""
    return OffsetRMSNorm(width, cfg.norm_eps) if cfg.norm_offset else RMSNorm(width, cfg.norm_eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x̂ (1 + w), w starting at 0."""

    def __init__(self, d: int, eps: float):
        super().__init__(d, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(compute_dtype(x.device, x.dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's halves (transformers' rotary convention)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class DecoderAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings at the backbone's frequencies of `layer`."""

    def __init__(self, cfg: DecoderSideConfig, layer: int):
        super().__init__()
        d, hd = cfg.d, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.side_heads, cfg.side_kv_heads, hd
        self.q = nn.Linear(d, self.heads * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(d, self.kv_heads * hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(d, self.kv_heads * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.heads * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, hd), make_norm(cfg, hd)
        # scores are q.k times the backbone's multiplier, rescaled for the narrower head: (base * hd' / hd)^-0.5
        base = cfg.attention_scaling or cfg.backbone_head_dim**-0.5
        self.scale = base * math.sqrt(cfg.backbone_head_dim / hd)
        self.softcap, self.dropout = cfg.attn_softcap, cfg.attention_p
        self.window = cfg.layer_windows[layer] if cfg.layer_windows else None
        kind = cfg.layer_rope[layer] if cfg.layer_rope else "default"
        self.register_buffer("inv_freq", torch.tensor(cfg.rope_inv_freq[kind], dtype=torch.float32), persistent=False)
        self.rope_factor = cfg.rope_scaling.get(kind, 1.0)
        # which of the backbone's rotary pairs the head's dims are (evenly spaced: plain RoPE at the side's head dim)
        step = cfg.backbone_head_dim // hd
        self.register_buffer("rope_pairs", torch.arange(0, cfg.backbone_head_dim // 2, step, dtype=torch.long)[: hd // 2])

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of integer `positions`: [n, head_dim] for [n], [B, 1, n, head_dim] for [B, n] (one row each)."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)[self.rope_pairs]
        emb = torch.cat([freqs, freqs], dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]
        return (emb.cos() * self.rope_factor).to(dtype), (emb.sin() * self.rope_factor).to(dtype)

    def project(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, n, hd], and k, v [B, KV, n, hd] of x [B, n, d], rotated at `positions` ([n] or per row
        [B, n]; default 0 .. n - 1)."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary(torch.arange(n, device=x.device) if positions is None else positions, q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, d]; mask additive [B, 1, L, L] (causal, key padding and this layer's window)."""
        q, k, v = self.project(x)
        return self.attend(q, k, v, mask)

    def step(self, x: torch.Tensor, cache: LayerKV, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Generation: x [B, n, d] at per-row `positions` [B, n] (`real` [B, n]: False on padding)
        against the cached keys and values and their own; the cache gains them (a sliding layer keeps
        only the keys its window still reaches). A padding query sees every key: its output is unused."""
        q, k, v = self.project(x, positions)
        cache.append(k, v, positions, real)
        query, key = positions[:, :, None], cache.positions[:, None, :]
        keep = (key <= query) & cache.real[:, None, :]
        if self.window:
            keep = keep & (query - key < self.window)
        keep = keep | ~real[:, :, None]
        mask = torch.zeros(keep.shape, device=x.device).masked_fill(~keep, torch.finfo(torch.float32).min)[:, None]
        out = self.attend(q, cache.k, cache.v, mask)
        if self.window:
            cache.keep_last(self.window - 1)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of rotated q [B, H, n, hd] over k, v [B, KV, m, hd] with the additive mask [B, 1, n, m]."""
        b, _, n, _ = q.shape
        if self.heads != self.kv_heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        p = self.dropout if self.training else 0.0
        if self.softcap:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap + mask.to(scores.dtype)
            probs = scores.softmax(-1)
            out = (F.dropout(probs, p) if p else probs) @ v
        elif p and not q.is_cuda:
            out = attention_with_dropout(q, k, v, mask, None, self.scale, p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=p, scale=self.scale)
        return self.o(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class DecoderSideBlock(nn.Module):
    """A thin block of the backbone's kind: pre-norm attention and gated MLP (Gemma 2/3: sandwich norms)."""

    def __init__(self, cfg: DecoderSideConfig, layer: int):
        super().__init__()
        self.input_norm = make_norm(cfg, cfg.d)
        self.attn = DecoderAttention(cfg, layer)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.post_attn_norm = make_norm(cfg, cfg.d)
            self.post_ff_norm = make_norm(cfg, cfg.d)
        self.pre_ff_norm = make_norm(cfg, cfg.d)
        self.gate = nn.Linear(cfg.d, cfg.d_ff, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.d, cfg.d_ff, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)
        self.drop = Dropout(cfg.dropout)

    def forward(self, s: torch.Tensor, full_mask: torch.Tensor, sliding_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """s [B, L, d]; the additive causal masks without and with the sliding window (`context`: unused)."""
        return self.feed_forward(s, self.attn(self.input_norm(s), sliding_mask if self.attn.window else full_mask))

    def step(self, s: torch.Tensor, cache: LayerKV, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Generation: the block on new positions with its attention's KV cache (see `DecoderAttention.step`)."""
        return self.feed_forward(s, self.attn.step(self.input_norm(s), cache, positions, real))

    def start_as_identity(self) -> None:
        """Zero both residual branches' outputs: the attention output and the MLP's down-projection, or
        with sandwich norms the scale of the norms after them (a zero projection before an RMSNorm would
        come out at full scale after one step)."""
        with torch.no_grad():
            if self.sandwich:
                for norm in (self.post_attn_norm, self.post_ff_norm):
                    norm.weight.fill_(-1.0 if isinstance(norm, OffsetRMSNorm) else 0.0)
                return
            for linear in (self.attn.o, self.down):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()

    def feed_forward(self, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The rest of the block after attention's output h."""
        s = s + self.drop(self.post_attn_norm(h) if self.sandwich else h)
        h = self.pre_ff_norm(s)
        h = self.down(self.drop(self.act(self.gate(h)) * self.up(h)))
        return s + self.drop(self.post_ff_norm(h) if self.sandwich else h)


def causal_mask(mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[B, L] bool -> additive [B, 1, L, L]: key i <= query j (and j - i < window), real keys only."""
    n = mask.shape[1]
    query = torch.arange(n, device=mask.device)[:, None]
    key = torch.arange(n, device=mask.device)[None, :]
    keep = key <= query
    if window:
        keep = keep & (query - key < window)
    keep = keep[None, None] & mask[:, None, None, :]
    return torch.zeros(keep.shape, device=mask.device).masked_fill(~keep, torch.finfo(torch.float32).min)


class DecoderLadderStack(LadderStack):
    """The side decoder: ladders, gates, thin blocks (each of its backbone layer's kind), a final norm."""

    def __init__(self, cfg: DecoderSideConfig):
        super().__init__(cfg, cfg.decoder_layers, [DecoderSideBlock(cfg, i) for i in cfg.block_layers], make_norm(cfg, cfg.d))
        windows = {cfg.layer_windows[i] for i in cfg.block_layers if cfg.layer_windows and cfg.layer_windows[i]}
        if len(windows) > 1:
            raise UserError(f"the backbone's layers have several sliding windows ({sorted(windows)}); one is supported")
        self.window = windows.pop() if windows else None

    def block_inputs(self, mask: torch.Tensor, context_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(causal mask, causal mask with the sliding window) for every block."""
        full = causal_mask(mask)
        return full, causal_mask(mask, self.window) if self.window else full

    def step(self, states: torch.Tensor, cache: SideKVCache, real: torch.Tensor | None = None) -> torch.Tensor:
        """Generation: side states [B, n, d] of the n new positions' ladder inputs [B, n, 1 + layers, D],
        continuing the sequences `cache` holds; as `forward` on each whole sequence, at those positions.
        `real` [B, n] (default all True) is False on padding, which takes no position: left padding, or right
        padding in a sequence's last step (label-word scoring), after which a sliding layer's cache is not reused."""
        b, n = states.shape[:2]
        if real is None:
            real = torch.ones(b, n, dtype=torch.bool, device=states.device)
        if not cache.layers:
            cache.layers = [LayerKV() for _ in self.blocks]
            cache.seen = torch.zeros(b, dtype=torch.long, device=states.device)
        positions = (cache.seen[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
        s = self.ladder(0, states[:, :, 0], self.drop)
        for j, block in enumerate(self.blocks):
            if j < len(self.layers):
                mu = torch.sigmoid(self.gate_alpha[j] / self.cfg.gate_temperature)
                s = mu * s + (1 - mu) * self.ladder(j + 1, states[:, :, j + 1])
            s = block.step(s, cache.layers[j], positions, real)
        cache.length += n
        cache.seen = cache.seen + real.long().sum(1)
        return self.drop(self.final_norm(s))


class LayerKV:
    """One side block's cached attention keys (rotated) and values [B, KV, m, hd], their positions [B, m]
    and whether each is a real token [B, m] (False: padding)."""

    def __init__(self):
        self.k = self.v = self.positions = self.real = None

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> None:
        if self.k is None:
            self.k, self.v, self.positions, self.real = k, v, positions, real
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.positions, self.real = torch.cat([self.positions, positions], 1), torch.cat([self.real, real], 1)

    def keep_last(self, m: int) -> None:
        """Drop all but the last m columns (every row's last m tokens: a sliding window's next queries
        reach no further back where padding is only at the start, as every step but a last right-padded one)."""
        drop = self.positions.shape[1] - m
        if drop > 0:
            self.k, self.v = self.k[:, :, drop:], self.v[:, :, drop:]
            self.positions, self.real = self.positions[:, drop:], self.real[:, drop:]


@dataclass
class SideKVCache:
    """The side decoder's generation cache: per block its `LayerKV`; the columns fed so far (`length`)
    and each row's real tokens among them (`seen` [B])."""

    length: int = 0
    layers: list[LayerKV] = field(default_factory=list)
    seen: torch.Tensor | None = None

    def repeat_rows(self, k: int) -> None:
        """Each row k times in a row (row r becomes rows r k .. r k + k - 1): k continuations of each sequence."""
        if self.seen is None:
            raise ValueError("repeat_rows needs a filled cache: step the prompts first")
        for layer in self.layers:
            layer.k, layer.v = layer.k.repeat_interleave(k, 0), layer.v.repeat_interleave(k, 0)
            layer.positions, layer.real = layer.positions.repeat_interleave(k, 0), layer.real.repeat_interleave(k, 0)
        self.seen = self.seen.repeat_interleave(k, 0)


class DecoderSideNetwork(SideNetwork):
    config_class = DecoderSideConfig
    needs_lm_head = True
    train_stacks = ("decoder",)
    eval_stacks = ("decoder", "candidates")
    can_generate = True  # label words, greedy-generated with the live backbone (--eval generate)

    def __init__(self, cfg: DecoderSideConfig, lm_head: torch.Tensor):
        super().__init__(cfg)
        self.decoder = DecoderLadderStack(cfg)
        self.upsample = nn.Linear(cfg.d, cfg.backbone_d)
        if lm_head is None:
            raise ValueError("a decoder side network needs the backbone's LM head")
        vocabulary = cfg.vocabulary
        if cfg.head == "lm":  # the whole frozen head, multiplied a chunk of tokens at a time
            rows = lm_head
        else:  # only the candidates' rows of the frozen head [V_c, D]: the whole vocabulary is never multiplied
            rows = lm_head[torch.tensor(vocabulary, dtype=torch.long)] if vocabulary else lm_head[:0]
        self.register_buffer("lm_head", rows.detach().float().clone(), persistent=False)
        if cfg.merge_final:
            self.merge_gate = nn.Parameter(torch.full((cfg.backbone_d,), 1.0))  # σ(z): the backbone's share, per channel
            self.register_buffer("final_norm_weight", torch.tensor(cfg.final_norm_weight, dtype=torch.float32), persistent=False)
        self.firsts, self.first_class = first_token_classes(cfg.candidate_tokens) if cfg.candidate_tokens else ([], [])
        position = {t: i for i, t in enumerate(vocabulary)}
        self.register_buffer("first_rows", torch.tensor([position[t] for t in self.firsts], dtype=torch.long), persistent=False)
        self.register_buffer("first_class_of", torch.tensor(self.first_class, dtype=torch.long), persistent=False)
        self.register_buffer("vocab_ids", torch.tensor(vocabulary, dtype=torch.long), persistent=False)
        if cfg.head == "last":
            self.head_drop = Dropout(cfg.dropout)
            self.head = nn.Linear(cfg.backbone_d, cfg.num_labels)

    @classmethod
    def config_for(cls, backbone: Backbone, spec: TaskSpec, options: SideOptions) -> DecoderSideConfig:
        """Size the side network from the backbone's loaded blocks and the user's options."""
        options.check()
        c, layers = backbone.config, backbone.layers
        if not is_llama_style(layers[0]):
            raise UserError(f"the decoder side network builds Llama-style blocks; {c.model_type!r} has another layout")
        if options.pooling == "cls":
            raise UserError("a causal LM has no [CLS] token; use --pooling last (a head on the last token) or the label words")
        if spec.label_kind == "lm":
            if options.pooling == "last":
                raise UserError("--pooling last picks a classification head; an instruction task trains the LM head "
                                "on every response token: drop --pooling")
            head = "lm"
        else:
            head = "last" if spec.label_kind == "regression" or options.pooling == "last" else "words"
        words = backbone.candidate_token_ids(spec) if spec.label_kind == "class" else []
        if head == "words":
            firsts = [w[0] for w in words]
            if len(set(firsts)) < len(firsts):
                print("label words share a first token: training cannot tell them apart, only evaluation scores their "
                      "continuations (use other label words, or --pooling last)", file=sys.stderr)
        attn, layer0 = layers[0].self_attn, layers[0]
        windows, kinds, inv_freq, factors = backbone_rope_and_windows(backbone)
        cfg = DecoderSideConfig(
            backbone_d=int(c.hidden_size), num_heads=int(c.num_attention_heads), num_kv_heads=int(c.num_key_value_heads),
            backbone_head_dim=attn.head_dim, backbone_d_ff=int(c.intermediate_size), num_backbone_layers=int(c.num_hidden_layers),
            reduction=options.reduction, dropout=options.dropout, attention_dropout=options.attention_dropout,
            norm_eps=float(layer0.input_layernorm.variance_epsilon if hasattr(layer0.input_layernorm, "variance_epsilon")
                           else layer0.input_layernorm.eps),
            norm_offset=norm_has_offset(layer0.input_layernorm), sandwich_norms=hasattr(layer0, "pre_feedforward_layernorm"),
            qk_norm=hasattr(attn, "q_norm"), qkv_bias=attn.q_proj.bias is not None, o_bias=attn.o_proj.bias is not None,
            mlp_bias=layer0.mlp.gate_proj.bias is not None,
            activation=getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "silu"),
            attention_scaling=float(attn.scaling), attn_softcap=getattr(c, "attn_logit_softcapping", None) or None,
            final_softcap=backbone.final_logit_softcap(), layer_windows=windows, layer_rope=kinds, rope_inv_freq=inv_freq,
            rope_scaling=factors, head=head, candidate_tokens=words if head == "words" else [],
            candidate_values=[float(i) for i in range(len(words))] if head == "words" else [],
            num_labels=spec.num_labels, label_kind=spec.label_kind, vocab_size=int(c.vocab_size),
            text_model=backbone.text_model_name, merge_final=bool(getattr(options, "merge_final", False)),
            final_norm_weight=[float(w) for w in backbone.final_normed_weight().detach().float().cpu()]
            if getattr(options, "merge_final", False) else [],
            decoder_layers=side_layers(int(c.num_hidden_layers), options.drop_layers, options.side_layers),
            free_blocks=options.free_blocks, backbone=backbone_record(backbone),
        )
        cfg.check()
        return cfg

    @classmethod
    def load_lm_head(cls, cfg: DecoderSideConfig) -> torch.Tensor:
        from shared.backbones import DEFAULT_MODEL
        from shared.weights import load_tensor

        name = cfg.backbone.get("name")
        return load_tensor(None if name == DEFAULT_MODEL else name, cfg.backbone.get("revision"), cfg.backbone["lm_head_tensors"])

    # --- forward passes -------------------------------------------------------------------

    def output(self, s: torch.Tensor, backbone_last: torch.Tensor | None = None) -> torch.Tensor:
        """What enters the head [..., D]: up(s), or with --merge-final (1 - σ(z)) up(s) + σ(z) norm(h_L), where
        `backbone_last` [..., D] is the last backbone block's output at the same positions."""
        hidden = self.upsample(s)
        if not self.cfg.merge_final:
            return hidden
        if backbone_last is None:
            raise ValueError("--merge-final needs the backbone's last block output")
        x = backbone_last.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        normed = normed * ((1.0 + self.final_norm_weight) if self.cfg.norm_offset else self.final_norm_weight)
        gate = torch.sigmoid(self.merge_gate)
        return ((1 - gate) * hidden + gate * normed).to(hidden.dtype)

    def token_logits(self, s: torch.Tensor, rows: torch.Tensor, backbone_last: torch.Tensor | None = None) -> torch.Tensor:
        """Frozen-head logits [..., len(rows)] of side states s [..., d] for the kept head rows `rows`
        (`backbone_last`: the last backbone block's output there, for --merge-final)."""
        hidden = self.output(s, backbone_last)
        return softcapped(hidden @ self.lm_head[rows].to(hidden.dtype).t(), self.cfg.final_softcap)

    @staticmethod
    def last_positions(mask: torch.Tensor) -> torch.Tensor:
        """Index of each sequence's last real token (right padding)."""
        return mask.sum(1) - 1

    def prompt_last(self, batch) -> torch.Tensor:
        """The side state of each prompt's last real token [B, d]."""
        return self.prompt_last_pair(batch)[0]

    def prompt_last_pair(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the side state [B, d], the last backbone block's output [B, D]) at each prompt's last real token."""
        mask = batch.masks["decoder"]
        states = batch.states["decoder"]
        s = self.decoder(states, mask)
        rows, last = torch.arange(len(s), device=s.device), self.last_positions(mask).to(s.device)
        return s[rows, last], states[rows.to(states.device), last.to(states.device), -1].to(s.device)

    def head_logits(self, batch) -> torch.Tensor:
        """The last-token head's logits [B, num_labels] (float32)."""
        last = self.output(*self.prompt_last_pair(batch))
        return self.head(self.head_drop(last)).float()

    def response_nll(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction tasks: each labelled (response) position's next-token cross-entropy [N] through the
        whole frozen head in chunks, and the example each belongs to [N]."""
        states, mask = batch.states["decoder"], batch.masks["decoder"]
        s = self.decoder(states, mask)
        targets = batch.targets["decoder"].to(s.device)
        keep = targets != LABEL_PAD
        last = states[:, :, -1][keep.to(states.device)].to(s.device) if self.cfg.merge_final else None
        hidden = self.output(s[keep], last)
        nll = chunked_token_nll(hidden, self.lm_head, targets[keep], softcap=self.cfg.final_softcap)
        rows = torch.arange(len(targets), device=s.device)[:, None].expand_as(targets)[keep]
        return nll, rows

    @torch.no_grad()
    def token_losses(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction tasks: per example the summed response-token cross-entropy and the response tokens [B] (float64)."""
        nll, rows = self.response_nll(batch)
        total = torch.zeros(batch.size, dtype=torch.float64, device=nll.device).index_add(0, rows, nll.double())
        count = torch.zeros(batch.size, dtype=torch.float64, device=nll.device).index_add(0, rows, torch.ones_like(nll, dtype=torch.float64))
        return total.cpu(), count.cpu()

    def loss(self, batch) -> torch.Tensor:
        if self.cfg.head == "lm":
            nll, _ = self.response_nll(batch)
            return nll.sum() / max(1, nll.numel())  # a batch without response tokens: 0, no gradient
        if self.cfg.head == "last":
            logits = self.head_logits(batch)
            if self.cfg.label_kind == "regression":
                return F.mse_loss(logits.squeeze(-1), batch.labels.float())
            return F.cross_entropy(logits, batch.labels.long())
        s_last, h_last = self.prompt_last_pair(batch)
        logits = self.token_logits(s_last, self.first_rows, h_last).float()
        target = self.first_class_of[batch.labels.long().to(logits.device)]
        return F.cross_entropy(logits, target)

    def loss_weight(self, batch) -> torch.Tensor | int:
        """The terms `loss` averages: instruction tasks' response tokens, else the examples."""
        if self.cfg.head == "lm":
            return (batch.targets["decoder"] != LABEL_PAD).sum()
        return batch.size

    @torch.no_grad()
    def score_candidates(self, batch) -> torch.Tensor:
        """Each label word's log-probability [B, K]: its first token over the first tokens at the prompt's
        last position, each later token over all the candidates' tokens, teacher-forced after the prompt.
        Words of 2+ tokens: the prompt runs once through the side decoder, filling its KV cache, and each
        word's tokens continue a copy of that cache (never the prompt once per word)."""
        words = self.cfg.candidate_tokens
        k = len(words)
        several = max(len(w) for w in words) > 1
        if several:
            prompt, real = left_aligned(batch.states["decoder"], batch.masks["decoder"])
            cache = SideKVCache()
            s_last = self.decoder.step(prompt, cache, real)[:, -1]  # left-aligned: the last column is the last real token
            h_last = prompt[:, -1, -1].to(s_last.device)
        else:
            s_last, h_last = self.prompt_last_pair(batch)
        first_logp = self.token_logits(s_last, self.first_rows, h_last).float().log_softmax(-1)  # [B, F]
        scores = first_logp[:, self.first_class_of]  # [B, K]
        if not several:
            return scores
        cache.repeat_rows(k)  # row r: candidate r % k of example r // k, as the candidates stack is laid out
        cand, cand_real = batch.states["candidates"], batch.masks["candidates"]  # [B K, M, P, D], right padding
        at = self.decoder.step(cand, cache, cand_real.to(cand.device))  # [B K, M, d]
        targets = batch.targets["candidates"].to(at.device)  # [B K, M]: the next token of the word at each of its positions
        h_at = cand[:, :, -1].to(at.device) if self.cfg.merge_final else None
        logp = self.token_logits(at, torch.arange(len(self.vocab_ids), device=at.device), h_at).float().log_softmax(-1)
        vocab_index = vocabulary_index(self.vocab_ids, targets.clamp(min=0))
        token = logp.gather(-1, vocab_index.unsqueeze(-1)).squeeze(-1) * (targets >= 0)
        return scores + token.sum(-1).view(-1, k).to(scores.device)

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        """Label values; instruction tasks: each example's mean response-token cross-entropy (NaN without any)."""
        if self.cfg.head == "lm":
            total, count = self.token_losses(batch)
            return torch.where(count > 0, total / count.clamp(min=1), torch.nan)
        if self.cfg.head == "last":
            logits = self.head_logits(batch)
            return (logits.squeeze(-1) if self.cfg.label_kind == "regression" else logits.argmax(-1)).double().cpu()
        best = self.score_candidates(batch).argmax(-1).cpu()
        return torch.tensor(self.cfg.candidate_values, dtype=torch.float64)[best]

    # --- generation -----------------------------------------------------------------------

    def full_head(self, backbone: Backbone) -> torch.Tensor:
        """The whole frozen head [V, D] (float32) generation multiplies at the last position."""
        if self.cfg.head == "lm":
            return self.lm_head
        return backbone.lm_head()[0].detach().float().to(self.lm_head.device)

    def vocabulary_logits(self, s_last: torch.Tensor, h_last: torch.Tensor | None, head: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary [B, V] (float32) of side states [B, d] (with the config's softcap)."""
        hidden = self.output(s_last, h_last).float()
        return softcapped(hidden @ head.t(), self.cfg.final_softcap)

    def ladder_inputs(self, states: torch.Tensor) -> torch.Tensor:
        """The side decoder's states [B, n, 1 + layers, D] of a backbone's [B, n, 1 + blocks, D], rounded to
        bfloat16 as the cache stores them, on this network's device."""
        positions = [0] + [i + 1 for i in self.cfg.decoder_layers]
        return states[:, :, positions].to(torch.bfloat16).to(self.lm_head.device)

    def check_generation(self, prompts: list[list[int]], settings: GenerationConfig) -> None:
        if self.cfg.head == "last":
            raise UserError("this side network was trained with a last-token head: it has no language-model output "
                            "to generate from; generate with a label-word or instruction-tuned run")
        if not prompts or any(not p for p in prompts):
            raise UserError("the prompt is empty and the tokenizer adds no start token; give a text to continue")
        settings.check()

    @torch.no_grad()
    def generate_ids(self, backbone: Backbone, prompt: list[int], settings: GenerationConfig, use_cache: bool = True,
                     keep_logits: bool = False, head: torch.Tensor | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """Continue one prompt's ids: (the new ids, stopping after an end token, and with `keep_logits` each
        step's logits [V]). `use_cache`: `generate_batch` of this one prompt (the backbone and the side decoder
        each keep their KV cache and run only the new token per step); without it every step recomputes the
        whole sequence (the reference). `head`: `full_head(backbone)`, built once by callers that reuse it."""
        if use_cache:
            return self.generate_batch(backbone, [prompt], settings, keep_logits, head)[0]
        self.check_generation([prompt], settings)
        self.eval()
        head = self.full_head(backbone) if head is None else head
        stops = set(backbone.stop_token_ids())
        generator = torch.Generator().manual_seed(settings.seed)
        ids = list(prompt)
        new: list[int] = []
        logits_seen: list[torch.Tensor] = []
        for _ in range(settings.max_new_tokens):
            with torch.inference_mode():
                full = backbone.run_blocks(torch.tensor([ids], device=backbone.device), None)
            states = self.ladder_inputs(full)
            s = self.decoder(states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device))[:, -1]
            logits = self.vocabulary_logits(s, states[:, -1, -1] if self.cfg.merge_final else None, head)[0]
            if keep_logits:
                logits_seen.append(logits.cpu())
            token = next_token(logits, settings, generator)
            if token in stops:
                break
            new.append(token)
            ids.append(token)
        return new, logits_seen

    @torch.no_grad()
    def generate_batch(self, backbone: Backbone, prompts: list[list[int]], settings: GenerationConfig,
                       keep_logits: bool = False, head: torch.Tensor | None = None) -> list[tuple[list[int], list[torch.Tensor]]]:
        """Continue several prompts together, left-padded, with the backbone's and the side decoder's KV
        caches; each step runs only the new tokens. For each prompt: (its new ids, stopping after an end
        token, and with `keep_logits` each step's logits [V]), as it would alone up to float rounding. Each
        row samples from its own generator seeded with `settings.seed`, as a lone prompt does."""
        self.check_generation(prompts, settings)
        self.eval()
        head = self.full_head(backbone) if head is None else head
        stops = set(backbone.stop_token_ids())
        device, rows, width = backbone.device, len(prompts), max(len(p) for p in prompts)
        step_ids = torch.tensor([[p[0]] * (width - len(p)) + list(p) for p in prompts], device=device)  # padding: masked
        step_real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        seen_mask = step_real.long()  # the backbone's attention mask over every column fed so far
        generators = [torch.Generator().manual_seed(settings.seed) for _ in prompts]
        out: list[tuple[list[int], list[torch.Tensor]]] = [([], []) for _ in prompts]
        running = [True] * rows
        past, side_cache = None, SideKVCache()
        for _ in range(settings.max_new_tokens):
            positions = (seen_mask.cumsum(1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]  # each row counts its real tokens
            full, past = backbone.step_states(step_ids, past, seen_mask, positions)  # an all-ones mask is dropped
            states = self.ladder_inputs(full)
            s = self.decoder.step(states, side_cache, step_real.to(states.device))[:, -1]
            logits = self.vocabulary_logits(s, states[:, -1, -1] if self.cfg.merge_final else None, head)
            tokens = []
            for row in range(rows):
                token = prompts[row][-1]  # a finished row is fed anything: rows never see each other
                if running[row]:
                    if keep_logits:
                        out[row][1].append(logits[row].cpu())
                    token = next_token(logits[row], settings, generators[row])
                    if token in stops:
                        running[row] = False
                    else:
                        out[row][0].append(token)
                tokens.append(token)
            if not any(running):
                break
            step_ids = torch.tensor(tokens, device=device)[:, None]
            step_real = torch.ones(rows, 1, dtype=torch.bool, device=device)
            seen_mask = torch.cat([seen_mask, torch.ones(rows, 1, dtype=torch.long, device=device)], 1)
        return out

    def generate_many(self, backbone: Backbone, prompts: list[list[int]], settings: GenerationConfig,
                      head: torch.Tensor | None = None, progress: str | None = None) -> list[list[int]]:
        """The new ids of every prompt, `settings.batch_size` prompts of similar length at a time
        (`progress`: a tqdm label, shown for four prompts or more)."""
        from tqdm import tqdm

        head = self.full_head(backbone) if head is None else head
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        new: list[list[int]] = [[] for _ in prompts]
        bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None or len(prompts) < 4)
        for at in range(0, len(order), settings.batch_size):
            chunk = order[at : at + settings.batch_size]
            for i, (ids, _) in zip(chunk, self.generate_batch(backbone, [prompts[i] for i in chunk], settings, head=head)):
                new[i] = ids
            bar.update(len(chunk))
        bar.close()
        return new

    @torch.no_grad()
    def generate_values(self, source, rows, device: torch.device, spec: TaskSpec) -> np.ndarray:
        """--eval generate: greedy continuations of the prompts (as many tokens as the longest label word),
        each the label whose word's tokens it starts with (the longest such word), else -1 (counted wrong)."""
        backbone = getattr(source, "backbone", None)
        if backbone is None or backbone.model is None or getattr(source, "plan", None) is None:
            raise UserError("--eval generate needs the live backbone (add --live)")
        if self.cfg.head != "words":
            raise UserError(f"--eval generate reads label words; this side network has a {self.cfg.head!r} head: "
                            "drop --eval generate")
        words = self.cfg.candidate_tokens
        settings = GenerationConfig(max_new_tokens=max(len(w) for w in words))
        by_length = sorted(range(len(words)), key=lambda i: -len(words[i]))
        prompts = [source.plan.inputs["decoder"]["input_ids"][int(row)] for row in rows]
        values = []
        for new in self.generate_many(backbone, prompts, settings):
            match = next((i for i in by_length if new[: len(words[i])] == words[i]), None)
            values.append(-1.0 if match is None else self.cfg.candidate_values[match])
        return np.array(values, dtype=np.float64)

    def generate_texts(self, backbone: Backbone, inputs: list[list[str]], spec: TaskSpec, max_length: int,
                       settings: GenerationConfig) -> list[str]:
        """Generated continuations of raw inputs (instruction tasks: one prompt each; else the task's text
        fields, rendered with its prompt template), `settings.batch_size` prompts at a time."""
        prompts = [backbone.generation_prompt_ids(fields, spec, max_length) for fields in inputs]
        # one float32 copy of the whole head for every prompt
        new = self.generate_many(backbone, prompts, settings, self.full_head(backbone), progress="generate")
        return [backbone.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]

    # --- pruned init ----------------------------------------------------------------------

    def init_from_backbone(self, state: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict:
        """Prune a Llama-style backbone state dict into the side decoder; returns the kept indices per block."""
        cfg = self.cfg
        prefix = cfg.text_model
        K = top_rows(scores[f"{prefix}.embed_tokens.columns"], cfg.d)
        position = {layer: j for j, layer in enumerate(self.decoder.layers)}
        kept: dict = {}
        sandwich = cfg.sandwich_norms
        for i in range(cfg.num_backbone_layers):
            layer = f"{prefix}.layers.{i}"
            attention = f"{layer}.self_attn"
            groups, qk_dims, v_dims = select_heads(cfg, scores[f"{attention}.q_proj.rows"], scores[f"{attention}.k_proj.rows"],
                                                   scores[f"{attention}.v_proj.rows"])
            q_rows, kv_rows, kv_v_rows, o_cols = head_indices(cfg, groups, qk_dims, v_dims)
            K_att = top_rows(scores[f"{attention}.o_proj.rows"], cfg.d)
            K_ff = top_rows(scores[f"{layer}.mlp.gate_proj.rows"] + scores[f"{layer}.mlp.up_proj.rows"], cfg.d_ff)
            K_out = top_rows(scores[f"{layer}.mlp.down_proj.rows"], cfg.d)
            if i in position:
                block = self.decoder.blocks[position[i]]
                attn = block.attn

                def take(param, name, rows=None, cols=None):
                    copy_slice(param, state[name], rows=rows, cols=cols)

                take(block.input_norm.weight, f"{layer}.input_layernorm.weight", rows=K)
                for ours, theirs, rows in ((attn.q, "q_proj", q_rows), (attn.k, "k_proj", kv_rows), (attn.v, "v_proj", kv_v_rows)):
                    take(ours.weight, f"{attention}.{theirs}.weight", rows=rows, cols=K)
                    if ours.bias is not None:
                        take(ours.bias, f"{attention}.{theirs}.bias", rows=rows)
                take(attn.o.weight, f"{attention}.o_proj.weight", rows=K_att, cols=o_cols)
                if attn.o.bias is not None:
                    take(attn.o.bias, f"{attention}.o_proj.bias", rows=K_att)
                if cfg.qk_norm:
                    take(attn.q_norm.weight, f"{attention}.q_norm.weight", rows=qk_dims)
                    take(attn.k_norm.weight, f"{attention}.k_norm.weight", rows=qk_dims)
                with torch.no_grad():
                    attn.rope_pairs.copy_(qk_dims[: cfg.head_dim // 2])
                if sandwich:
                    take(block.post_attn_norm.weight, f"{layer}.post_attention_layernorm.weight", rows=K_att)
                    take(block.pre_ff_norm.weight, f"{layer}.pre_feedforward_layernorm.weight", rows=K_att)
                    take(block.post_ff_norm.weight, f"{layer}.post_feedforward_layernorm.weight", rows=K_out)
                else:
                    take(block.pre_ff_norm.weight, f"{layer}.post_attention_layernorm.weight", rows=K_att)
                for ours, theirs in ((block.gate, "gate_proj"), (block.up, "up_proj")):
                    take(ours.weight, f"{layer}.mlp.{theirs}.weight", rows=K_ff, cols=K_att)
                    if ours.bias is not None:
                        take(ours.bias, f"{layer}.mlp.{theirs}.bias", rows=K_ff)
                take(block.down.weight, f"{layer}.mlp.down_proj.weight", rows=K_out, cols=K_ff)
                if block.down.bias is not None:
                    take(block.down.bias, f"{layer}.mlp.down_proj.bias", rows=K_out)
            kept[f"decoder.{i}"] = {"in": K.clone(), "groups": groups, "qk_dims": qk_dims, "v_dims": v_dims, "mid": K_att,
                                    "ff": K_ff, "out": K_out}
            K = K_out
        copy_slice(self.decoder.final_norm.weight, state[f"{prefix}.norm.weight"], rows=K)
        self.init_free_blocks()
        return kept

    def random_init(self) -> None:
        super().random_init()
        self.init_free_blocks()

    def init_free_blocks(self) -> None:
        """Free block k starts as a copy of laddered block k (mod their count) whose two residual branches
        output zero, so it starts as the identity (LLaMA Pro's block expansion)."""
        blocks, n = self.decoder.blocks, len(self.cfg.decoder_layers)
        for k in range(self.cfg.free_blocks):
            blocks[n + k].load_state_dict(blocks[k % n].state_dict())
            blocks[n + k].start_as_identity()


def next_token(logits: torch.Tensor, settings: GenerationConfig, generator: torch.Generator) -> int:
    """The next token of logits [V]: the argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the top k and to the smallest set whose probability reaches top_p (drawn on the CPU)."""
    if settings.temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[0]:
        threshold = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = logits.softmax(-1)
    if settings.top_p < 1.0:
        order = probs.argsort(descending=True)
        sorted_probs = probs[order]
        outside = sorted_probs.cumsum(0) - sorted_probs >= settings.top_p  # the first token is always kept
        probs = probs.clone()
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs, 1, generator=generator))


def select_heads(cfg: DecoderSideConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept KV groups, q/k head dims as whole rotary pairs: first halves then second halves, v head dims),
    from per-row scores of q [H hd], k and v [KV hd]."""
    hd, groups = cfg.backbone_head_dim, cfg.num_kv_heads
    q = q.double().view(groups, cfg.group_size, hd)
    k, v = k.double().view(groups, hd), v.double().view(groups, hd)
    kept = top_rows(q.sum((1, 2)) + k.sum(1) + v.sum(1), cfg.side_kv_heads)
    qk = q[kept].sum((0, 1)) + k[kept].sum(0)
    pairs = top_rows(qk[: hd // 2] + qk[hd // 2 :], cfg.head_dim // 2)
    v_dims = top_rows(v[kept].sum(0), cfg.head_dim)
    return kept, torch.cat([pairs, pairs + hd // 2]), v_dims


def head_indices(cfg: DecoderSideConfig, groups: torch.Tensor, qk_dims: torch.Tensor, v_dims: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of q, of k, of v, and o's columns for the kept groups (query heads of a group stay together)."""
    hd, size = cfg.backbone_head_dim, cfg.group_size
    heads = (groups[:, None] * size + torch.arange(size)[None]).reshape(-1)  # the kept query heads, in order
    q_rows = (heads[:, None] * hd + qk_dims[None]).reshape(-1)
    k_rows = (groups[:, None] * hd + qk_dims[None]).reshape(-1)
    v_rows = (groups[:, None] * hd + v_dims[None]).reshape(-1)
    o_cols = (heads[:, None] * hd + v_dims[None]).reshape(-1)
    return q_rows, k_rows, v_rows, o_cols


def vocabulary_index(vocab_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Positions of `tokens` in `vocab_ids` (tokens outside it map to 0; callers mask them)."""
    match = tokens.unsqueeze(-1) == vocab_ids.to(tokens.device)
    return match.float().argmax(-1)


def left_aligned(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows [B, L, ...] (mask [B, L]) moved to the right end: (the rows left-padded, which
    columns are real [B, L]), the layout the side decoder's KV-cached `step` takes."""
    mask = mask.to(states.device)
    n = mask.shape[1]
    shift = n - mask.sum(1)  # each row's padding
    columns = torch.arange(n, device=states.device)[None]
    source = (columns - shift[:, None]) % n  # column i holds token i - shift; padding comes from the end
    return states[torch.arange(len(states), device=states.device)[:, None], source], columns >= shift[:, None]


def norm_has_offset(norm: nn.Module) -> bool:
    """Whether an RMSNorm scales by (1 + w) (Gemma) rather than w, by running it on a probe vector."""
    if norm.weight.is_meta:  # a meta-device model: a fresh norm of its class, as initialised, answers the same
        with torch.device("cpu"):
            norm = type(norm)(norm.weight.shape[0], getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    with torch.no_grad():
        x = torch.linspace(-1.0, 1.0, norm.weight.shape[0], dtype=torch.float32, device=norm.weight.device)[None]
        x = x.to(norm.weight.dtype)
        out = norm(x).float()
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        w = norm.weight.float()
        return bool((out - normed * (1 + w)).abs().max() < (out - normed * w).abs().max())


def backbone_rope_and_windows(backbone: Backbone) -> tuple[list[int | None], list[str], dict[str, list[float]], dict[str, float]]:
    """Per backbone layer its sliding window and rope kind, and each kind's frequencies and cos/sin factor,
    read from the loaded model (Gemma 3: per layer type; Mistral: one window for every layer)."""
    c, rotary = backbone.config, backbone.text_model.rotary_emb
    if any(t.is_meta for t in rotary.buffers()):  # a meta-device model (shape studies): the same frequencies, computed here
        with torch.device("cpu"):
            rotary = type(rotary)(config=c)
    windows, kinds, inv_freq, factors = [], [], {}, {}
    for layer in backbone.layers:
        attn = layer.self_attn
        if hasattr(attn, "sliding_window"):
            window = attn.sliding_window
        elif getattr(c, "layer_types", None):
            window = c.sliding_window if c.layer_types[len(windows)] == "sliding_attention" else None
        else:
            window = getattr(c, "sliding_window", None)
        windows.append(int(window) if window else None)
        kind = getattr(attn, "layer_type", None)
        if kind is None or not hasattr(rotary, f"{kind}_inv_freq"):
            kind = "default"
        kinds.append(kind)
        if kind not in inv_freq:
            freq = rotary.inv_freq if kind == "default" else getattr(rotary, f"{kind}_inv_freq")
            factor = rotary.attention_scaling if kind == "default" else getattr(rotary, f"{kind}_attention_scaling")
            inv_freq[kind] = [float(f) for f in freq.detach().double().cpu()]
            factors[kind] = float(factor if factor is not None else 1.0)
    return windows, kinds, inv_freq, factors


# --- baselines for side_train.compare ----------------------------------------------------------
# (imports here, not at the top, so that this section stays one appended block)

from shared.families.decoder import find_text_model  # noqa: E402
from side_train.baselines import BaselineModule, FamilyBaselines, TokenInputs, train_biases  # noqa: E402


def is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


class DecoderTuned(BaselineModule):
    """A (possibly modified or peft-wrapped) causal LM with the LST side network's task head:

    - "words": the label words scored through the LM head's candidate rows only, exactly as the
      side network scores them (training: cross-entropy over the words' distinct first tokens at
      the prompt's last position; evaluation: each word's log-probability, later tokens over all
      the candidates' tokens, teacher-forced after the prompt);
    - "last": a linear head on the last real token's final (normed) state.

    The states come from the backbone's text model (LoRA or adapters inside it, where added);
    prompt tuning's soft tokens (`prompt_tokens`, peft's `get_prompt`) are prepended to its input
    embeddings as peft does, and their positions dropped from the output."""

    def __init__(self, model: nn.Module, backbone: Backbone, spec: TaskSpec, head: str, prompt_tokens: int = 0,
                 dropout: float = 0.1):
        super().__init__()
        self.model = model  # registered: every tensor the method keeps
        self.parts = (backbone.text_model, backbone.model.get_output_embeddings())  # not registered again
        self.kind, self.label_kind, self.prompt_tokens = head, spec.label_kind, prompt_tokens
        self.softcap = backbone.final_logit_softcap()
        self.words = backbone.candidate_token_ids(spec) if head == "words" else []
        if head == "words" and not self.words:
            raise UserError("label-word scoring needs label words; this task has none (use --pooling last)")
        firsts, first_class = first_token_classes(self.words) if self.words else ([], [])
        vocabulary = list(dict.fromkeys(t for word in self.words for t in word))
        self.register_buffer("first_ids", torch.tensor(firsts, dtype=torch.long), persistent=False)
        self.register_buffer("first_class_of", torch.tensor(first_class, dtype=torch.long), persistent=False)
        self.register_buffer("vocab_ids", torch.tensor(vocabulary, dtype=torch.long), persistent=False)
        if head == "last":
            self.head_drop = nn.Dropout(dropout)
            self.head = nn.Linear(backbone.d_model, spec.num_labels)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The final-normed states [B, L, d] of the tokens (soft prompt positions removed)."""
        body = self.parts[0]
        if not self.prompt_tokens:
            return body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        embeds = body.embed_tokens(ids)  # scaled as the model scales it (Gemma)
        prompts = self.model.get_prompt(batch_size=len(ids)).to(embeds.dtype)
        embeds = torch.cat([prompts, embeds], dim=1)
        if mask is not None:
            mask = torch.cat([torch.ones(len(ids), self.prompt_tokens, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return body(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state[:, self.prompt_tokens :]

    def last_state(self, inputs: TokenInputs) -> torch.Tensor:
        """The final state of each prompt's last real token [B, d]."""
        stack = inputs.tokens["decoder"]
        mask = inputs.mask("decoder")
        if mask is None and stack["input_ids"].device.type == "meta":
            mask = stack["attention_mask"]  # without a mask transformers checks for packed sequences, reading values
        h = self.hidden(stack["input_ids"], mask)
        last = stack["attention_mask"].sum(1) - 1
        return h[torch.arange(len(h), device=h.device), last.to(h.device)]

    def token_logits(self, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The LM head's logits of `token_ids` only [..., len(token_ids)] (float32, the config's softcap)."""
        rows = self.parts[1].weight[token_ids.to(self.parts[1].weight.device)]
        logits = (h.to(rows.dtype) @ rows.t()).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def head_logits(self, inputs: TokenInputs) -> torch.Tensor:
        return self.head(self.head_drop(self.last_state(inputs))).float()

    def loss(self, inputs: TokenInputs) -> torch.Tensor:
        if self.kind == "last":
            logits = self.head_logits(inputs)
            if self.label_kind == "regression":
                return F.mse_loss(logits.squeeze(-1), inputs.labels.float())
            return F.cross_entropy(logits, inputs.labels.long())
        logits = self.token_logits(self.last_state(inputs), self.first_ids)
        return F.cross_entropy(logits, self.first_class_of[inputs.labels.long().to(logits.device)])

    @torch.no_grad()
    def score_candidates(self, inputs: TokenInputs) -> torch.Tensor:
        """Each label word's log-probability [B, K], as `DecoderSideNetwork.score_candidates` computes it."""
        k = len(self.words)
        scores = self.token_logits(self.last_state(inputs), self.first_ids).log_softmax(-1)[:, self.first_class_of]
        if max(len(w) for w in self.words) == 1:
            return scores
        prompt, cand = inputs.tokens["decoder"], inputs.tokens["candidates"]
        ids, targets = cand["input_ids"], cand["labels"]
        starts = prompt["attention_mask"].sum(1).repeat_interleave(k)
        lengths = cand["attention_mask"].sum(1)
        total = int((starts + lengths).max())
        packed = torch.zeros(len(ids), total, dtype=ids.dtype, device=ids.device)
        packed_mask = torch.zeros_like(packed)
        for r in range(len(ids)):  # example-major: row r is candidate r % k of example r // k
            n, m = int(starts[r]), int(lengths[r])
            packed[r, :n] = prompt["input_ids"][r // k, :n]
            packed[r, n : n + m] = ids[r, :m]
            packed_mask[r, : n + m] = 1
        h = self.hidden(packed, None if bool(packed_mask.all()) else packed_mask)
        index = (starts[:, None] + torch.arange(ids.shape[1], device=ids.device)[None]).clamp(max=total - 1)
        at = h[torch.arange(len(h), device=h.device)[:, None], index.to(h.device)]  # [B K, M, d]
        logp = self.token_logits(at, self.vocab_ids).log_softmax(-1)
        position = vocabulary_index(self.vocab_ids, targets.clamp(min=0)).to(logp.device)
        token = logp.gather(-1, position.unsqueeze(-1)).squeeze(-1) * (targets >= 0).to(logp.device)
        return scores + token.sum(-1).view(-1, k).to(scores.device)

    @torch.no_grad()
    def predict(self, inputs: TokenInputs) -> torch.Tensor:
        if self.kind == "last":
            logits = self.head_logits(inputs)
            return (logits.squeeze(-1) if self.label_kind == "regression" else logits.argmax(-1)).double().cpu()
        return self.score_candidates(inputs).argmax(-1).double().cpu()  # candidate j is class j


class DecoderBaselines(FamilyBaselines):
    """Decoder baselines with the LST side's head (label words, or the last token with `pooling="last"`);
    adapters after every block's attention output (o_proj) and MLP output (down_proj) projections;
    BitFit adds zero biases to the blocks' linear layers (Llama-style blocks have none) and trains
    them with the RMSNorms."""

    peft_task = "CAUSAL_LM"

    def random_model(self, config) -> nn.Module:
        """With eager attention: transformers' sdpa mask code reads tensor values, which the meta device
        has not (and a CPU step then saves the same tensors as a meta one)."""
        import transformers

        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")

    def adapter_sites(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        layers = find_text_model(model)[1].layers
        if not is_llama_style(layers[0]):
            raise UserError(f"adapters need Llama-style blocks (self_attn.o_proj, mlp.down_proj); {type(model).__name__} has others")
        return [site for layer in layers for site in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj"))]

    def bitfit(self, model: nn.Module) -> None:
        for module in find_text_model(model)[1].layers.modules():
            if isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, device=module.weight.device, dtype=module.weight.dtype))
        for module in model.modules():
            if is_rms_norm(module):
                module.requires_grad_(True)
        train_biases(model)

    def wrap(self, model: nn.Module, backbone: Backbone, spec: TaskSpec, prompt_tokens: int) -> BaselineModule:
        return self.wrap_with(model, backbone, spec, prompt_tokens)

    def wrap_with(self, model: nn.Module, backbone: Backbone, spec: TaskSpec, prompt_tokens: int,
                  options: SideOptions | None = None) -> BaselineModule:
        pooling = options.pooling if options is not None else "mean"
        if pooling == "cls":
            raise UserError("a causal LM has no [CLS] token; use --pooling last (a head on the last token) or the label words")
        head = "last" if spec.label_kind == "regression" or pooling == "last" else "words"
        return DecoderTuned(model, backbone, spec, head, prompt_tokens)


DecoderSideNetwork.baselines = DecoderBaselines()
