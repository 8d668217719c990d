"""The parameter-efficient baselines of the LST paper's Table 1, on a Hugging Face backbone.

- full: every backbone parameter trains.
- adapter: Houlsby bottleneck adapters (x + up(swish(down(x))), up zero-initialised) after
  the attention and the feed-forward output projections of every block, plus the layer
  norms (Houlsby et al.; peft has no bottleneck adapter, so it is here).
- lora: peft LoRA on the attention query and value projections.
- qlora: the same LoRA over the backbone's linear layers stored in 4-bit NF4 (bitsandbytes,
  QLoRA's storage; the LM head and embeddings stay as they are). Needs a CUDA GPU and
  bitsandbytes; elsewhere `qlora_unavailable` gives the reason and compare reports the row as
  skipped. It is not in the default method list (`GPU_BASELINES`).
- bitfit: the bias terms. T5 has none, so, as in the paper's baseline setup (Mahabadi et al.),
  a zero bias is added to every linear layer (the LM head included) and trained with the
  layer norms; BERT-family encoders train their existing biases.
- prompt: peft prompt tuning, soft tokens prepended to the (encoder) input.

Sizes follow the paper for T5-base (222.9M parameters): adapter width 48 (2 adapters per
block, 48 in all, with layer norms: 1.63%, as in Table 1), LoRA rank 32 on q and v (1.59%;
the paper reports 1.71%), BitFit 0.13%, and 100 prompt tokens (0.03%).

What differs by backbone family lives in the family's side module (side_train/families/,
section "baselines for side_train.compare"), as one `FamilyBaselines` object set on the
family's side network class as `baselines`: where adapters go, what BitFit trains, peft's task
type, how a random-weight model is built, and the trainable wrapper (T5: sequence-to-sequence
on the target text, scored by the summed log-probability of each label string; encoders: a
classification or regression head on the mean-pooled last layer, the same pooling and head as
the encoder side network). Every wrapper is a `BaselineModule`: `loss(inputs)` and
`predict(inputs)` on `TokenInputs`. The rest of this module knows no family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError
from shared.tokens import TokenBatch

ADAPTER_WIDTH = 48
LORA_RANK = 32
PROMPT_TOKENS = 100
BASELINES = ("full", "adapter", "lora", "bitfit", "prompt")
GPU_BASELINES = ("qlora",)  # run only where a CUDA GPU and bitsandbytes are there; never on the meta device


@dataclass
class TokenInputs:
    """One batch of token ids (a padded `TokenBatch`, per stack), each example's label value, and
    whether anything is padded (decided on the CPU, so that it survives a move to the meta device)."""

    tokens: TokenBatch
    labels: torch.Tensor  # class index or regression value per example
    padded: bool = True

    @classmethod
    def of(cls, tokens: TokenBatch, labels: torch.Tensor) -> TokenInputs:
        padded = any(not bool(stack["attention_mask"].all()) for stack in tokens.values())
        return cls(tokens, labels, padded)

    def to(self, device: torch.device) -> TokenInputs:
        tokens = {stack: {name: t.to(device) for name, t in arrays.items()} for stack, arrays in self.tokens.items()}
        return TokenInputs(tokens, self.labels.to(device), self.padded)

    def tensors(self) -> list[torch.Tensor]:
        return [*(t for arrays in self.tokens.values() for t in arrays.values()), self.labels]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def size(self) -> int:
        return len(self.labels)

    def mask(self, stack: str) -> torch.Tensor | None:
        """The attention mask to hand a Hugging Face model: None when nothing is padded (transformers
        drops an all-ones mask itself; passing None also lets the step run on the meta device)."""
        return self.tokens[stack]["attention_mask"] if self.padded else None

    def model_tokens(self) -> TokenBatch:
        """The token batch for a family's `Backbone.states`: without attention masks when nothing is padded."""
        if self.padded:
            return self.tokens
        return {stack: {k: v for k, v in arrays.items() if k != "attention_mask"} for stack, arrays in self.tokens.items()}


class BaselineModule(nn.Module):
    """A trainable baseline: the (modified, possibly peft-wrapped) backbone model and its output."""

    def loss(self, inputs: TokenInputs) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, inputs: TokenInputs) -> torch.Tensor:
        """Each example's predicted label value (class index or regression value), float64 on the CPU."""
        raise NotImplementedError


class FamilyBaselines:
    """What the baselines need from one backbone family (a subclass per family, in its side module)."""

    peft_task: str = "FEATURE_EXTRACTION"  # peft's task type for the family's model

    def random_model(self, config) -> nn.Module:
        """The family's transformers model built from `config` with random weights (on the current default device)."""
        raise NotImplementedError

    def adapter_sites(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of each block's attention-output and feed-forward-output projection."""
        raise NotImplementedError

    def bitfit(self, model: nn.Module) -> None:
        """Make BitFit's parameters trainable in a frozen model (default: its existing biases)."""
        train_biases(model)

    def wrap(self, model: nn.Module, backbone, spec, prompt_tokens: int) -> BaselineModule:
        """The trainable module around `model`; `prompt_tokens`: soft tokens peft prepends (0: none)."""
        raise NotImplementedError

    def wrap_with(self, model: nn.Module, backbone, spec, prompt_tokens: int, options=None) -> BaselineModule:
        """`wrap`, given the LST side's `SideOptions` too, for a family whose output head follows them
        (decoder: label words, or a head on the last token with `pooling="last"`). Default: `wrap`."""
        return self.wrap(model, backbone, spec, prompt_tokens)


def family_baselines(family: str) -> FamilyBaselines:
    """The baselines of a backbone family (its side network class's `baselines`)."""
    from side_train.families import side_family

    found = getattr(side_family(family), "baselines", None)
    if found is None:
        raise UserError(f"side_train.compare does not support the {family} family yet: its side network "
                        "(side_train/families/) has no baselines section")
    return found


@dataclass
class BaselineSizes:
    """The baselines' sizes (defaults: the paper's T5-base settings)."""

    adapter_width: int = ADAPTER_WIDTH
    lora_rank: int = LORA_RANK
    prompt_tokens: int = PROMPT_TOKENS


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


def add_adapters(model: nn.Module, family: FamilyBaselines, width: int) -> None:
    """Insert adapters; train them and the layer norms, freeze the rest."""
    model.requires_grad_(False)
    for parent, name in family.adapter_sites(model):
        setattr(parent, name, AdaptedLinear(getattr(parent, name), width))
    for module in model.modules():
        if isinstance(module, Adapter) or is_layer_norm(module):
            module.requires_grad_(True)


def is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


# --- BitFit -----------------------------------------------------------------------------------


def train_biases(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.requires_grad_(True)


def add_bitfit(model: nn.Module, family: FamilyBaselines) -> None:
    """Train only biases (and what else the family's BitFit trains)."""
    model.requires_grad_(False)
    family.bitfit(model)


# --- peft -------------------------------------------------------------------------------------


def lora_targets(model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q", "v"], ["query", "value"], ["q_proj", "v_proj"]):
        if set(pair) <= names:
            return pair
    raise UserError(f"found no query/value projections to put LoRA on in {type(model).__name__}")


def apply_lora(model: nn.Module, task: str, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=task, r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=lora_targets(model))
    return get_peft_model(model, config)


def qlora_unavailable(device: torch.device) -> str | None:
    """Why the 4-bit baseline cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        where = "the meta device (4-bit storage has no meta accounting here)" if device.type == "meta" else device.type
        return f"needs a CUDA GPU for bitsandbytes' 4-bit kernels; this run is on {where}"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "needs the bitsandbytes package (pip install bitsandbytes)"
    return None


def quantize_4bit(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every nn.Linear but the output head with a bitsandbytes NF4 Linear4bit (double-quantized
    statistics, bfloat16 compute, as QLoRA), then move the model to `device` (where the weights are packed)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            setattr(parent, name, quantized)
    return model.to(device)


def apply_qlora(model: nn.Module, task: str, rank: int, device: torch.device) -> nn.Module:
    """LoRA (as `apply_lora`) over a 4-bit copy of `model` on `device`."""
    reason = qlora_unavailable(device)
    if reason:
        raise UserError(f"qlora {reason}")
    targets = lora_targets(model)
    model = quantize_4bit(model.requires_grad_(False), device)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=task, r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, config)


def apply_prompt_tuning(model: nn.Module, task: str, tokens: int) -> nn.Module:
    from peft import PromptTuningConfig, get_peft_model

    # One set of soft tokens, on the (encoder) input (Lester et al.); peft's default for
    # seq2seq allocates a second, unused set for the decoder.
    config = PromptTuningConfig(task_type=task, num_virtual_tokens=tokens, num_transformer_submodules=1)
    return get_peft_model(model, config)


# --- dispatch ---------------------------------------------------------------------------------


def build_baseline(method: str, backbone, spec, sizes: BaselineSizes | None = None, options=None) -> BaselineModule:
    """Turn a fresh backbone's model into `method`'s trainable module (modifies `backbone.model`);
    `options`: the LST side's `SideOptions`, for families whose head follows them (`FamilyBaselines.wrap_with`)."""
    sizes = sizes or BaselineSizes()
    family = family_baselines(backbone.family)
    model = backbone.model
    if method == "full":
        model.requires_grad_(True)
    elif method == "adapter":
        add_adapters(model, family, sizes.adapter_width)
    elif method == "bitfit":
        add_bitfit(model, family)
    elif method == "lora":
        model = apply_lora(model, family.peft_task, sizes.lora_rank)
    elif method == "qlora":
        model = apply_qlora(model, family.peft_task, sizes.lora_rank, backbone.device)
    elif method == "prompt":
        model = apply_prompt_tuning(model, family.peft_task, sizes.prompt_tokens)
    else:
        raise UserError(f"unknown baseline {method!r}; choose from {', '.join((*BASELINES, *GPU_BASELINES))}")
    return family.wrap_with(model, backbone, spec, sizes.prompt_tokens if method == "prompt" else 0, options)
