"""What every backbone family provides: the frozen model, its stacks of states, and its batches.

A family module (`shared/families/t5.py`, `encoder.py`, ...) defines one `Backbone`
subclass. The rest of the code talks to it only through this interface:

- `accepts(config)`: whether a transformers config belongs to the family (honest detection);
- `stacks(...)`: the stacks of states it stores per split (`StackSpec`), primary stack first;
- `tokenize(...)` / `candidate_inputs(...)`: the id sequences of each stack, per example and
  per candidate label: the one place for shifting and candidates (padding: `shared.tokens`);
- `states(batch)`: run the frozen backbone on a padded `TokenBatch`, returning each stack's
  ladder inputs [S, L, states, d] (state 0 is the embedding output);
- `lm_head()`: the frozen LM head the side network reuses, if any;
- `fisher_objective(...)` and `score_targets()`: what Fisher importance differentiates and
  which parameters' rows are scored for the pruned init.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from shared.tasks import Example, TaskSpec
from shared.tokens import TokenBatch

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype", "architectures"}


@dataclass(frozen=True)
class StackSpec:
    """One stack of stored states: its name, how many states per token, and whose sequences it holds.

    `per_candidate`: K sequences per example, one per candidate label (example-major), stored
    for evaluation splits only, so that evaluating needs no backbone."""

    name: str
    num_states: int  # embedding output + blocks
    per_candidate: bool = False


@dataclass
class BackboneInfo:
    """What identifies a backbone in a cache manifest and a side model folder."""

    name: str
    family: str
    model_type: str
    d_model: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    vocab_size: int
    revision: str | None
    config_fingerprint: str
    tokenizer_fingerprint: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


def sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_fingerprint(config) -> str:
    """A transformers config's fingerprint, without keys that change between saves of the same model."""
    return sha256_json({k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS})


@dataclass
class ScoreTargets:
    """The parameters whose importance the pruned init reads, named as in the model.

    rows: Linear modules -> `<name>.rows` (L1 over each output row);
    qkv: (attention, q, k, v) module names, or (attention, fused, 3) for one fused q/k/v weight
    cut into thirds -> `<attention>.qkv` (L1 over each row of the elementwise product of the
    three importances); columns: embedding modules -> `<name>.columns`."""

    rows: list[str] = field(default_factory=list)
    qkv: list[tuple[str, str, str, str] | tuple[str, str, int]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


class Backbone:
    """A frozen backbone, its tokenizer and its device. Subclasses are the families."""

    family: ClassVar[str] = ""
    label_kinds: ClassVar[tuple[str, ...]] = ("class", "regression")  # the task kinds it can tokenize ("lm": instruction)
    takes_prompts: ClassVar[bool] = False  # whether it renders a user's --prompt and --label-words (TaskSpec.prompt)

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, revision: str | None, device: torch.device,
                 dtype: torch.dtype):
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.device = device
        self.dtype = dtype
        self.config = model.config

    # --- what the family is -----------------------------------------------------------------

    @classmethod
    def accepts(cls, config) -> bool:
        """Whether a transformers config is a model of this family."""
        raise NotImplementedError

    @classmethod
    def load_model(cls, path: str, config, **common) -> torch.nn.Module:
        """The transformers model (safetensors weights only)."""
        raise NotImplementedError

    d_model: int
    num_layers: int
    num_decoder_layers: int = 0
    num_heads: int

    def info(self) -> BackboneInfo:
        vocab = sorted(self.tokenizer.get_vocab().items())
        special = sorted(str(t) for t in self.tokenizer.all_special_tokens)
        return BackboneInfo(
            name=self.name, family=self.family, model_type=self.config.model_type, d_model=self.d_model,
            num_layers=self.num_layers, num_decoder_layers=self.num_decoder_layers, num_heads=self.num_heads,
            vocab_size=int(self.config.vocab_size), revision=self.revision,
            config_fingerprint=config_fingerprint(self.config), tokenizer_fingerprint=sha256_json([vocab, special]),
        )

    def stacks(self, with_candidates: bool = True) -> list[StackSpec]:
        """The stacks stored for a split (per-candidate stacks only `with_candidates`), primary first."""
        raise NotImplementedError

    convert_gguf: ClassVar[Callable[[Path, Path], None] | None] = None  # GGUF file -> safetensors folder, where the family reads GGUF

    # --- tokens -------------------------------------------------------------------------------

    def tokenize(self, examples: list[Example], spec: TaskSpec, max_length: int, max_target_length: int
                 ) -> dict[str, dict[str, list[list[int]]]]:
        """Per-example stacks: stack -> {"input_ids": [...], other id arrays ...}, one sequence per example."""
        raise NotImplementedError

    def candidate_inputs(self, spec: TaskSpec, max_target_length: int) -> dict[str, dict[str, list[list[int]]]]:
        """Per-candidate stacks: stack -> id arrays of the K candidate sequences (the same for every example)."""
        return {}

    def example_columns(self, examples: list[Example], spec: TaskSpec) -> dict[str, list]:
        """Extra columns of a split's examples.parquet (e.g. T5's target text)."""
        return {}

    def candidate_labels(self, spec: TaskSpec) -> list[str] | None:
        """The candidate label strings the per-candidate stacks hold, in order (None: no such stack)."""
        return None

    # --- states -------------------------------------------------------------------------------

    def states(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """Ladder inputs [S, L, states, d] of every stack in `batch` (padded on this device)."""
        raise NotImplementedError

    def lm_head(self) -> tuple[torch.Tensor, float] | None:
        """The frozen LM head weight [V, d] and the scale applied before it, or None."""
        return None

    def lm_head_tensor_names(self) -> list[str]:
        """Names under which the LM head weight may be stored in the model's safetensors, in order."""
        return []

    # --- importance ---------------------------------------------------------------------------

    def score_targets(self) -> ScoreTargets:
        raise NotImplementedError

    def fisher_max_tokens(self, spec: TaskSpec, default: int) -> int:
        """Padded tokens (examples x longest) per batched Fisher forward: `default`, or fewer where the loss
        holds more per token (a decoder's full-vocabulary head)."""
        return default

    def fisher_objective(self, batches: list[TokenBatch], labels: list[torch.Tensor], spec: TaskSpec
                         ) -> Callable[[TokenBatch, torch.Tensor], torch.Tensor]:
        """A function (batch, labels) -> each example's own loss [N], which Fisher importance differentiates.
        `batches`/`labels` are the Fisher samples (an encoder fits its probe on them first). Every use of a
        scored weight must go through the nn.Linear or nn.Embedding that holds it (no functional reads):
        backbone_cache.fisher reads the per-example gradients from those modules' hooks."""
        raise NotImplementedError

    def layer_count(self, stack: str) -> int:
        return next(s.num_states for s in self.stacks() if s.name == stack)
