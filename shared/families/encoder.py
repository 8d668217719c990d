"""The encoder family: BERT-style bidirectional encoders (BERT, RoBERTa, MiniLM, ...).

One stack, `encoder`: the embedding output and every layer's output, as transformers'
`hidden_states` gives them. Single texts or pairs are tokenized as the tokenizer builds
them ([CLS] a [SEP] b [SEP]), with token_type_ids where the tokenizer returns them.

`ENCODER_LAYOUTS` maps each architecture's module names (per layer: query, key, value,
attention output, its norm, intermediate, output, its norm) so that importance scores and
the pruned init find them by structure; an architecture without a layout trains with
`--init random` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import UserError
from shared.families.base import Backbone, ScoreTargets, StackSpec
from shared.tasks import Example, TaskSpec
from shared.tokens import TokenBatch

# model types that are bidirectional encoders (BERT is in transformers' causal-LM table too, as BertLMHeadModel)
ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta", "deberta-v2", "albert", "modernbert",
                       "mpnet", "camembert", "xlm-roberta-xl", "ernie", "megatron-bert", "nomic_bert", "mobilebert", "funnel",
                       "squeezebert", "rembert", "roformer", "luke", "data2vec-text", "xmod", "nezha", "ibert", "convbert"}


@dataclass(frozen=True)
class EncoderLayout:
    """Where an architecture keeps each part of layer `{i}` (format strings), and its word embeddings."""

    word_embeddings: str
    query: str
    key: str
    value: str
    attention_output: str
    attention_norm: str
    intermediate: str
    output: str
    output_norm: str


BERT_LAYOUT = EncoderLayout(
    word_embeddings="embeddings.word_embeddings",
    query="encoder.layer.{i}.attention.self.query", key="encoder.layer.{i}.attention.self.key",
    value="encoder.layer.{i}.attention.self.value", attention_output="encoder.layer.{i}.attention.output.dense",
    attention_norm="encoder.layer.{i}.attention.output.LayerNorm", intermediate="encoder.layer.{i}.intermediate.dense",
    output="encoder.layer.{i}.output.dense", output_norm="encoder.layer.{i}.output.LayerNorm",
)

ENCODER_LAYOUTS: dict[str, EncoderLayout] = {"bert": BERT_LAYOUT}


def layout_of(model: torch.nn.Module) -> str | None:
    """The name of the layout whose modules this model has (None: an architecture the map does not know)."""
    names = dict(model.named_modules())
    for name, layout in ENCODER_LAYOUTS.items():
        if layout.word_embeddings in names and layout.query.format(i=0) in names:
            return name
    return None


def unknown_layout_error(model_type: str) -> UserError:
    return UserError(f"the pruned init does not know the layers of encoder architecture {model_type!r}; "
                     "train it with --init random")


class EncoderBackbone(Backbone):
    family = "encoder"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.d_model = int(c.hidden_size)
        self.num_layers = int(c.num_hidden_layers)
        self.num_heads = int(c.num_attention_heads)

    @classmethod
    def accepts(cls, config) -> bool:
        return not getattr(config, "is_encoder_decoder", False) and config.model_type in ENCODER_MODEL_TYPES

    @classmethod
    def load_model(cls, path: str, config, **common) -> torch.nn.Module:
        import transformers

        return transformers.AutoModel.from_pretrained(path, config=config, use_safetensors=True, **common)

    def stacks(self, with_candidates: bool = True) -> list[StackSpec]:
        return [StackSpec("encoder", self.num_layers + 1)]

    def tokenize(self, examples: list[Example], spec: TaskSpec, max_length: int, max_target_length: int):
        firsts = [ex.texts[0] for ex in examples]
        seconds = [ex.texts[1] for ex in examples] if examples and len(examples[0].texts) > 1 else None
        encoded = self.tokenizer(firsts, seconds, truncation=True, max_length=max_length)
        stack = {"input_ids": encoded["input_ids"]}
        if "token_type_ids" in encoded:
            stack["token_type_ids"] = encoded["token_type_ids"]
        return {"encoder": stack}

    def _forward(self, stack: dict[str, torch.Tensor]):
        kwargs = {"token_type_ids": stack["token_type_ids"]} if "token_type_ids" in stack else {}
        return self.model(input_ids=stack["input_ids"], attention_mask=stack.get("attention_mask"), output_hidden_states=True, **kwargs)

    @torch.inference_mode()
    def states(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        return {"encoder": torch.stack(self._forward(batch["encoder"]).hidden_states, dim=2)}

    # --- importance ---------------------------------------------------------------------------

    def layout(self) -> EncoderLayout:
        name = layout_of(self.model)
        if name is None:
            raise unknown_layout_error(self.config.model_type)
        return ENCODER_LAYOUTS[name]

    def score_targets(self) -> ScoreTargets:
        layout, rows, qkv = self.layout(), [], []
        for i in range(self.num_layers):
            attention = layout.query.format(i=i).rsplit(".", 1)[0]
            qkv.append((attention, layout.query.format(i=i), layout.key.format(i=i), layout.value.format(i=i)))
            rows += [layout.attention_output.format(i=i), layout.intermediate.format(i=i), layout.output.format(i=i)]
        return ScoreTargets(rows=rows, qkv=qkv, columns=[layout.word_embeddings])

    def pooled(self, stack: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mask-weighted mean of the last layer [B, d], in float32 (the probe's features)."""
        last = self._forward(stack).last_hidden_state.float()
        weights = stack["attention_mask"].to(last.dtype).unsqueeze(-1)
        return (last * weights).sum(1) / weights.sum(1).clamp(min=1)

    def fisher_objective(self, batches, labels, spec):
        """Encoders have no task head before training: a linear probe is fitted (LBFGS, from zeros,
        small L2 penalty) on the frozen pooled states of the Fisher samples, computed exactly as
        the loss is (token_type_ids included), and its loss is differentiated."""
        with torch.no_grad():
            features = torch.cat([self.pooled(b["encoder"]) for b in batches])
        targets = torch.cat(labels).to(features.device)
        loss_fn = probe_loss(spec)
        with torch.enable_grad():
            probe = fit_probe(features, targets, spec.num_labels, loss_fn)

        def losses(batch: TokenBatch, example_labels: torch.Tensor) -> torch.Tensor:
            return loss_fn(probe(self.pooled(batch["encoder"])), example_labels.to(self.device), reduction="none")

        return losses


def probe_loss(spec: TaskSpec):
    if spec.label_kind == "regression":
        return lambda out, y, reduction="mean": torch.nn.functional.mse_loss(out.squeeze(-1), y.float(), reduction=reduction)
    return lambda out, y, reduction="mean": torch.nn.functional.cross_entropy(out, y.long(), reduction=reduction)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, outputs: int, loss_fn) -> torch.nn.Linear:
    """A linear head on frozen features (LBFGS from zeros: the problem is convex, and a random
    start made the scores, so the pruned init and the trained network, differ from run to run)."""
    head = torch.nn.Linear(features.shape[1], outputs).to(features.device, features.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(head(features), labels) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.requires_grad_(False)
