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
  real token. QST's gated merge of the backbone's final state is not implemented.

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

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError
from shared.families import Backbone
from shared.families.decoder import first_token_classes, is_llama_style
from shared.tasks import TaskSpec
from side_train.kernels import Dropout, attention_with_dropout, compute_dtype
from side_train.model import LadderStack, RMSNorm, SideConfig, SideNetwork, SideOptions, backbone_record, side_layers
from side_train.prune import copy_slice, top_rows


def activation(name: str):
    """transformers' activation function of that name (the backbone's hidden_act / hidden_activation)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise UserError(f"the backbone's activation {name!r} is not supported")
    return ACT2FN[name]


@dataclass(kw_only=True)
class DecoderSideConfig(SideConfig):
    family: str = "decoder"
    num_kv_heads: int  # the backbone's
    backbone_head_dim: int
    backbone_d_ff: int
    num_backbone_layers: int
    decoder_layers: list[int] = field(default_factory=list)
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
    head: str = "words"  # "words": label words through the LM head; "last": a head on the last real token
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
        if self.head not in ("words", "last"):
            raise UserError(f"unknown decoder head {self.head!r}; use words or last")
        if self.head == "words" and not self.candidate_tokens:
            raise UserError("label-word scoring needs label words; this task has none (regression uses the last-token head)")
        layers = self.decoder_layers
        if not layers:
            raise UserError("the side decoder has no layers; give --side-layers or a smaller --drop-layers")
        if min(layers) < 0 or max(layers) >= self.num_backbone_layers or sorted(set(layers)) != list(layers):
            raise UserError(f"side layers {layers} must be increasing block indices in 0..{self.num_backbone_layers - 1}")


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

    def rotary(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)[self.rope_pairs][None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.rope_factor).to(dtype), (emb.sin() * self.rope_factor).to(dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, d]; mask additive [B, 1, L, L] (causal, key padding and this layer's window)."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary(n, x.device, q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
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
        h = self.attn(self.input_norm(s), sliding_mask if self.attn.window else full_mask)
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
        super().__init__(cfg, cfg.decoder_layers, [DecoderSideBlock(cfg, i) for i in cfg.decoder_layers], make_norm(cfg, cfg.d))
        windows = {cfg.layer_windows[i] for i in cfg.decoder_layers if cfg.layer_windows and cfg.layer_windows[i]}
        if len(windows) > 1:
            raise UserError(f"the backbone's layers have several sliding windows ({sorted(windows)}); one is supported")
        self.window = windows.pop() if windows else None

    def block_inputs(self, mask: torch.Tensor, context_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(causal mask, causal mask with the sliding window) for every block."""
        full = causal_mask(mask)
        return full, causal_mask(mask, self.window) if self.window else full


class DecoderSideNetwork(SideNetwork):
    config_class = DecoderSideConfig
    needs_lm_head = True
    train_stacks = ("decoder",)
    eval_stacks = ("decoder", "candidates")

    def __init__(self, cfg: DecoderSideConfig, lm_head: torch.Tensor):
        super().__init__(cfg)
        self.decoder = DecoderLadderStack(cfg)
        self.upsample = nn.Linear(cfg.d, cfg.backbone_d)
        if lm_head is None:
            raise ValueError("a decoder side network needs the backbone's LM head")
        vocabulary = cfg.vocabulary
        # only the candidates' rows of the frozen head [V_c, D]: the whole vocabulary is never multiplied
        rows = lm_head[torch.tensor(vocabulary, dtype=torch.long)] if vocabulary else lm_head[:0]
        self.register_buffer("lm_head", rows.detach().float().clone(), persistent=False)
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
            text_model=backbone.text_model_name,
            decoder_layers=side_layers(int(c.num_hidden_layers), options.drop_layers, options.side_layers),
            backbone=backbone_record(backbone),
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

    def token_logits(self, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Frozen-head logits [..., len(rows)] of side states s [..., d] for the kept head rows `rows`."""
        hidden = self.upsample(s)
        logits = hidden @ self.lm_head[rows].to(hidden.dtype).t()
        cap = self.cfg.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    @staticmethod
    def last_positions(mask: torch.Tensor) -> torch.Tensor:
        """Index of each sequence's last real token (right padding)."""
        return mask.sum(1) - 1

    def prompt_last(self, batch) -> torch.Tensor:
        """The side state of each prompt's last real token [B, d]."""
        mask = batch.masks["decoder"]
        s = self.decoder(batch.states["decoder"], mask)
        return s[torch.arange(len(s), device=s.device), self.last_positions(mask).to(s.device)]

    def head_logits(self, batch) -> torch.Tensor:
        """The last-token head's logits [B, num_labels] (float32)."""
        last = self.upsample(self.prompt_last(batch))
        return self.head(self.head_drop(last)).float()

    def loss(self, batch) -> torch.Tensor:
        if self.cfg.head == "last":
            logits = self.head_logits(batch)
            if self.cfg.label_kind == "regression":
                return F.mse_loss(logits.squeeze(-1), batch.labels.float())
            return F.cross_entropy(logits, batch.labels.long())
        logits = self.token_logits(self.prompt_last(batch), self.first_rows).float()
        target = self.first_class_of[batch.labels.long().to(logits.device)]
        return F.cross_entropy(logits, target)

    @torch.no_grad()
    def score_candidates(self, batch) -> torch.Tensor:
        """Each label word's log-probability [B, K]: its first token over the first tokens at the prompt's
        last position, each later token over all the candidates' tokens, teacher-forced after the prompt."""
        words = self.cfg.candidate_tokens
        k = len(words)
        first_logp = self.token_logits(self.prompt_last(batch), self.first_rows).float().log_softmax(-1)  # [B, F]
        scores = first_logp[:, self.first_class_of]  # [B, K]
        if max(len(w) for w in words) == 1:
            return scores
        mask = batch.masks["decoder"]
        states, joined_mask, starts = join_candidates(batch.states["decoder"], mask, batch.states["candidates"],
                                                      batch.masks["candidates"], k)
        s = self.decoder(states, joined_mask)
        targets = batch.targets["candidates"].to(s.device)  # [B K, M]: the next token of the word at each of its positions
        width = targets.shape[1]
        index = (starts.to(s.device)[:, None] + torch.arange(width, device=s.device)[None]).clamp(max=s.shape[1] - 1)
        at = s[torch.arange(len(s), device=s.device)[:, None], index]  # [B K, M, d]
        logp = self.token_logits(at, torch.arange(len(self.vocab_ids), device=s.device)).float().log_softmax(-1)
        vocab_index = vocabulary_index(self.vocab_ids, targets.clamp(min=0))
        token = logp.gather(-1, vocab_index.unsqueeze(-1)).squeeze(-1) * (targets >= 0)
        return scores + token.sum(-1).view(-1, k).to(scores.device)

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        if self.cfg.head == "last":
            logits = self.head_logits(batch)
            return (logits.squeeze(-1) if self.cfg.label_kind == "regression" else logits.argmax(-1)).double().cpu()
        best = self.score_candidates(batch).argmax(-1).cpu()
        return torch.tensor(self.cfg.candidate_values, dtype=torch.float64)[best]

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
        return kept


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


def join_candidates(prompt: torch.Tensor, prompt_mask: torch.Tensor, cand: torch.Tensor, cand_mask: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each (example, candidate) as one sequence: the prompt's real tokens, then the candidate's
    (states [B K, L, P, D], mask, and where each candidate starts)."""
    device = prompt.device
    starts = prompt_mask.to(device).sum(1).repeat_interleave(k)
    lengths = cand_mask.to(device).sum(1)
    width = int((starts + lengths).max())
    b, n = prompt.shape[:2]
    m = cand.shape[1]
    steps = torch.arange(width, device=device)[None]
    in_prompt = steps < starts[:, None]
    in_cand = (steps >= starts[:, None]) & (steps < (starts + lengths)[:, None])
    example = torch.arange(b * k, device=device) // k
    prompt_index = example[:, None] * n + steps.clamp(max=n - 1)
    cand_index = b * n + torch.arange(b * k, device=device)[:, None] * m + (steps - starts[:, None]).clamp(0, m - 1)
    pool = torch.cat([prompt.flatten(0, 1), cand.to(device).flatten(0, 1)])
    index = torch.where(in_prompt, prompt_index, cand_index)
    mask = in_prompt | in_cand
    return pool[index], mask, starts


def norm_has_offset(norm: nn.Module) -> bool:
    """Whether an RMSNorm scales by (1 + w) (Gemma) rather than w, by running it on a probe vector."""
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
