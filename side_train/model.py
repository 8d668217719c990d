"""The ladder side network (LST, Sung et al. 2022, §3.2-3.4): the parts every family shares.

The side network never sees the backbone's weights at run time, only its hidden states:

    s = down_emb(dropout(h_0))                       # embedding output, own down-projection
    for j, i in enumerate(side_layers):              # backbone block i feeds side block j
        mu = sigmoid(alpha_j / T)                    # alpha_j starts at 0, T = 0.1
        s = mu * s + (1 - mu) * ladder_j(h_{i+1})    # gate, then the side block
        s = block_j(s)
    for block in free_blocks:                        # decoders, --free-blocks N (xLadder): no ladder
        s = block(s)
    s = dropout(final_norm(s))

`LadderStack` is that loop over one stack of backbone states; `SideNetwork` holds the
stacks, the output (an up-projection, then the family's head) and save/load. Each family
(side_train/families/) gives its blocks, its config dataclass, its loss and predictions, and
the map from backbone weights for the pruned init. `states` tensors are
[batch, tokens, 1 + len(side_layers), d]: the embedding output, then the ladder input of each
side layer, in order. CPU speed plumbing lives in side_train.kernels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared.config import index_list
from shared.errors import UserError
from shared.families import Backbone
from side_train.kernels import Dropout, attention_with_dropout, compute_dtype, ladder_projection

SIDE_MODEL_VERSION = 2


@dataclass
class SideOptions:
    """The side network's settings a user chooses (flags of run and sweep, or Python)."""

    reduction: int = 8  # side width = backbone width / r
    side_layers: list[int] | None = None  # backbone blocks that feed side blocks (None: all but drop_layers)
    drop_layers: int = 0
    dropout: float = 0.1
    attention_dropout: float | None = None  # None: `dropout`, as the reference
    pooling: str = "mean"  # families with a classification head: mean or cls
    merge_final: bool = False  # decoders: QST's gated mix of the backbone's final normed state before the head
    standardize_ladders: bool = False  # ladders read each channel as (h - mean) / std x the layer's median std
    free_blocks: int = 0  # decoders: side blocks after the laddered ones, fed by no ladder (xLadder)

    def check(self) -> None:
        if self.reduction <= 0:
            raise UserError(f"--reduction must be positive, got {self.reduction}")
        if self.free_blocks < 0:
            raise UserError(f"--free-blocks must be 0 or more, got {self.free_blocks}")
        if self.side_layers and self.drop_layers:
            raise UserError("--side-layers and --drop-layers both choose the side layers; give one of them")
        if self.side_layers is not None and len(set(self.side_layers)) != len(self.side_layers):
            raise UserError(f"--side-layers {','.join(map(str, self.side_layers))} names a layer twice; list each once")
        for flag, value in (("--dropout", self.dropout), ("--attention-dropout", self.attention_dropout)):
            if value is not None and not 0.0 <= value < 1.0:
                raise UserError(f"{flag} must be in [0, 1), got {value}")


@dataclass
class GenerationConfig:
    """How a side network generates (`side_train.predict --generate`): greedy at temperature 0, else sampled."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0  # the sampling generator's seed
    batch_size: int = 8  # prompts generated together (left-padded)

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be 0 (off) or positive, got {self.top_k}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(kw_only=True)
class SideConfig:
    """What every family's side network config holds; each family adds its own fields."""

    layer_fields: ClassVar[tuple[str, ...]] = ()  # the fields that list backbone blocks (the stacks `stack_layers` feeds)

    family: str
    backbone_d: int
    num_heads: int
    reduction: int = 8
    dropout: float = 0.1
    attention_dropout: float | None = None  # on the attention probabilities; None: `dropout` (the reference)
    gate_temperature: float = 0.1
    standardize_ladders: bool = False  # ladder inputs standardized per channel by training-split statistics
    num_labels: int = 2
    label_kind: str = "class"
    backbone: dict = field(default_factory=dict)  # name, revision, config_fingerprint of the backbone it reads

    @property
    def attention_p(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def d(self) -> int:
        return self.backbone_d // self.reduction

    def stack_layers(self) -> dict[str, list[int]]:
        """The backbone blocks each stored stack feeds (per-candidate stacks included)."""
        raise NotImplementedError

    def check(self) -> None:
        if self.reduction <= 0:
            raise UserError(f"--reduction must be positive, got {self.reduction}")
        if self.backbone_d % self.reduction:
            raise UserError(f"--reduction {self.reduction} does not divide the backbone's d = {self.backbone_d}; pick a divisor")
        for flag, value in (("--dropout", self.dropout), ("--attention-dropout", self.attention_p)):
            if not 0.0 <= value < 1.0:
                raise UserError(f"{flag} must be in [0, 1), got {value}")

    def to_json(self) -> dict:
        return asdict(self)


def backbone_record(backbone: Backbone) -> dict:
    """What a side model folder records of its backbone (and where its frozen LM head is stored)."""
    info = backbone.info()
    return {"name": info.name, "revision": info.revision, "model_type": info.model_type,
            "config_fingerprint": info.config_fingerprint, "lm_head_tensors": backbone.lm_head_tensor_names()}


def side_layers(num_layers: int, drop: int = 0, explicit: list[int] | None = None) -> list[int]:
    """Which backbone blocks feed side blocks: an explicit list, or all but `drop` interleaved (§3.4)."""
    if explicit:
        layers = sorted(explicit)
        if layers[0] < 0 or layers[-1] >= num_layers:
            raise UserError(f"side layers {layers} must be block indices in 0..{num_layers - 1}")
        return layers
    if drop < 0 or drop >= num_layers:
        raise UserError(f"--drop-layers {drop} must be in 0..{num_layers - 1}")
    if drop == 0:
        return list(range(num_layers))
    # Drop evenly spaced blocks, starting from the bottom: 12 blocks, drop 3 -> [1,2,3,5,6,7,9,10,11].
    step = num_layers / drop
    dropped = {int(k * step) for k in range(drop)}
    return [i for i in range(num_layers) if i not in dropped]


def parse_layer_list(text: str | None) -> list[int] | None:
    """`--side-layers` text: comma-separated block indices and inclusive ranges ("0,2,9-17"); None if empty."""
    if not text or not str(text).strip():
        return None
    return index_list(text, "--side-layers")


class RMSNorm(nn.Module):
    """Scale-only layer norm (T5, Llama): no mean subtraction, no bias."""

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
            out = attention_with_dropout(q, k, v, mask, position_bias, self.scale, p)
        else:
            # added here, per block: a [B, heads, Lq, L] sum made once per stack would be kept for backward
            bias = mask if position_bias is None else mask + position_bias
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p, scale=self.scale)
        return self.o(out.transpose(1, 2).reshape(b, n, self.heads * self.d_head))


def additive_mask(mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """[B, L] bool -> [B, 1, Lq, L] additive float mask (0 keep, -inf-ish drop)."""
    keep = mask[:, None, None, :]
    if causal:
        n = mask.shape[1]
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()[None, None]
    return torch.zeros(keep.shape, device=mask.device).masked_fill(~keep, torch.finfo(torch.float32).min)


class LadderStack(nn.Module):
    """Down-projections, gates and thin blocks over one backbone stack's states.

    Blocks are called as `block(s, *self.block_inputs(mask, context_mask), context)`; a family
    overrides `block_inputs` for its masks and position terms, and gives a final norm or none.
    Blocks beyond `layers` are free: they run after the laddered ones and read no ladder."""

    def __init__(self, cfg: SideConfig, layers: list[int], blocks: list[nn.Module], final_norm: nn.Module | None = None):
        super().__init__()
        self.cfg, self.layers = cfg, list(layers)
        self.down_emb = nn.Linear(cfg.backbone_d, cfg.d)
        self.ladders = nn.ModuleList(nn.Linear(cfg.backbone_d, cfg.d) for _ in layers)
        self.gate_alpha = nn.Parameter(torch.zeros(len(layers)))
        self.blocks = nn.ModuleList(blocks)
        if final_norm is not None:
            self.final_norm = final_norm
        self.drop = Dropout(cfg.dropout)
        self.recompute = False  # set by SideNetwork.set_recompute
        if cfg.standardize_ladders:  # per stored state (embedding, then each ladder) and channel; identity until set
            self.register_buffer("input_shift", torch.zeros(1 + len(layers), cfg.backbone_d))
            self.register_buffer("input_factor", torch.ones(1 + len(layers), cfg.backbone_d))

    def set_input_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardize the ladder inputs: each channel of state j (0: the embedding) becomes
        (h - mean[j]) / std[j] x median(std[j]), so every channel varies alike and each layer keeps
        its typical scale. mean, std [1 + len(layers), D] from training-split states."""
        std = std.double().clamp(min=1e-6)
        self.input_shift.copy_(mean)
        self.input_factor.copy_(std.median(dim=1, keepdim=True).values / std)

    def ladder(self, j: int, states: torch.Tensor, drop: Dropout | None = None) -> torch.Tensor:
        """Ladder j's projection of its stored states [..., D] (j = 0: the embedding's down-projection)."""
        linear = self.down_emb if j == 0 else self.ladders[j - 1]
        standardize = (self.input_shift[j], self.input_factor[j]) if self.cfg.standardize_ladders else None
        return ladder_projection(linear, states, drop, standardize)

    def block_inputs(self, mask: torch.Tensor, context_mask: torch.Tensor | None) -> tuple:
        """(self-attention mask, position bias, cross-attention mask) for every block."""
        return additive_mask(mask), None, None

    def forward(self, states: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """states [B, L, 1 + len(layers), D] (any float dtype); mask [B, L] bool."""
        s = self.ladder(0, states[:, :, 0], self.drop)
        inputs = self.block_inputs(mask, context_mask)
        for j, block in enumerate(self.blocks):
            if j < len(self.layers):
                mu = torch.sigmoid(self.gate_alpha[j] / self.cfg.gate_temperature)
                s = mu * s + (1 - mu) * self.ladder(j + 1, states[:, :, j + 1])
            if self.recompute and torch.is_grad_enabled():
                # reentrant: the checkpoint saves the block's inputs through autograd (so
                # side_train.memory counts them) and re-runs the block, same dropout masks, in backward
                s = checkpoint(block, s, *inputs, context, use_reentrant=True)
            else:
                s = block(s, *inputs, context)
        if hasattr(self, "final_norm"):
            s = self.final_norm(s)
        return self.drop(s)


class SideNetwork(nn.Module):
    """A family's whole side network: its ladder stacks, `upsample` (d -> D) and its head.

    Families implement `loss(batch)` and `predict(batch)` (label values: a class index or a
    regression value per example), `init_from_backbone(state, scores)` and `config_for(...)`."""

    config_class: ClassVar[type[SideConfig]] = SideConfig
    needs_lm_head: ClassVar[bool] = False  # whether it reuses the backbone's frozen LM head
    train_stacks: ClassVar[tuple[str, ...]] = ()  # the stored stacks a training batch holds
    eval_stacks: ClassVar[tuple[str, ...]] = ()  # ... and an evaluation batch
    can_generate: ClassVar[bool] = False  # `generate_values` with a live backbone (--eval generate)
    baselines: ClassVar[object | None] = None  # the family's side_train.baselines.FamilyBaselines (compare)

    def __init__(self, cfg: SideConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg

    def ladder_stacks(self) -> list[LadderStack]:
        return [m for m in self.children() if isinstance(m, LadderStack)]

    def set_recompute(self, enabled: bool) -> SideNetwork:
        """Activation checkpointing of the side blocks: keep each block's inputs, recompute its
        activations in backward (about one more side forward per step; the same loss, gradients
        equal up to float summation order)."""
        for stack in self.ladder_stacks():
            stack.recompute = enabled
        return self

    def loss(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, batch) -> torch.Tensor | int:
        """How many terms `loss` averages (a data-parallel step weights each rank's mean by it):
        the examples; a family whose loss averages tokens returns its target tokens."""
        return batch.size

    def predict(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def generate_values(self, source, rows, device: torch.device, spec) -> object:
        """Label values by generating text with the live backbone (families with `can_generate`)."""
        raise UserError(f"--eval generate: the {self.cfg.family} side network scores labels, it does not generate; "
                        "drop --eval generate")

    def generate_texts(self, backbone: Backbone, inputs: list[list[str]], spec, max_length: int,
                       settings: GenerationConfig) -> list[str]:
        """Generated text for raw inputs with the live backbone (`side_train.predict --generate`)."""
        raise UserError(f"--generate: the {self.cfg.family} side network does not generate text (decoder backbones do)")

    def token_losses(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction tasks: per example the summed response-token loss and the token count [B] (float64)."""
        raise UserError(f"the {self.cfg.family} side network has no language-model loss; instruction tasks need a decoder backbone")

    def init_from_backbone(self, state: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict:
        """Pruned init from the backbone's state dict and per-row scores; returns the kept indices."""
        raise NotImplementedError

    def frozen_bytes_on_cpu(self, bf16: bool) -> int:
        """Bytes the network keeps beside its parameters in a CPU bf16 step (a bf16 copy of a frozen head)."""
        return 0

    # --- init -------------------------------------------------------------------------------

    def init_projections(self, std: float = 0.01) -> None:
        """Ladders, embedding down-projections and the up-projection: N(0, std), bias 0 (reference); gates 0."""
        linears = [self.upsample] + [m for s in self.ladder_stacks() for m in [s.down_emb, *s.ladders]]
        for linear in linears:
            nn.init.normal_(linear.weight, 0.0, std)
            nn.init.zeros_(linear.bias)
        for stack in self.ladder_stacks():
            nn.init.zeros_(stack.gate_alpha)

    def random_init(self) -> None:
        """Fan-in normal init of the side blocks' linear layers; norms at 1, biases 0."""
        for stack in self.ladder_stacks():
            for module in stack.blocks.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, 0.0, module.in_features**-0.5)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    # --- parameters and files -------------------------------------------------------------

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained(self, folder: Path) -> None:
        """side_config.json (the family, its config and the backbone it reads) and model.safetensors
        (the trainable weights; a frozen LM head is not saved, from_pretrained reads it from the backbone)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors.tmp"), metadata={"format": "lst-side-model"})
        (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")
        config = {"side_model_version": SIDE_MODEL_VERSION, **self.cfg.to_json()}
        (folder / "side_config.json").write_text(json.dumps(config, indent=1))


def load_side_config(folder: Path) -> SideConfig:
    """A side model folder's config, as its family's dataclass."""
    from side_train.families import side_family

    folder = Path(folder)
    if not (folder / "side_config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} holds no side network (side_config.json and model.safetensors)")
    obj = json.loads((folder / "side_config.json").read_text())
    if obj.pop("side_model_version", None) != SIDE_MODEL_VERSION:
        raise UserError(f"{folder} was saved by another version of this tool (side model version "
                        f"{SIDE_MODEL_VERSION} expected); train it again with this version")
    network = side_family(obj.get("family", "?"))
    return network.config_class(**obj)


def from_pretrained(folder: Path, lm_head: torch.Tensor | None = None) -> SideNetwork:
    """Load a saved side network; a frozen LM head is read from its backbone's safetensors unless given."""
    from safetensors.torch import load_file

    from side_train.families import side_family

    cfg = load_side_config(folder)
    network_class = side_family(cfg.family)
    if network_class.needs_lm_head and lm_head is None:
        lm_head = network_class.load_lm_head(cfg)
    model = network_class(cfg, lm_head) if network_class.needs_lm_head else network_class(cfg)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model
