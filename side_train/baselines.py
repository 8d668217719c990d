"""The parameter-efficient baselines of the LST paper's Table 1, on a Hugging Face backbone.

- full: every backbone parameter trains.
- adapter: Houlsby bottleneck adapters (x + up(swish(down(x))), up zero-initialised) after
  the attention and the feed-forward output projections of every block, plus the layer
  norms (Houlsby et al.; peft has no bottleneck adapter, so it is here).
- lora: peft LoRA on the attention query and value projections.
- bitfit: the bias terms. T5 has none, so, as in the paper's baseline setup (Mahabadi et al.),
  a zero bias is added to every linear layer (the LM head included) and trained with the
  layer norms; BERT-family encoders train their existing biases.
- prompt: peft prompt tuning, soft tokens prepended to the (encoder) input.

Sizes follow the paper for T5-base (222.9M parameters): adapter width 48 (2 adapters per
block, 48 in all, with layer norms: 1.63%, as in Table 1), LoRA rank 32 on q and v (1.59%;
the paper reports 1.71%), BitFit 0.13%, and 100 prompt tokens (0.03%).

T5 backbones train as sequence-to-sequence models on the target text; encoders get a
classification (or regression) head on the mean-pooled last layer, the same pooling and
head as the encoder side network. Every method exposes `loss(batch)` on a `TokenBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError

ADAPTER_WIDTH = 48
LORA_RANK = 32
PROMPT_TOKENS = 100
BASELINES = ("full", "adapter", "lora", "bitfit", "prompt")


@dataclass
class TokenBatch:
    """Token ids for one batch; decoder fields only for T5. `padded` is False when every mask is all ones."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # class index or regression value per example
    token_type_ids: torch.Tensor | None = None
    decoder_input_ids: torch.Tensor | None = None
    decoder_mask: torch.Tensor | None = None
    decoder_labels: torch.Tensor | None = None  # -100 on padding
    padded: bool = True

    def to(self, device: torch.device) -> TokenBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return TokenBatch(**moved)

    def tensors(self) -> list[torch.Tensor]:
        return [v for v in (getattr(self, f.name) for f in fields(self)) if isinstance(v, torch.Tensor)]

    def hf_mask(self, decoder: bool = False) -> torch.Tensor | None:
        """The mask to hand a Hugging Face model: None when nothing is padded (transformers drops
        an all-ones mask itself; passing None also lets the step run on the meta device)."""
        if not self.padded:
            return None
        return self.decoder_mask if decoder else self.attention_mask


# --- adapters ---------------------------------------------------------------------------------


class Adapter(nn.Module):
    """Houlsby bottleneck with a residual; starts as the identity (up-projection at zero)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.down = nn.Linear(d, width)
        self.up = nn.Linear(width, d)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.silu(self.down(x)))


class AdaptedLinear(nn.Module):
    """A frozen output projection followed by an adapter."""

    def __init__(self, base: nn.Linear, width: int):
        super().__init__()
        self.base = base
        self.adapter = Adapter(base.out_features, width).to(base.weight.device, base.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:  # transformers' T5 feed-forward reads `wo.weight.dtype`
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def adapter_sites(model: nn.Module, family: str) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of each block's attention-output and feed-forward-output projection."""
    sites = []
    if family == "t5":
        for stack in (model.encoder, model.decoder):
            for block in stack.block:
                sites.append((block.layer[0].SelfAttention, "o"))
                sites.append((block.layer[-1].DenseReluDense, "wo"))
    else:
        for layer in encoder_layers(model):
            sites.append((layer.attention.output, "dense"))
            sites.append((layer.output, "dense"))
    return sites


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0], "output"):
        raise UserError(f"adapters need BERT-style layers (encoder.layer[i].attention.output); {type(model).__name__} has none")
    return layers


def add_adapters(model: nn.Module, family: str, width: int) -> None:
    """Insert adapters; train them and the layer norms, freeze the rest."""
    model.requires_grad_(False)
    for parent, name in adapter_sites(model, family):
        setattr(parent, name, AdaptedLinear(getattr(parent, name), width))
    for module in model.modules():
        if isinstance(module, Adapter) or is_layer_norm(module):
            module.requires_grad_(True)


def is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


# --- BitFit -----------------------------------------------------------------------------------


def add_bitfit(model: nn.Module, family: str) -> None:
    """Train only biases (T5: new zero biases on every linear layer, and the layer norms)."""
    model.requires_grad_(False)
    if family == "t5":
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, device=module.weight.device, dtype=module.weight.dtype))
            if is_layer_norm(module):
                module.requires_grad_(True)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.requires_grad_(True)


# --- peft -------------------------------------------------------------------------------------


def lora_targets(model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q", "v"], ["query", "value"], ["q_proj", "v_proj"]):
        if set(pair) <= names:
            return pair
    raise UserError(f"found no query/value projections to put LoRA on in {type(model).__name__}")


def apply_lora(model: nn.Module, family: str, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    task = "SEQ_2_SEQ_LM" if family == "t5" else "FEATURE_EXTRACTION"
    config = LoraConfig(task_type=task, r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=lora_targets(model))
    return get_peft_model(model, config)


def apply_prompt_tuning(model: nn.Module, family: str, tokens: int) -> nn.Module:
    from peft import PromptTuningConfig, get_peft_model

    task = "SEQ_2_SEQ_LM" if family == "t5" else "FEATURE_EXTRACTION"
    # One set of soft tokens, on the encoder input (Lester et al.); peft's default for
    # seq2seq allocates a second, unused set for the decoder.
    config = PromptTuningConfig(task_type=task, num_virtual_tokens=tokens, num_transformer_submodules=1)
    return get_peft_model(model, config)


# --- the trainable wrappers -------------------------------------------------------------------


class Seq2SeqTuned(nn.Module):
    """A (possibly peft-wrapped) T5 trained on the target text."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.hf_mask(), decoder_input_ids=batch.decoder_input_ids,
                         decoder_attention_mask=batch.hf_mask(decoder=True), labels=batch.decoder_labels, use_cache=False)
        return out.loss

    @torch.no_grad()
    def score_candidates(self, batch: TokenBatch, candidates: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Summed log-probability of each candidate target, [B, K]; candidates are (decoder input, labels) rows."""
        scores = []
        for dec_in, labels in candidates:
            b = batch.input_ids.shape[0]
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.hf_mask(),
                                decoder_input_ids=dec_in.expand(b, -1), use_cache=False).logits.float()
            target = labels.expand(b, -1)
            logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((logp * (target >= 0)).sum(-1))
        return torch.stack(scores, dim=1)


class EncoderTuned(nn.Module):
    """A (possibly peft-wrapped) encoder with a head on the mean-pooled last layer."""

    def __init__(self, encoder: nn.Module, d: int, num_labels: int, label_kind: str, prompt_tokens: int = 0, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, num_labels)
        self.label_kind = label_kind
        self.prompt_tokens = prompt_tokens  # soft tokens peft prepends; pooled over the real tokens only

    def logits(self, batch: TokenBatch) -> torch.Tensor:
        kwargs = {"token_type_ids": batch.token_type_ids} if batch.token_type_ids is not None and not self.prompt_tokens else {}
        hidden = self.encoder(input_ids=batch.input_ids, attention_mask=batch.hf_mask(), **kwargs).last_hidden_state
        hidden = hidden[:, self.prompt_tokens :]
        weights = batch.attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(self.head_drop(pooled)).float()

    def loss(self, batch: TokenBatch) -> torch.Tensor:
        logits = self.logits(batch)
        if self.label_kind == "regression":
            return F.mse_loss(logits.squeeze(-1), batch.labels.float())
        return F.cross_entropy(logits, batch.labels.long())

    @torch.no_grad()
    def predict(self, batch: TokenBatch) -> torch.Tensor:
        logits = self.logits(batch)
        return logits.squeeze(-1) if self.label_kind == "regression" else logits.argmax(-1)


def build_baseline(method: str, model: nn.Module, family: str, d: int, num_labels: int, label_kind: str,
                   adapter_width: int = ADAPTER_WIDTH, lora_rank: int = LORA_RANK, prompt_tokens: int = PROMPT_TOKENS) -> nn.Module:
    """Turn a fresh backbone model into `method`'s trainable module (modifies `model`)."""
    if method == "full":
        model.requires_grad_(True)
    elif method == "adapter":
        add_adapters(model, family, adapter_width)
    elif method == "bitfit":
        add_bitfit(model, family)
    elif method == "lora":
        model = apply_lora(model, family, lora_rank)
    elif method == "prompt":
        model = apply_prompt_tuning(model, family, prompt_tokens)
    else:
        raise UserError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")
    if family == "t5":
        return Seq2SeqTuned(model)
    return EncoderTuned(model, d, num_labels, label_kind, prompt_tokens if method == "prompt" else 0)
