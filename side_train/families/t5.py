"""The T5 side network: a thin side encoder and side decoder, and T5's frozen, tied LM head.

Side encoder blocks are pre-norm self-attention + feed-forward; side decoder blocks add
causal masking and cross-attention to the side encoder. Both use T5's relative position
buckets (one bias table per stack, from backbone block 0), RMSNorm, no biases, and the
backbone's feed-forward (ReLU, or gated with its activation). The output is up-projected to
d, scaled as T5 scales it and multiplied by the frozen LM head. Training uses the
teacher-forced target states (`decoder` stack); evaluation scores every candidate label from
the cached `candidates` stack (summed log-probability), or greedy-decodes with the live backbone.

Pruned init (notes §1.8, `fisher-v2`): rows of each backbone weight are ranked by their
importance score and the top 1/r kept, in ascending index order; the next weight's columns are
sliced to match, chaining through every backbone block (dropped ones too):

    K = top d/r embedding dims                       (word-embedding column scores)
    per block: norm[K]; q,k,v[:, K] rows by qkv score -> K_att
               o[:, K_att] rows -> K; [decoder: cross q,k,v[:, K] -> K_att; o -> K]
               wi[:, K] rows -> K_ff; wo[:, K_ff] rows -> K
    final norm[K]; the decoder continues from the encoder's last K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError
from shared.families import Backbone
from shared.tasks import TaskSpec
from side_train.baselines import BaselineModule, FamilyBaselines, TokenInputs, is_layer_norm, train_biases
from side_train.kernels import Dropout, FrozenHead, vocab_logits
from side_train.model import (
    Attention,
    LadderStack,
    RMSNorm,
    SideConfig,
    SideNetwork,
    SideOptions,
    additive_mask,
    backbone_record,
    side_layers,
)
from side_train.prune import copy_slice, top_rows

ACTIVATIONS = {"relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}


@dataclass(kw_only=True)
class T5SideConfig(SideConfig):
    layer_fields: ClassVar[tuple[str, ...]] = ("encoder_layers", "decoder_layers")

    family: str = "t5"
    backbone_d_ff: int
    backbone_d_kv: int
    num_backbone_layers: int
    num_backbone_decoder_layers: int
    encoder_layers: list[int] = field(default_factory=list)  # backbone block indices, 0-based
    decoder_layers: list[int] = field(default_factory=list)
    norm_eps: float = 1e-6
    activation: str = "relu"  # the backbone's dense_act_fn
    gated: bool = False  # the backbone's is_gated_act (v1.1: gated-gelu)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    vocab_size: int = 0
    lm_scale: float = 1.0
    candidate_values: list[float] = field(default_factory=list)  # the label value of each candidate, in order

    @property
    def d_kv(self) -> int:
        return self.backbone_d_kv // self.reduction

    @property
    def d_ff(self) -> int:
        return self.backbone_d_ff // self.reduction

    def stack_layers(self) -> dict[str, list[int]]:
        return {"encoder": self.encoder_layers, "decoder": self.decoder_layers, "candidates": self.decoder_layers}

    def check(self) -> None:
        super().check()
        for name, value in (("d_ff", self.backbone_d_ff), ("d_kv", self.backbone_d_kv)):
            if value % self.reduction:
                raise UserError(f"--reduction {self.reduction} does not divide the backbone's {name} = {value}; pick a divisor")
        if self.d_kv == 0:
            raise UserError(f"--reduction {self.reduction} leaves no attention width; use a smaller reduction")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"the backbone's feed-forward activation {self.activation!r} is not supported "
                            f"(supported: {', '.join(ACTIVATIONS)})")
        for stack, layers, count in (("encoder", self.encoder_layers, self.num_backbone_layers),
                                     ("decoder", self.decoder_layers, self.num_backbone_decoder_layers)):
            if not layers:
                raise UserError(f"the side {stack} has no layers; give --side-layers or a smaller --drop-layers")
            if min(layers) < 0 or max(layers) >= count or sorted(set(layers)) != list(layers):
                raise UserError(f"side layers {layers} must be increasing block indices in 0..{count - 1}")


class T5SideBlock(nn.Module):
    """A thin T5 block: pre-norm self-attention, [cross-attention], feed-forward."""

    def __init__(self, cfg: T5SideConfig, is_decoder: bool):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d, cfg.norm_eps)
        self.self_attn = Attention(cfg.d, cfg.num_heads, cfg.d_kv, bias=False, scaled=False, dropout=cfg.attention_p)
        self.is_decoder = is_decoder
        if is_decoder:
            self.cross_norm = RMSNorm(cfg.d, cfg.norm_eps)
            self.cross_attn = Attention(cfg.d, cfg.num_heads, cfg.d_kv, bias=False, scaled=False, dropout=cfg.attention_p)
        self.ff_norm = RMSNorm(cfg.d, cfg.norm_eps)
        self.gated, self.act = cfg.gated, ACTIVATIONS[cfg.activation]
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d, bias=False)
        self.drop = Dropout(cfg.dropout)

    def forward(self, s, self_mask, position_bias=None, cross_mask=None, context=None):
        s = s + self.drop(self.self_attn(self.self_norm(s), self_mask, position_bias))
        if self.is_decoder:
            s = s + self.drop(self.cross_attn(self.cross_norm(s), cross_mask, context=context))
        h = self.ff_norm(s)
        h = self.act(self.wi_0(h)) * self.wi_1(h) if self.gated else self.act(self.wi(h))
        return s + self.drop(self.wo(self.drop(h)))


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


class T5LadderStack(LadderStack):
    """A side encoder or decoder: T5 blocks, one relative position bias table, a final RMSNorm."""

    def __init__(self, cfg: T5SideConfig, layers: list[int], is_decoder: bool):
        super().__init__(cfg, layers, [T5SideBlock(cfg, is_decoder) for _ in layers], RMSNorm(cfg.d, cfg.norm_eps))
        self.is_decoder = is_decoder
        self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.num_heads)

    def position_bias(self, n: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(n, device=device)
        relative = positions[None, :] - positions[:, None]
        buckets = relative_position_bucket(relative, not self.is_decoder, self.cfg.relative_buckets, self.cfg.relative_max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1)[None]  # [1, heads, n, n]

    def block_inputs(self, mask, context_mask):
        cross = additive_mask(context_mask) if context_mask is not None else None
        return additive_mask(mask, causal=self.is_decoder), self.position_bias(mask.shape[1], mask.device), cross


class T5SideNetwork(SideNetwork):
    config_class = T5SideConfig
    needs_lm_head = True
    train_stacks = ("encoder", "decoder")
    eval_stacks = ("encoder", "candidates")
    can_generate = True

    def __init__(self, cfg: T5SideConfig, lm_head: torch.Tensor):
        super().__init__(cfg)
        self.encoder = T5LadderStack(cfg, cfg.encoder_layers, is_decoder=False)
        self.upsample = nn.Linear(cfg.d, cfg.backbone_d)
        self.decoder = T5LadderStack(cfg, cfg.decoder_layers, is_decoder=True)
        if lm_head is None:
            raise ValueError("a T5 side network needs the backbone's LM head")
        self.register_buffer("lm_head", lm_head.detach().clone(), persistent=False)
        self.frozen_head = FrozenHead()

    @classmethod
    def config_for(cls, backbone: Backbone, spec: TaskSpec, options: SideOptions) -> T5SideConfig:
        """Size the side network from the backbone's config and the user's options."""
        c = backbone.config
        options.check()
        if options.merge_final:
            raise UserError("--merge-final mixes in a decoder-only backbone's final state; T5 side networks have no "
                            "such output: drop --merge-final")
        if options.free_blocks:
            raise UserError("--free-blocks adds decoder side blocks without ladders; T5 side networks do not have "
                            "them: drop --free-blocks")
        cfg = T5SideConfig(
            backbone_d=c.d_model, backbone_d_ff=c.d_ff, backbone_d_kv=c.d_kv, num_heads=c.num_heads,
            num_backbone_layers=c.num_layers, num_backbone_decoder_layers=c.num_decoder_layers,
            reduction=options.reduction, dropout=options.dropout, attention_dropout=options.attention_dropout,
            norm_eps=c.layer_norm_epsilon, activation=c.dense_act_fn, gated=bool(c.is_gated_act),
            relative_buckets=c.relative_attention_num_buckets,
            relative_max_distance=getattr(c, "relative_attention_max_distance", 128),
            vocab_size=c.vocab_size, lm_scale=backbone.lm_head()[1],
            num_labels=spec.num_labels, label_kind=spec.label_kind,
            candidate_values=[parse_target(t, spec) for t in spec.candidates()],
            encoder_layers=side_layers(c.num_layers, options.drop_layers, options.side_layers),
            decoder_layers=side_layers(c.num_decoder_layers, options.drop_layers, options.side_layers),
            backbone=backbone_record(backbone),
        )
        cfg.check()
        return cfg

    @classmethod
    def load_lm_head(cls, cfg: T5SideConfig) -> torch.Tensor:
        from shared.backbones import DEFAULT_MODEL
        from shared.weights import load_tensor

        name = cfg.backbone.get("name")
        return load_tensor(None if name == DEFAULT_MODEL else name, cfg.backbone.get("revision"), cfg.backbone["lm_head_tensors"])

    def frozen_bytes_on_cpu(self, bf16: bool) -> int:
        return self.lm_head.numel() * 2 if bf16 else 0  # kernels.FrozenHead keeps a bf16 copy

    # --- forward passes -------------------------------------------------------------------

    def lm_logits(self, side_encoded, enc_mask, dec_states, dec_mask) -> torch.Tensor:
        """Vocabulary logits [B, T, V] for teacher-forced decoder states."""
        s = self.decoder(dec_states, dec_mask, side_encoded, enc_mask)
        return vocab_logits(s, self.upsample, self.cfg.lm_scale, self.lm_head, self.frozen_head)

    def loss(self, batch) -> torch.Tensor:
        encoded = self.encoder(batch.states["encoder"], batch.masks["encoder"])
        logits = self.lm_logits(encoded, batch.masks["encoder"], batch.states["decoder"], batch.masks["decoder"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch.targets["decoder"].flatten(), ignore_index=-100)

    def loss_weight(self, batch) -> torch.Tensor:
        """The loss averages target tokens: count them."""
        return (batch.targets["decoder"] != -100).sum()

    @torch.no_grad()
    def score_candidates(self, batch) -> torch.Tensor:
        """Summed log-probability of each candidate label sequence, [B, K]."""
        enc_mask = batch.masks["encoder"]
        encoded = self.encoder(batch.states["encoder"], enc_mask)
        k = batch.states["candidates"].shape[0] // encoded.shape[0]
        logits = self.lm_logits(encoded.repeat_interleave(k, 0), enc_mask.repeat_interleave(k, 0),
                                batch.states["candidates"], batch.masks["candidates"]).float()
        labels = batch.targets["candidates"]
        token_logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels >= 0)
        return token_logp.sum(-1).view(-1, k)

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        best = self.score_candidates(batch).argmax(-1).cpu()
        return torch.tensor(self.cfg.candidate_values, dtype=torch.float64)[best]

    @torch.no_grad()
    def generate_values(self, source, rows: np.ndarray, device: torch.device, spec: TaskSpec) -> np.ndarray:
        """Greedy decoding with the live backbone (each step reruns the backbone decoder on the
        prefix), parsed into label values (-1 where the text is no label)."""
        return np.array([parse_target(t, spec) for t in greedy_generate(self, source, rows, device)])

    # --- pruned init ----------------------------------------------------------------------

    def init_from_backbone(self, state: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict:
        """Prune a T5 backbone state dict into the side network; returns the kept indices per block."""
        cfg = self.cfg
        keep_d, keep_ff, keep_inner = cfg.d, cfg.d_ff, cfg.num_heads * cfg.d_kv
        kept: dict = {}
        K = top_rows(scores["shared.columns"], keep_d)
        for stack_name, side_stack, n_blocks in (("encoder", self.encoder, cfg.num_backbone_layers),
                                                 ("decoder", self.decoder, cfg.num_backbone_decoder_layers)):
            position = {layer: j for j, layer in enumerate(side_stack.layers)}
            for i in range(n_blocks):
                prefix = f"{stack_name}.block.{i}.layer"
                block = side_stack.blocks[position[i]] if i in position else None
                sublayers = [("0", "SelfAttention", "self")] + ([("1", "EncDecAttention", "cross")] if stack_name == "decoder" else [])
                record = {}
                for idx, attn_name, ours in sublayers:
                    K_att = top_rows(scores[f"{prefix}.{idx}.{attn_name}.qkv"], keep_inner)
                    K_new = top_rows(scores[f"{prefix}.{idx}.{attn_name}.o.rows"], keep_d)
                    if block is not None:
                        copy_slice(getattr(block, f"{ours}_norm").weight, state[f"{prefix}.{idx}.layer_norm.weight"], rows=K)
                        attn = getattr(block, f"{ours}_attn")
                        for n in ("q", "k", "v"):
                            copy_slice(getattr(attn, n).weight, state[f"{prefix}.{idx}.{attn_name}.{n}.weight"], rows=K_att, cols=K)
                        copy_slice(attn.o.weight, state[f"{prefix}.{idx}.{attn_name}.o.weight"], rows=K_new, cols=K_att)
                    record[ours] = (K.clone(), K_att)
                    K = K_new
                ff = f"{prefix}.{len(sublayers)}"
                wi_names = ["wi_0", "wi_1"] if cfg.gated else ["wi"]
                K_ff = top_rows(scores[f"{ff}.DenseReluDense.{wi_names[0]}.rows"], keep_ff)
                K_next = top_rows(scores[f"{ff}.DenseReluDense.wo.rows"], keep_d)
                if block is not None:
                    copy_slice(block.ff_norm.weight, state[f"{ff}.layer_norm.weight"], rows=K)
                    for n in wi_names:
                        copy_slice(getattr(block, n).weight, state[f"{ff}.DenseReluDense.{n}.weight"], rows=K_ff, cols=K)
                    copy_slice(block.wo.weight, state[f"{ff}.DenseReluDense.wo.weight"], rows=K_next, cols=K_ff)
                record["ff"] = (K.clone(), K_ff, K_next)
                K = K_next
                kept[f"{stack_name}.{i}"] = record
            copy_slice(side_stack.final_norm.weight, state[f"{stack_name}.final_layer_norm.weight"], rows=K)
            # the relative bias always comes from backbone block 0 (same number of heads)
            copy_slice(side_stack.relative_bias.weight, state[f"{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
        return kept


def parse_target(text: str, spec: TaskSpec) -> float:
    """Target string -> label value; anything unparsable is -1 (counted wrong)."""
    try:
        value = float(text.strip())
    except ValueError:
        return -1.0
    if spec.label_kind == "class" and (value != int(value) or not 0 <= value < spec.num_labels):
        return -1.0
    return value


def greedy_generate(model: T5SideNetwork, source, rows: np.ndarray, device: torch.device, max_new_tokens: int = 8) -> list[str]:
    """Greedy decoding with the live backbone: each step reruns the backbone decoder on the prefix."""
    bb = getattr(source, "backbone", None)
    if bb is None:
        raise UserError("--eval generate needs the live backbone (add --live)")
    batch = source.plan.token_batch(rows, bb.device, ["encoder"])["encoder"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        states, final = bb.encode(ids, mask)
    enc_positions = [0] + [i + 1 for i in model.cfg.encoder_layers]
    dec_positions = [0] + [i + 1 for i in model.cfg.decoder_layers]
    encoded = model.encoder(states[:, :, enc_positions].to(torch.bfloat16).to(device), mask.bool().to(device))
    eos = bb.tokenizer.eos_token_id if bb.tokenizer.eos_token_id is not None else bb.tokenizer.sep_token_id
    prefix = torch.full((len(rows), 1), bb.decoder_start_token_id, dtype=torch.long, device=bb.device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=bb.device)
    generated: list[list[int]] = [[] for _ in rows]
    for _ in range(max_new_tokens):
        dec_mask = torch.ones_like(prefix)
        with torch.inference_mode():
            dec_states = bb.decode(prefix, dec_mask, final, mask)[:, :, dec_positions].to(torch.bfloat16)
        logits = model.lm_logits(encoded, mask.bool().to(device), dec_states.to(device), dec_mask.bool().to(device))
        next_ids = logits[:, -1].argmax(-1).to(bb.device)
        for b in range(len(rows)):
            if not finished[b]:
                if next_ids[b] == eos:
                    finished[b] = True
                else:
                    generated[b].append(int(next_ids[b]))
        if bool(finished.all()):
            break
        prefix = torch.cat([prefix, next_ids[:, None]], dim=1)
    return [bb.tokenizer.decode(g, skip_special_tokens=True) for g in generated]


# --- baselines for side_train.compare ----------------------------------------------------------




class Seq2SeqTuned(BaselineModule):
    """A (possibly peft-wrapped) T5 trained on the target text (`decoder` stack), scored by the
    summed log-probability of each candidate label (`candidates` stack)."""

    def __init__(self, model: nn.Module, candidate_values: list[float]):
        super().__init__()
        self.model = model
        self.candidate_values = candidate_values

    def loss(self, inputs: TokenInputs) -> torch.Tensor:
        enc, dec = inputs.tokens["encoder"], inputs.tokens["decoder"]
        out = self.model(input_ids=enc["input_ids"], attention_mask=inputs.mask("encoder"), decoder_input_ids=dec["input_ids"],
                         decoder_attention_mask=inputs.mask("decoder"), labels=dec["labels"], use_cache=False)
        return out.loss

    @torch.no_grad()
    def score_candidates(self, inputs: TokenInputs) -> torch.Tensor:
        """Summed log-probability of each candidate target, [B, K] (one forward pass per candidate)."""
        enc, cand = inputs.tokens["encoder"], inputs.tokens["candidates"]
        b = enc["input_ids"].shape[0]
        k = cand["input_ids"].shape[0] // b
        scores = []
        for j in range(k):  # example-major: candidate j of every example
            target = cand["labels"][j::k]
            logits = self.model(input_ids=enc["input_ids"], attention_mask=inputs.mask("encoder"),
                                decoder_input_ids=cand["input_ids"][j::k],
                                decoder_attention_mask=None if not inputs.padded else cand["attention_mask"][j::k],
                                use_cache=False).logits.float()
            logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((logp * (target >= 0)).sum(-1))
        return torch.stack(scores, dim=1)

    @torch.no_grad()
    def predict(self, inputs: TokenInputs) -> torch.Tensor:
        best = self.score_candidates(inputs).argmax(-1).cpu()
        return torch.tensor(self.candidate_values, dtype=torch.float64)[best]


class T5Baselines(FamilyBaselines):
    """T5's baselines: seq2seq on the target text; adapters after every block's self-attention
    output and feed-forward output; BitFit adds zero biases (T5 has none)."""

    peft_task = "SEQ_2_SEQ_LM"

    def random_model(self, config) -> nn.Module:
        import transformers

        return transformers.T5ForConditionalGeneration(config)

    def adapter_sites(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        sites = []
        for stack in (model.encoder, model.decoder):
            for block in stack.block:
                sites.append((block.layer[0].SelfAttention, "o"))
                sites.append((block.layer[-1].DenseReluDense, "wo"))
        return sites

    def bitfit(self, model: nn.Module) -> None:
        """A new zero bias on every linear layer (the LM head included), trained with the layer norms."""
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, device=module.weight.device, dtype=module.weight.dtype))
            if is_layer_norm(module):
                module.requires_grad_(True)
        train_biases(model)

    def wrap(self, model: nn.Module, backbone: Backbone, spec: TaskSpec, prompt_tokens: int) -> BaselineModule:
        return Seq2SeqTuned(model, [parse_target(t, spec) for t in spec.candidates()])


T5SideNetwork.baselines = T5Baselines()
