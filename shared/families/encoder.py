"""The encoder family: bidirectional encoders (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa, ALBERT, ModernBERT, ...).

One stack, `encoder`: the embedding output and every layer's output, as transformers'
`hidden_states` gives them. Single texts or pairs are tokenized as the tokenizer builds
them ([CLS] a [SEP] b [SEP]), with token_type_ids where the tokenizer returns them and the
model takes them.

`ENCODER_LAYOUTS` maps each architecture's structure (per layer: q, k, v or one fused qkv,
attention output, the norm before the feed-forward, intermediate, output, the norm after
the layer; the word embeddings and any projection to hidden width) so that importance
scores and the pruned init find the parts by structure, not by BERT's names. A layout fits
a model when all its modules exist with the shapes it expects (`EncoderLayout.fits`); an
architecture no layout fits trains with `--init random` only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from shared.errors import UserError
from shared.families.base import Backbone, ScoreTargets, StackSpec
from shared.tasks import Example, TaskSpec
from shared.tokens import TokenBatch

# model types that are bidirectional encoders (BERT is in transformers' causal-LM table too, as BertLMHeadModel);
# not Funnel: it pools the sequence between blocks, so its hidden_states are not one state per token and layer
ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta", "deberta-v2", "albert", "modernbert",
                       "mpnet", "camembert", "xlm-roberta-xl", "ernie", "megatron-bert", "nomic_bert", "mobilebert",
                       "squeezebert", "rembert", "roformer", "luke", "data2vec-text", "xmod", "nezha", "ibert", "convbert"}

# the config names each size is read through, first present wins (attribute maps apply: DistilBERT's dim is hidden_size)
CONFIG_NAMES = {
    "hidden size": ("hidden_size", "dim", "d_model"),
    "layer count": ("num_hidden_layers", "n_layers", "num_layers"),
    "head count": ("num_attention_heads", "n_heads", "num_heads"),
    "feed-forward width": ("intermediate_size", "hidden_dim", "d_ff", "d_inner", "ffn_dim"),
}
ACTIVATION_NAMES = ("hidden_act", "hidden_activation", "activation", "activation_function")
NORM_EPS_NAMES = ("layer_norm_eps", "norm_eps", "layer_norm_epsilon")


def config_value(config, what: str, names: tuple[str, ...] | None = None, default: object = None) -> object:
    """The first of `names` (default: CONFIG_NAMES[what]) the config has; a one-line error if none and no default."""
    for name in names or CONFIG_NAMES[what]:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise UserError(f"the {config.model_type!r} config gives no {what} (looked for {', '.join(names or CONFIG_NAMES[what])})")


@dataclass(frozen=True)
class EncoderLayout:
    """Where an architecture keeps each part of layer `{i}` (module-name format strings; `{next}` is i + 1).

    attention_norm is the norm between attention and feed-forward (post-norm: after the attention
    residual; pre-norm: the feed-forward's input norm), output_norm the norm after the layer
    (post-norm: its own; pre-norm: the next layer's input norm, and `final_norm` after the last),
    so each sits where the side block's post-norm sits. Names without `{i}` are one layer shared
    by all (ALBERT)."""

    word_embeddings: str
    attention_output: str
    attention_norm: str
    intermediate: str
    output: str
    output_norm: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    fused_qkv: str | None = None  # one Linear whose rows are q, k, v in equal thirds (instead of query/key/value)
    embedding_projection: str | None = None  # Linear(embedding width -> hidden) whose output is hidden_states[0]
    final_norm: str | None = None  # pre-norm: the norm after the last layer (its output_norm)
    gated: bool = False  # intermediate rows are [activated half; gate half] (GeGLU): only the activated half maps
    absent: tuple[str, ...] = ()  # modules whose presence means another structure (a second ALBERT layer group)

    def attention(self, i: int) -> str:
        """The attention module of layer i (the `<attention>.qkv` score's name)."""
        return (self.fused_qkv or self.query).format(i=i).rsplit(".", 1)[0]

    def names(self, i: int, num_layers: int) -> dict[str, str]:
        """Layer i's module names by part (query/key/value or fused_qkv, attention_output, ..., output_norm)."""
        parts = ("fused_qkv",) if self.fused_qkv else ("query", "key", "value")
        parts += ("attention_output", "attention_norm", "intermediate", "output", "output_norm")
        names = {part: getattr(self, part).format(i=i, next=i + 1) for part in parts}
        if self.final_norm is not None and i == num_layers - 1:
            names["output_norm"] = self.final_norm
        return names

    def embedding_target(self) -> str:
        """The module whose scores rank the first kept dims: the projection's output rows, else the embedding columns."""
        return self.embedding_projection or self.word_embeddings

    def fits(self, model: torch.nn.Module, hidden: int, num_layers: int) -> bool:
        """Whether every module this layout names exists in `model` with the shapes it expects."""
        modules = dict(model.named_modules())
        if any(name in modules for name in self.absent):
            return False

        def shape(name: str) -> tuple[int, ...] | None:
            weight = getattr(modules.get(name), "weight", None)
            return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None

        embedding = shape(self.word_embeddings)
        if embedding is None or len(embedding) != 2:
            return False
        if self.embedding_projection:  # narrower embeddings, projected to hidden width
            if shape(self.embedding_projection) != (hidden, embedding[1]):
                return False
        elif embedding[1] != hidden:
            return False
        for i in range(num_layers):
            n = self.names(i, num_layers)
            qkv = [shape(n["fused_qkv"])] if self.fused_qkv else [shape(n[p]) for p in ("query", "key", "value")]
            if any(s != ((3 if self.fused_qkv else 1) * hidden, hidden) for s in qkv):
                return False
            ff, out = shape(n["intermediate"]), shape(n["output"])
            if shape(n["attention_output"]) != (hidden, hidden) or ff is None or out is None or len(ff) != 2:
                return False
            if ff[1] != hidden or out != (hidden, ff[0] // 2 if self.gated else ff[0]):
                return False
            if shape(n["attention_norm"]) != (hidden,) or shape(n["output_norm"]) != (hidden,):
                return False
        return True


def bert_style(layer: str, query: str, key: str, value: str, attention_output: str, attention_norm: str, intermediate: str,
               output: str, output_norm: str, **kwargs) -> EncoderLayout:
    """A post-norm layout whose layer names are `layer` + a suffix each."""
    return EncoderLayout(query=layer + query, key=layer + key, value=layer + value, attention_output=layer + attention_output,
                         attention_norm=layer + attention_norm, intermediate=layer + intermediate, output=layer + output,
                         output_norm=layer + output_norm, **kwargs)


BERT_LAYOUT = bert_style("encoder.layer.{i}.", "attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense",
                         "output.LayerNorm", word_embeddings="embeddings.word_embeddings")

# the first layout that fits a model is its layout (names, not model types: RoBERTa and XLM-R have BERT's)
ENCODER_LAYOUTS: dict[str, EncoderLayout] = {
    "bert": BERT_LAYOUT,
    "electra": bert_style("encoder.layer.{i}.", "attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense",
                          "output.LayerNorm", word_embeddings="embeddings.word_embeddings", embedding_projection="embeddings_project"),
    "distilbert": bert_style("transformer.layer.{i}.", "attention.q_lin", "attention.k_lin", "attention.v_lin",
                             "attention.out_lin", "sa_layer_norm", "ffn.lin1", "ffn.lin2", "output_layer_norm",
                             word_embeddings="embeddings.word_embeddings"),
    "deberta-v2": bert_style("encoder.layer.{i}.", "attention.self.query_proj", "attention.self.key_proj",
                             "attention.self.value_proj", "attention.output.dense", "attention.output.LayerNorm",
                             "intermediate.dense", "output.dense", "output.LayerNorm", word_embeddings="embeddings.word_embeddings"),
    "albert": bert_style("encoder.albert_layer_groups.0.albert_layers.0.", "attention.query", "attention.key", "attention.value",
                         "attention.dense", "attention.LayerNorm", "ffn", "ffn_output", "full_layer_layer_norm",
                         word_embeddings="embeddings.word_embeddings", embedding_projection="encoder.embedding_hidden_mapping_in",
                         absent=("encoder.albert_layer_groups.1", "encoder.albert_layer_groups.0.albert_layers.1")),
    "modernbert": EncoderLayout(word_embeddings="embeddings.tok_embeddings", fused_qkv="layers.{i}.attn.Wqkv",
                                attention_output="layers.{i}.attn.Wo", attention_norm="layers.{i}.mlp_norm",
                                intermediate="layers.{i}.mlp.Wi", output="layers.{i}.mlp.Wo", output_norm="layers.{next}.attn_norm",
                                final_norm="final_norm", gated=True),
}


def layout_of(model: torch.nn.Module) -> str | None:
    """The name of the first layout that fits this model (None: an architecture the map does not know)."""
    config = model.config
    hidden, layers = int(config_value(config, "hidden size")), int(config_value(config, "layer count"))
    return next((name for name, layout in ENCODER_LAYOUTS.items() if layout.fits(model, hidden, layers)), None)


def unknown_layout_error(model_type: str) -> UserError:
    return UserError(f"the pruned init does not know the layers of encoder architecture {model_type!r}; "
                     "train it with --init random")


class EncoderBackbone(Backbone):
    family = "encoder"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.d_model = int(config_value(c, "hidden size"))
        self.num_layers = int(config_value(c, "layer count"))
        self.num_heads = int(config_value(c, "head count"))
        self.d_ff = int(config_value(c, "feed-forward width"))
        self.activation = config_value(c, "activation", ACTIVATION_NAMES, default="gelu")
        self.norm_eps = float(config_value(c, "norm epsilon", NORM_EPS_NAMES, default=1e-12))
        # DistilBERT and ModernBERT take no token_type_ids (a WordPiece tokenizer may still return them)
        self.takes_token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters

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
        if "token_type_ids" in encoded and self.takes_token_types:
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
        """Rows of each layer's linears, `<attention>.qkv` (a fused qkv as `(attention, fused, 3)`), and the
        embedding columns, or the rows of the projection to hidden width where there is one. A shared layer
        (ALBERT) is scored once."""
        layout, rows, qkv = self.layout(), [], []
        for i in range(self.num_layers):
            n = layout.names(i, self.num_layers)
            if layout.fused_qkv:
                qkv.append((layout.attention(i), n["fused_qkv"], 3))
            else:
                qkv.append((layout.attention(i), n["query"], n["key"], n["value"]))
            rows += [n["attention_output"], n["intermediate"], n["output"]]
        if layout.embedding_projection:
            rows.append(layout.embedding_projection)
        columns = [] if layout.embedding_projection else [layout.word_embeddings]
        return ScoreTargets(rows=list(dict.fromkeys(rows)), qkv=list(dict.fromkeys(qkv)), columns=columns)

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
