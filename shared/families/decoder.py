"""The decoder family: decoder-only causal LMs (Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma 2, Gemma 3).

Prompting. Each example becomes one prompt, `PromptTemplate.render`: by default one line per text
field ("Review: <text>") and a cue ("Sentiment:"); the label words continue the cue (" negative",
" positive" for the default Rotten Tomatoes task, `PROMPTS`; other tasks: " <label name>"). The
user's `--prompt` template ("{field}" per text field; the cue is its text after the last field) and
`--label-words` replace them (`TaskSpec.prompt`, `TaskSpec.label_words`; recorded in the cache).
Ids are the tokenizer's own leading special tokens (Gemma's and Llama's `<bos>`; none for
Qwen) then the prompt; trailing special tokens a tokenizer appends are dropped, so the last
position is the cue's last token. A prompt longer than `--max-length` loses the end of its
longest field, never the cue.

Stacks, all right-padded with attention masks (a causal model's real positions never see the
padding, so each example's states are its own):
- `decoder` (primary): the prompt's states: state 0 is the input of block 0, i.e. the
  embedding output as the model scales it (Gemma: times sqrt(hidden)), then every block's
  output, hooked *before* the final norm (transformers' last hidden state is after it).
- `candidates` (evaluation splits): for each label word, the states of its tokens
  teacher-forced after the prompt (the prompt is recomputed for each candidate), with
  `labels` = the next token of the word (-100 after its last). The first token of every word
  is scored at the prompt's last position, so for one-token label words (the default task)
  nothing in this stack is ever read: its one state per candidate is then zeros and the
  backbone is not run for it (zeros compress to almost nothing). Regression tasks have no
  label words and one such placeholder candidate.

The LM head is the output embedding (tied or not), scale 1.0; where the config has
`final_logit_softcapping` (Gemma 2) the side network applies it to its candidate logits too.
Fisher importance differentiates the frozen model's own label-word cross-entropy at the
prompt's last position over the candidates' first tokens (regression: a linear probe on the
last token's final state, as the encoder family's probe), a few examples per backward pass
(backbone_cache.fisher; its hooks see the tied head through its module and Gemma's scaled
lookups). GGUF checkpoints are converted once to a safetensors folder (`convert_gguf`).

Instruction tasks (`label_kind == "lm"`, `shared.tasks.load_instruct`): the `decoder` stack holds
prompt + response as one padding-free sequence (the tokenizer's leading special tokens, the
prompt's tokens, the response's, then the end-of-sequence token) and `labels`, the next token at
each position where that token is a response token (-100 elsewhere), so the loss reads the
response only. The response continues the prompt exactly as written (put any template, e.g. a
trailing newline, in the prompt). `--max-length` keeps the end of the prompt, `--max-target-length`
the start of the response. Candidates: one placeholder, as for regression. Fisher importance
differentiates the frozen model's response-token cross-entropy through the full head's module on the
response positions (`response_losses`), so that the batched engine's hooks see a tied head's use of the
embedding, in batches whose float32 logits stay near FISHER_HEAD_BYTES (`fisher_max_tokens`).

Generation (`step_states`): the live model runs with its transformers KV cache; each step's new
positions come back as the same ladder inputs `run_blocks` gives for the whole sequence.
"""

from __future__ import annotations

import functools
import inspect
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import UserError
from shared.families.base import Backbone, ScoreTargets, StackSpec
from shared.families.encoder import ENCODER_MODEL_TYPES, fit_probe, probe_loss
from shared.tasks import Example, TaskSpec
from shared.tokens import LABEL_PAD, TokenBatch

# model types whose checkpoints this family knows (any other config whose architectures end in ForCausalLM is accepted too)
DECODER_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3"}

# the projections of a Llama-style block, as transformers names them
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PromptTemplate:
    """How a task's examples become prompts: a template with one "{field}" per text field, and the label words.
    The cue is the template's text after its last field; each label word continues it."""

    form: str  # str.format template over the text fields, e.g. "Review: {0}\nSentiment:" or a user's "... {sentence} ..."
    fields: tuple[str, ...]  # the task's text field names, in example order
    words: tuple[str, ...]  # one per class, in label order, as they follow the cue (empty: regression)

    def render(self, texts: list[str]) -> str:
        """The filled template: the task's own names fields by position ({0}), a user's by name ({sentence})."""
        return self.form.format(*texts, **dict(zip(self.fields, texts)))

    @property
    def cue(self) -> str:
        """The text after the last field (what the last prompt position reads)."""
        items = list(string.Formatter().parse(self.form))
        last = max((i for i, item in enumerate(items) if item[1] is not None), default=-1)
        return "".join(item[0] for item in items[last + 1 :])


# The task's own templates: a key line per field, then the cue, and the label words.
PROMPTS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "rotten_tomatoes": (("Review:",), "Sentiment:", (" negative", " positive")),
    "sst2": (("Review:",), "Sentiment:", (" negative", " positive")),
    "cola": (("Sentence:",), "Grammatical:", (" no", " yes")),
    "mrpc": (("Sentence 1:", "Sentence 2:"), "Same meaning:", (" no", " yes")),
    "qqp": (("Question 1:", "Question 2:"), "Same question:", (" no", " yes")),
    "mnli": (("Premise:", "Hypothesis:"), "Relation:", (" entailment", " neutral", " contradiction")),
    "qnli": (("Question:", "Sentence:"), "Answered:", (" yes", " no")),
    "rte": (("Premise:", "Hypothesis:"), "Entailed:", (" yes", " no")),
    "stsb": (("Sentence 1:", "Sentence 2:"), "Similarity:", ()),
}


def prompt_template(spec: TaskSpec) -> PromptTemplate:
    """The task's template: the user's --prompt and --label-words where given (`TaskSpec.prompt`,
    `label_words`); else `PROMPTS`, else one "Field name: {field}" line per text field, "Answer:" and
    " <label name>". A user's word follows the cue after one space, unless the cue ends in whitespace."""
    if spec.name in PROMPTS and len(PROMPTS[spec.name][0]) == len(spec.text_fields):
        keys, cue, words = PROMPTS[spec.name]
    else:
        keys = tuple(f"{f.replace('_', ' ').capitalize()}:" for f in spec.text_fields)
        cue = "Answer:"
        words = () if spec.label_kind == "regression" else tuple(f" {n.replace('_', ' ')}" for n in spec.label_names)
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731  (keys come from column names)
    form = spec.prompt or "\n".join([*(f"{escape(key)} {{{i}}}" for i, key in enumerate(keys)), escape(cue)])
    template = PromptTemplate(form, tuple(spec.text_fields), words)
    if spec.label_words:
        space = "" if template.cue[-1:].isspace() else " "
        template = PromptTemplate(form, template.fields, tuple(space + w for w in spec.label_words))
    return template


def text_config(config):
    """The language model's config (a multimodal Gemma 3 config holds it as its text config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_text_model(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(name, module) of the module holding `embed_tokens` and the block list `layers` (Llama-style)."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "layers", None), torch.nn.ModuleList) and hasattr(module, "embed_tokens"):
            return name, module
    raise UserError(f"{type(model).__name__} has no `embed_tokens` and `layers` blocks; the decoder family reads "
                    "Llama-style causal LMs (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3)")


def is_llama_style(layer: torch.nn.Module) -> bool:
    """Whether a block has the projections the side network and the importance scores read."""
    names = {n for n, _ in layer.named_modules()}
    return all(f"self_attn.{p}" in names for p in ATTENTION_PROJECTIONS) and all(f"mlp.{p}" in names for p in MLP_PROJECTIONS)


def convert_gguf(source: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder `out` (float32, with its tokenizer), via
    transformers' GGUF loader (needs the `gguf` and `accelerate` packages). Written beside and renamed into place."""
    import transformers

    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            raise UserError(f"reading a GGUF file needs the {package!r} package; pip install gguf accelerate") from None
    folder, name = str(source.parent), source.name
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"converting {source} to safetensors in {out} (once)", file=sys.stderr)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantized; its weights are plain float32 now
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(out)


@functools.cache
def cache_argument(model_class: type) -> str:
    """The KV cache's keyword and output field of a transformers model ("cache" in newer releases, "past_key_values" before)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class DecoderBackbone(Backbone):
    family = "decoder"
    label_kinds = ("class", "regression", "lm")
    takes_prompts = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = text_config(self.model.config)
        c = self.config
        self.d_model = int(c.hidden_size)
        self.num_layers = int(c.num_hidden_layers)
        self.num_heads = int(c.num_attention_heads)
        self.text_model_name, self.text_model = find_text_model(self.model)
        self.layers = self.text_model.layers
        self._prefix = self._leading_special_tokens()

    @classmethod
    def accepts(cls, config) -> bool:
        if getattr(config, "is_encoder_decoder", False) or config.model_type in ENCODER_MODEL_TYPES:
            return False
        architectures = getattr(config, "architectures", None) or []
        return config.model_type in DECODER_MODEL_TYPES or any(a.endswith("ForCausalLM") for a in architectures)

    @classmethod
    def load_model(cls, path: str, config, **common) -> torch.nn.Module:
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(path, config=config, use_safetensors=True, **common)

    convert_gguf = staticmethod(convert_gguf)

    def stacks(self, with_candidates: bool = True) -> list[StackSpec]:
        states = self.num_layers + 1
        return [StackSpec("decoder", states)] + ([StackSpec("candidates", states, per_candidate=True)] if with_candidates else [])

    # --- tokens -------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _leading_special_tokens(self) -> list[int]:
        """The ids the tokenizer puts before a text (Gemma, Llama: `<bos>`; Qwen: none)."""
        plain = self._encode("a")
        full = self.tokenizer("a")["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start])
        return []

    def prompt_ids(self, fields: list[str], template: PromptTemplate, max_length: int) -> list[int]:
        """The prompt's ids, at most `max_length`: the end of the longest field is cut, never the cue."""
        fields = list(fields)
        for _ in range(8):
            ids = self._prefix + self._encode(template.render(fields))
            excess = len(ids) - max_length
            if excess <= 0:
                return ids
            lengths = [len(self._encode(f)) for f in fields]
            longest = max(range(len(fields)), key=lambda i: lengths[i])
            if lengths[longest] == 0:
                break
            kept = self._encode(fields[longest])[: max(0, lengths[longest] - excess)]
            fields[longest] = self.tokenizer.decode(kept)
        cue = self._encode(template.cue)
        return (self._prefix + self._encode(template.render(fields)))[: max(0, max_length - len(cue))] + cue

    def word_ids(self, word: str, template: PromptTemplate) -> list[int]:
        """A label word's tokens as they continue the cue (the cue's tokens then the word's, when the
        cue tokenizes alike alone and followed by the word; else the word alone)."""
        cue = self._encode(template.cue)
        joined = self._encode(template.cue + word)
        ids = joined[len(cue) :] if joined[: len(cue)] == cue and len(joined) > len(cue) else self._encode(word)
        if not ids:
            raise UserError(f"label word {word!r} has no tokens; check the task's label names")
        return ids

    def candidate_token_ids(self, spec: TaskSpec) -> list[list[int]]:
        """Each label word's tokens, in label order (regression and instruction tasks: none)."""
        if spec.label_kind == "lm":
            return []
        template = prompt_template(spec)
        return [self.word_ids(w, template) for w in template.words]

    def tokenize(self, examples: list[Example], spec: TaskSpec, max_length: int, max_target_length: int):
        if spec.label_kind == "lm":
            pairs = [self.instruction_ids(ex.texts[0], ex.texts[1], max_length, max_target_length) for ex in examples]
            return {"decoder": {"input_ids": [ids for ids, _ in pairs], "labels": [labels for _, labels in pairs]}}
        template = prompt_template(spec)
        return {"decoder": {"input_ids": [self.prompt_ids(ex.texts, template, max_length) for ex in examples]}}

    def instruction_prompt_ids(self, prompt: str, max_length: int) -> list[int]:
        """An instruction's ids: the leading special tokens, then the end of the prompt's tokens (at most `max_length` in all)."""
        ids = self._encode(prompt)
        if not ids and not self._prefix:
            raise UserError("an instruction prompt is empty and the tokenizer adds no start token; give every row a prompt")
        keep = max(1, max_length - len(self._prefix))
        return self._prefix + ids[-keep:] if ids else list(self._prefix)

    def instruction_ids(self, prompt: str, response: str, max_length: int, max_target_length: int
                        ) -> tuple[list[int], list[int]]:
        """(prompt + response ids, next-token labels: the response's tokens (and the end token) where they
        are next, -100 elsewhere). A response cut at `max_target_length` gets no end token."""
        head = self.instruction_prompt_ids(prompt, max_length)  # never empty
        body = self._encode(response)
        eos = self.tokenizer.eos_token_id
        if eos is not None and len(body) < max_target_length:
            body = body + [int(eos)]
        body = body[:max_target_length]
        ids = head + body
        labels = [LABEL_PAD] * (len(head) - 1) + body + [LABEL_PAD]
        return ids, labels

    def generation_prompt_ids(self, fields: list[str], spec: TaskSpec, max_length: int) -> list[int]:
        """The ids generation continues: an instruction's prompt, or a class task's rendered template."""
        if spec.label_kind == "lm":
            return self.instruction_prompt_ids(fields[0], max_length)
        ids = self.prompt_ids(fields, prompt_template(spec), max_length)
        if not ids:
            raise UserError("the prompt is empty and the tokenizer adds no start token; give a text to continue")
        return ids

    def candidate_inputs(self, spec: TaskSpec, max_target_length: int):
        words = self.candidate_token_ids(spec)[:] or [[self._placeholder_id()]]
        words = [w[:max_target_length] for w in words]
        return {"candidates": {"input_ids": words, "labels": [w[1:] + [LABEL_PAD] for w in words]}}

    def _placeholder_id(self) -> int:
        for token in (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id, self.tokenizer.pad_token_id):
            if token is not None:
                return int(token)
        return 0

    def candidate_labels(self, spec: TaskSpec) -> list[str]:
        return [""] if spec.label_kind == "lm" else list(prompt_template(spec).words) or [""]

    # --- states -------------------------------------------------------------------------------

    def run_blocks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """States [B, L, 1 + blocks, d]: the input of block 0, then every block's output (before the final norm)."""
        return self._hooked_blocks(input_ids, attention_mask, None)[0]

    @torch.inference_mode()
    def step_states(self, input_ids: torch.Tensor, past=None, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        """Generation: states [B, n, 1 + blocks, d] of `input_ids`' n new positions, run with the model's KV
        cache `past` (None: a new one); returns the cache. Without a mask, positions continue after the
        cache's length. A left-padded batch passes `attention_mask` [B, cached + n] (0 on padding) and
        `position_ids` [B, n] (each row's count of real tokens before it)."""
        if past is None:
            from transformers import DynamicCache

            past = DynamicCache(config=self.config)
        return self._hooked_blocks(input_ids, attention_mask, past, position_ids)

    def _hooked_blocks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past,
                       position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        captured: list[torch.Tensor] = []

        def first_input(_module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        def output(_module, _inputs, out):
            captured.append(out[0] if isinstance(out, tuple) else out)

        hooks = [self.layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        hooks += [layer.register_forward_hook(output) for layer in self.layers]
        try:
            # an all-ones mask is dropped, so a batch of one runs exactly as the model alone; on the
            # meta device (shape studies) values cannot be read: an all-ones mask keeps transformers
            # from reading position ids to look for packed sequences
            if input_ids.device.type == "meta":
                mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            else:
                mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
            if past is None:
                self.text_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            else:
                name = cache_argument(type(self.text_model))
                past = self.text_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                                       **{name: past})[name]
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack(captured, dim=2), past

    @torch.inference_mode()
    def states(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        prompt = batch["decoder"]
        out = {"decoder": self.run_blocks(prompt["input_ids"], prompt.get("attention_mask"))}
        if "candidates" in batch:
            out["candidates"] = self.candidate_states(prompt, batch["candidates"])
        return out

    def candidate_states(self, prompt: dict[str, torch.Tensor], cand: dict[str, torch.Tensor]) -> torch.Tensor:
        """States [B x K, M, 1 + blocks, d] of each candidate's tokens teacher-forced after its example's
        prompt (prompt + word run as one sequence); zeros where no candidate token is ever scored."""
        ids = cand["input_ids"]
        mask = cand["attention_mask"].bool() if "attention_mask" in cand else torch.ones_like(ids, dtype=torch.bool)
        rows, width = ids.shape
        if not bool((cand["labels"] != LABEL_PAD).any()):
            return torch.zeros(rows, width, self.num_layers + 1, self.d_model, dtype=self.dtype, device=ids.device)
        prompt_mask = prompt.get("attention_mask")
        prompt_ids = prompt["input_ids"]
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        k = rows // prompt_ids.shape[0]
        starts = prompt_mask.sum(1).repeat_interleave(k)
        words = mask.sum(1)
        total = int((starts + words).max())
        packed = torch.zeros(rows, total, dtype=ids.dtype, device=ids.device)
        packed_mask = torch.zeros(rows, total, dtype=torch.long, device=ids.device)
        for r in range(rows):
            n, m = int(starts[r]), int(words[r])
            packed[r, :n] = prompt_ids[r // k, :n]
            packed[r, n : n + m] = ids[r, :m]
            packed_mask[r, : n + m] = 1
        states = self.run_blocks(packed, packed_mask)
        index = (starts[:, None] + torch.arange(width, device=ids.device)[None]).clamp(max=total - 1)
        picked = states[torch.arange(rows, device=ids.device)[:, None], index]
        return picked.masked_fill(~mask[:, :, None, None], 0)

    def final_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The final-normed state of each sequence's last real token [B, d] (with gradients where enabled)."""
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        hidden = self.text_model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows = torch.arange(len(input_ids), device=hidden.device)
        last = attention_mask.sum(1) - 1 if attention_mask is not None else torch.full_like(rows, input_ids.shape[1] - 1)
        return hidden[rows, last.to(hidden.device)]

    # --- the LM head ----------------------------------------------------------------------------

    def lm_head(self) -> tuple[torch.Tensor, float]:
        """The output embedding [V, d] (the input embedding where tied) and scale 1.0."""
        return self.model.get_output_embeddings().weight, 1.0

    def final_logit_softcap(self) -> float | None:
        cap = getattr(self.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def lm_head_tensor_names(self) -> list[str]:
        """Tied: the input embedding (as saved now, and as older multimodal Gemma 3 checkpoints name it); else lm_head."""
        if not self.tied():
            return ["lm_head.weight"]
        return list(dict.fromkeys([f"{self.text_model_name}.embed_tokens.weight", "model.embed_tokens.weight",
                                   "language_model.model.embed_tokens.weight", "lm_head.weight"]))

    def tied(self) -> bool:
        return self.model.get_output_embeddings().weight is self.text_model.embed_tokens.weight

    def candidate_logits(self, hidden: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """The frozen head's logits of `token_ids` only [..., len(token_ids)] (with the config's softcap)."""
        head = self.lm_head()[0]
        logits = hidden.to(head.dtype) @ head[torch.tensor(token_ids, device=head.device)].t()
        return softcapped(logits, self.final_logit_softcap())

    # --- importance ---------------------------------------------------------------------------

    def layer_name(self, i: int) -> str:
        return f"{self.text_model_name}.layers.{i}"

    def score_targets(self) -> ScoreTargets:
        """Rows of every block's q/k/v/o and gate/up/down projections, and the embedding's columns (q, k and
        v are scored apart: under grouped-query attention their rows differ in number)."""
        if not is_llama_style(self.layers[0]):
            raise UserError(f"the pruned init does not know the blocks of {self.config.model_type!r}; train it with --init random")
        rows = []
        for i in range(self.num_layers):
            rows += [f"{self.layer_name(i)}.self_attn.{p}" for p in ATTENTION_PROJECTIONS]
            rows += [f"{self.layer_name(i)}.mlp.{p}" for p in MLP_PROJECTIONS]
        return ScoreTargets(rows=rows, qkv=[], columns=[f"{self.text_model_name}.embed_tokens"])

    def fisher_max_tokens(self, spec: TaskSpec, default: int) -> int:
        """Instruction tasks: few enough tokens that the batch's float32 logits over the whole vocabulary
        take about FISHER_HEAD_BYTES (their loss runs the head through its module)."""
        if spec.label_kind == "lm":
            return max(1, min(default, FISHER_HEAD_BYTES // (4 * int(self.lm_head()[0].shape[0]))))
        return default

    def fisher_objective(self, batches, labels, spec):
        """The frozen model's label-word cross-entropy at the prompt's last position over the candidates'
        distinct first tokens, per example; regression: a linear probe on the last token's final state;
        instruction tasks: the summed response-token cross-entropy through the full head. Every loss runs the
        head through its module, so that the batched Fisher engine sees a tied head's use of the embedding."""
        if spec.label_kind == "lm":
            return self.response_losses
        if spec.label_kind == "regression":
            with torch.no_grad():
                features = torch.cat([self.final_state(b["decoder"]["input_ids"], b["decoder"]["attention_mask"]).float()
                                      for b in batches])
            loss_fn = probe_loss(spec)
            with torch.enable_grad():
                probe = fit_probe(features, torch.cat(labels).to(features.device), 1, loss_fn)

            def regression_losses(batch: TokenBatch, example_labels: torch.Tensor) -> torch.Tensor:
                state = self.final_state(batch["decoder"]["input_ids"], batch["decoder"]["attention_mask"]).float()
                return loss_fn(probe(state), example_labels.to(self.device), reduction="none")

            return regression_losses
        firsts, targets = first_token_classes(self.candidate_token_ids(spec))
        head = self.model.get_output_embeddings()

        def losses(batch: TokenBatch, example_labels: torch.Tensor) -> torch.Tensor:
            # the whole head at one position per example, through its module, so that the batched Fisher
            # engine sees the tied head's use of the embedding (candidate_logits reads its rows functionally)
            stack = batch["decoder"]
            state = self.final_state(stack["input_ids"], stack["attention_mask"])
            logits = softcapped(head(state.to(head.weight.dtype))[:, firsts].float(), self.final_logit_softcap())
            target = torch.tensor(targets, device=logits.device)[example_labels.long().to(logits.device)]
            return torch.nn.functional.cross_entropy(logits, target, reduction="none")

        return losses


    def stop_token_ids(self) -> list[int]:
        """The ids that end a generation: the tokenizer's end token and the model's generation config's."""
        ids = [self.tokenizer.eos_token_id]
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        ids += eos if isinstance(eos, list) else [eos]
        return sorted({int(i) for i in ids if i is not None})

    def final_normed_weight(self) -> torch.Tensor:
        """The final norm's weight [d] (the side network's `--merge-final` applies it to the last block's output)."""
        return self.text_model.norm.weight

    def response_losses(self, batch: TokenBatch, example_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Each sequence's summed next-token cross-entropy over its labelled (response) positions [B]: Fisher's
        loss for instruction tasks. The head runs through its module on every response position at once
        [B, R, V], where the batched engine's hooks see a tied head's use of the embedding; `fisher_max_tokens`
        keeps those logits small."""
        stack = batch["decoder"]
        mask = stack.get("attention_mask")
        mask = None if mask is None or bool(mask.all()) else mask
        hidden = self.text_model(input_ids=stack["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
        states, targets = _response_rows(hidden, batch["decoder"]["labels"].to(hidden.device))
        head = self.model.get_output_embeddings()
        with torch.autocast(hidden.device.type, enabled=False):
            logits = softcapped(head(states.to(head.weight.dtype)).float(), self.final_logit_softcap())
        keep = targets != LABEL_PAD
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (nll * keep).sum(1)


def softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), the logit softcap of Gemma 2 style models; the logits as they are without a cap."""
    return torch.tanh(logits / cap) * cap if cap else logits


def _response_rows(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's response positions packed to the front: (states [B, R, d] with zero rows after a
    sequence's last response position, their next tokens [B, R] with LABEL_PAD there)."""
    keep = targets != LABEL_PAD
    count = keep.sum(1)
    width = max(1, int(count.max()))
    slot = torch.cumsum(keep, 1) - 1  # a kept position's place among its sequence's response positions
    rows, cols = keep.nonzero(as_tuple=True)
    states = hidden.new_zeros(len(targets), width, hidden.shape[-1])
    states[rows, slot[rows, cols]] = hidden[rows, cols]
    labels = torch.full((len(targets), width), LABEL_PAD, dtype=targets.dtype, device=targets.device)
    labels[rows, slot[rows, cols]] = targets[rows, cols]
    return states, labels


def first_token_classes(words: list[list[int]]) -> tuple[list[int], list[int]]:
    """(the distinct first tokens of the label words, in order of first use; each word's index among them)."""
    firsts = list(dict.fromkeys(w[0] for w in words))
    return firsts, [firsts.index(w[0]) for w in words]


# --- the full-vocabulary head in chunks ----------------------------------------------------------

HEAD_CHUNK_BYTES = 64 << 20  # float32 logits held at once by `chunked_token_nll`
FISHER_HEAD_BYTES = 256 << 20  # float32 logits of one batched Fisher forward through a tied head (instruction tasks)


def head_chunk_tokens(vocab_size: int, budget: int = HEAD_CHUNK_BYTES) -> int:
    """Tokens per chunk so that a chunk's float32 logits [tokens, V] take about `budget` bytes."""
    return max(1, budget // (4 * max(1, vocab_size)))


class _ChunkedTokenNLL(torch.autograd.Function):
    """-log softmax(h W^T)[target] per token, a chunk of tokens at a time in forward and in backward
    (the logits of a chunk are recomputed there, never kept): memory [chunk, V], not [tokens, V]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, softcap):
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, n, chunk):
                logits = _chunk_logits(hidden[a : a + chunk], weight, softcap)[0]
                lse[a : a + chunk] = torch.logsumexp(logits, -1)
                nll[a : a + chunk] = lse[a : a + chunk] - logits.gather(-1, targets[a : a + chunk, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.softcap = chunk, softcap
        return nll

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, softcap = ctx.chunk, ctx.softcap
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, hidden.shape[0], chunk):
                h = hidden[a : a + chunk]
                logits, squash = _chunk_logits(h, weight, softcap)
                g = torch.exp(logits - lse[a : a + chunk, None])  # softmax
                g.scatter_add_(-1, targets[a : a + chunk, None], torch.full_like(g[:, :1], -1.0))
                g.mul_(grad[a : a + chunk, None].float())
                if squash is not None:  # d/dx c tanh(x / c) = 1 - tanh^2
                    g.mul_(1.0 - squash.square())
                if grad_hidden is not None:
                    grad_hidden[a : a + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += g.t() @ h.float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits of one chunk (softcapped where the model caps them) and tanh of the cap, or None."""
    logits = (h.to(weight.dtype) @ weight.t()).float()
    if not softcap:
        return logits, None
    squash = torch.tanh(logits / softcap)
    return squash * softcap, squash


def chunked_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """Per-token cross-entropy [N] (float32) of states `hidden` [N, d] through the head `weight` [V, d]
    (logits softcapped where `softcap`), `chunk` tokens at a time (default: `head_chunk_tokens(V)`),
    in forward and backward, so the [N, V] logits never exist at once. Differentiable in hidden and weight."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    chunk = chunk or head_chunk_tokens(weight.shape[0])
    return _ChunkedTokenNLL.apply(hidden, weight, targets.long(), int(chunk), softcap)
