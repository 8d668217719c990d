"""The encoder side network: thin BERT layers over an encoder's states, pooled into a head.

Side blocks are post-norm self-attention and feed-forward with biases and the backbone's
activation (`hidden_act`, or the config's other name for it), at width d/r with the
backbone's head count, whatever the backbone's own block (pre-norm, rotary, GeGLU or
relative attention: docs/design.md). The side output is up-projected to d, mean-pooled over
the real tokens (or the first token, `pooling="cls"`) and fed to a linear classification or
regression head. The pruned init slices each side layer from its backbone layer, found
through the backbone's layout (shared.families.encoder.ENCODER_LAYOUTS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError
from shared.families import Backbone
from shared.families.encoder import ENCODER_LAYOUTS, layout_of, unknown_layout_error
from shared.tasks import TaskSpec
from side_train.baselines import BaselineModule, FamilyBaselines, TokenInputs
from side_train.kernels import Dropout
from side_train.model import Attention, LadderStack, SideConfig, SideNetwork, SideOptions, backbone_record, side_layers
from side_train.prune import copy_slice, top_rows

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu,
               "tanh": torch.tanh}


def activation_fn(name: str):
    """The side blocks' activation: ours, else transformers' function of that name."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def known_activation(name: object) -> bool:
    from transformers.activations import ACT2FN

    return isinstance(name, str) and (name in ACTIVATIONS or name in ACT2FN)


@dataclass(kw_only=True)
class EncoderSideConfig(SideConfig):
    layer_fields: ClassVar[tuple[str, ...]] = ("encoder_layers",)

    family: str = "encoder"
    backbone_d_ff: int
    num_backbone_layers: int
    encoder_layers: list[int] = field(default_factory=list)
    norm_eps: float = 1e-12
    activation: str = "gelu"  # the backbone's hidden_act (DistilBERT: activation, ModernBERT: hidden_activation)
    pooling: str = "mean"  # or "cls"
    layout: str | None = None  # the backbone's layout (None: unknown, --init random only)

    @property
    def d_ff(self) -> int:
        return self.backbone_d_ff // self.reduction

    def stack_layers(self) -> dict[str, list[int]]:
        return {"encoder": self.encoder_layers}

    def check(self) -> None:
        super().check()
        if self.backbone_d_ff % self.reduction:
            raise UserError(f"--reduction {self.reduction} does not divide the backbone's d_ff = {self.backbone_d_ff}; pick a divisor")
        if self.d % self.num_heads:
            raise UserError(f"side width {self.d} is not divisible by {self.num_heads} heads; pick another --reduction")
        if not known_activation(self.activation):
            raise UserError(f"the backbone's activation {self.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if self.pooling not in ("mean", "cls"):
            raise UserError(f"--pooling must be mean or cls, got {self.pooling!r}")
        layers = self.encoder_layers
        if not layers:
            raise UserError("the side encoder has no layers; give --side-layers or a smaller --drop-layers")
        if min(layers) < 0 or max(layers) >= self.num_backbone_layers or sorted(set(layers)) != list(layers):
            raise UserError(f"side layers {layers} must be increasing block indices in 0..{self.num_backbone_layers - 1}")


class BertSideBlock(nn.Module):
    """A thin BERT layer: post-norm self-attention and feed-forward, with biases."""

    def __init__(self, cfg: EncoderSideConfig):
        super().__init__()
        d_head = cfg.d // cfg.num_heads
        self.self_attn = Attention(cfg.d, cfg.num_heads, d_head, bias=True, scaled=True, dropout=cfg.attention_p)
        self.attn_norm = nn.LayerNorm(cfg.d, eps=cfg.norm_eps)
        self.wi = nn.Linear(cfg.d, cfg.d_ff)
        self.wo = nn.Linear(cfg.d_ff, cfg.d)
        self.ff_norm = nn.LayerNorm(cfg.d, eps=cfg.norm_eps)
        self.act = activation_fn(cfg.activation)
        self.drop = Dropout(cfg.dropout)

    def forward(self, s, self_mask, position_bias=None, cross_mask=None, context=None):
        s = self.attn_norm(s + self.drop(self.self_attn(s, self_mask)))
        return self.ff_norm(s + self.drop(self.wo(self.act(self.wi(s)))))


class EncoderSideNetwork(SideNetwork):
    config_class = EncoderSideConfig
    train_stacks = ("encoder",)
    eval_stacks = ("encoder",)

    def __init__(self, cfg: EncoderSideConfig):
        super().__init__(cfg)
        self.encoder = LadderStack(cfg, cfg.encoder_layers, [BertSideBlock(cfg) for _ in cfg.encoder_layers])
        self.upsample = nn.Linear(cfg.d, cfg.backbone_d)
        self.head_drop = Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.backbone_d, cfg.num_labels)

    @classmethod
    def config_for(cls, backbone: Backbone, spec: TaskSpec, options: SideOptions) -> EncoderSideConfig:
        """Sized from the backbone's sizes, read through the config's own names (shared.families.encoder.config_value)."""
        options.check()
        if options.merge_final:
            raise UserError("--merge-final mixes in a decoder-only backbone's final state before its LM head; "
                            "an encoder has no LM head: drop --merge-final")
        if options.free_blocks:
            raise UserError("--free-blocks adds decoder side blocks without ladders; encoder side networks do not have "
                            "them: drop --free-blocks")
        cfg = EncoderSideConfig(
            backbone_d=backbone.d_model, backbone_d_ff=backbone.d_ff, num_heads=backbone.num_heads,
            num_backbone_layers=backbone.num_layers, reduction=options.reduction, dropout=options.dropout,
            attention_dropout=options.attention_dropout, norm_eps=backbone.norm_eps,
            activation=backbone.activation, num_labels=spec.num_labels, label_kind=spec.label_kind,
            pooling=options.pooling, layout=layout_of(backbone.model) if backbone.model is not None else None,
            encoder_layers=side_layers(backbone.num_layers, options.drop_layers, options.side_layers),
            backbone=backbone_record(backbone),
        )
        cfg.check()
        return cfg

    def logits(self, batch) -> torch.Tensor:
        """Pooled logits [B, num_labels] (float32)."""
        mask = batch.masks["encoder"]
        hidden = self.upsample(self.encoder(batch.states["encoder"], mask))
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(self.head_drop(pooled)).float()

    def loss(self, batch) -> torch.Tensor:
        logits = self.logits(batch)
        if self.cfg.label_kind == "regression":
            return F.mse_loss(logits.squeeze(-1), batch.labels.float())
        return F.cross_entropy(logits, batch.labels.long())

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        """The class index (or the regression value) per example."""
        logits = self.logits(batch)
        return (logits.squeeze(-1) if self.cfg.label_kind == "regression" else logits.argmax(-1)).double().cpu()

    def init_from_backbone(self, state: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict:
        """Prune an encoder's state dict into the side encoder through its layout: q, k, v (a fused qkv's
        thirds), attention output, the two norms and the feed-forward (a GeGLU's activated half); a backbone
        module without a bias gives a zero side bias. The first kept dims rank the embedding columns, or the
        rows of the projection to hidden width (ELECTRA, ALBERT). A shared layer (ALBERT) gives every side
        layer the same slices (the first backbone layer's q/k/v columns follow the embedding's dims)."""
        cfg = self.cfg
        if cfg.layout not in ENCODER_LAYOUTS:
            raise unknown_layout_error(cfg.backbone.get("model_type", "?"))
        layout = ENCODER_LAYOUTS[cfg.layout]

        def take(param, module: str, kind: str, rows=None, cols=None) -> None:
            if f"{module}.{kind}" not in state and kind == "bias":
                with torch.no_grad():
                    param.zero_()
                return
            copy_slice(param, state[f"{module}.{kind}"], rows=rows, cols=cols)

        first = layout.embedding_target()
        K = top_rows(scores[f"{first}.rows" if layout.embedding_projection else f"{first}.columns"], cfg.d)
        position = {layer: j for j, layer in enumerate(self.encoder.layers)}
        kept = {}
        for i in range(cfg.num_backbone_layers):
            n = layout.names(i, cfg.num_backbone_layers)
            K_att = top_rows(scores[f"{layout.attention(i)}.qkv"], cfg.d)
            K_new = top_rows(scores[f"{n['attention_output']}.rows"], cfg.d)
            ff_rows = scores[f"{n['intermediate']}.rows"]
            K_ff = top_rows(ff_rows[: cfg.backbone_d_ff] if layout.gated else ff_rows, cfg.d_ff)
            K_next = top_rows(scores[f"{n['output']}.rows"], cfg.d)
            if i in position:
                block = self.encoder.blocks[position[i]]
                attn = block.self_attn
                modules = [n["fused_qkv"]] * 3 if layout.fused_qkv else [n["query"], n["key"], n["value"]]
                for j, (ours, module) in enumerate(zip(("q", "k", "v"), modules)):
                    rows = K_att + j * cfg.backbone_d if layout.fused_qkv else K_att  # a fused weight's j-th third
                    take(getattr(attn, ours).weight, module, "weight", rows=rows, cols=K)
                    take(getattr(attn, ours).bias, module, "bias", rows=rows)
                take(attn.o.weight, n["attention_output"], "weight", rows=K_new, cols=K_att)
                take(attn.o.bias, n["attention_output"], "bias", rows=K_new)
                take(block.attn_norm.weight, n["attention_norm"], "weight", rows=K_new)
                take(block.attn_norm.bias, n["attention_norm"], "bias", rows=K_new)
                take(block.wi.weight, n["intermediate"], "weight", rows=K_ff, cols=K_new)
                take(block.wi.bias, n["intermediate"], "bias", rows=K_ff)
                take(block.wo.weight, n["output"], "weight", rows=K_next, cols=K_ff)
                take(block.wo.bias, n["output"], "bias", rows=K_next)
                take(block.ff_norm.weight, n["output_norm"], "weight", rows=K_next)
                take(block.ff_norm.bias, n["output_norm"], "bias", rows=K_next)
            kept[f"encoder.{i}"] = {"in": K.clone(), "att": K_att, "mid": K_new, "ff": K_ff, "out": K_next}
            K = K_next
        return kept


# --- baselines for side_train.compare ----------------------------------------------------------




class EncoderTuned(BaselineModule):
    """A (possibly peft-wrapped) encoder with a head on the mean-pooled last layer."""

    def __init__(self, encoder: nn.Module, d: int, num_labels: int, label_kind: str, prompt_tokens: int = 0, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, num_labels)
        self.label_kind = label_kind
        self.prompt_tokens = prompt_tokens  # soft tokens peft prepends; pooled over the real tokens only

    def logits(self, inputs: TokenInputs) -> torch.Tensor:
        stack = inputs.tokens["encoder"]
        kwargs = {"token_type_ids": stack["token_type_ids"]} if "token_type_ids" in stack and not self.prompt_tokens else {}
        hidden = self.encoder(input_ids=stack["input_ids"], attention_mask=inputs.mask("encoder"), **kwargs).last_hidden_state
        hidden = hidden[:, self.prompt_tokens :]
        weights = stack["attention_mask"].to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(self.head_drop(pooled)).float()

    def loss(self, inputs: TokenInputs) -> torch.Tensor:
        logits = self.logits(inputs)
        if self.label_kind == "regression":
            return F.mse_loss(logits.squeeze(-1), inputs.labels.float())
        return F.cross_entropy(logits, inputs.labels.long())

    @torch.no_grad()
    def predict(self, inputs: TokenInputs) -> torch.Tensor:
        logits = self.logits(inputs)
        return (logits.squeeze(-1) if self.label_kind == "regression" else logits.argmax(-1)).double().cpu()


class EncoderBaselines(FamilyBaselines):
    """Encoder baselines: a pooled head; adapters after each BERT-style layer's attention output
    and output projections; BitFit trains the existing biases."""

    peft_task = "FEATURE_EXTRACTION"

    def random_model(self, config) -> nn.Module:
        import transformers

        return transformers.AutoModel.from_config(config)

    def adapter_sites(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        encoder = getattr(model, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0], "output"):
            raise UserError(f"adapters need BERT-style layers (encoder.layer[i].attention.output); {type(model).__name__} has none")
        sites = []
        for layer in layers:
            sites.append((layer.attention.output, "dense"))
            sites.append((layer.output, "dense"))
        return sites

    def wrap(self, model: nn.Module, backbone: Backbone, spec: TaskSpec, prompt_tokens: int) -> BaselineModule:
        return EncoderTuned(model, backbone.d_model, spec.num_labels, spec.label_kind, prompt_tokens)


EncoderSideNetwork.baselines = EncoderBaselines()
