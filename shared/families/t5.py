"""The T5 family (v1.0, v1.1, mT5): encoder-decoder, scored through its frozen LM head.

Stacks: `encoder` (the source), `decoder` (teacher-forced on the target text) and, for
evaluation splits, `candidates` (the decoder teacher-forced on every candidate label, so
that scoring needs no backbone). Each stack holds the embedding output and every block's
output *before* the stack's final layer norm (transformers' `hidden_states` ends with the
post-norm state instead, so the blocks are hooked).
"""

from __future__ import annotations

import torch

from shared.families.base import Backbone, ScoreTargets, StackSpec
from shared.tasks import Example, TaskSpec
from shared.tokens import TokenBatch


class T5Backbone(Backbone):
    family = "t5"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.d_model = int(c.d_model)
        self.num_layers = int(c.num_layers)
        self.num_decoder_layers = int(c.num_decoder_layers)
        self.num_heads = int(c.num_heads)
        self.decoder_start_token_id = int(c.decoder_start_token_id or 0)

    @classmethod
    def accepts(cls, config) -> bool:
        return bool(getattr(config, "is_encoder_decoder", False)) and config.model_type in ("t5", "mt5")

    @classmethod
    def load_model(cls, path: str, config, **common) -> torch.nn.Module:
        import transformers

        return transformers.T5ForConditionalGeneration.from_pretrained(path, config=config, use_safetensors=True, **common)

    def stacks(self, with_candidates: bool = True) -> list[StackSpec]:
        encoder, decoder = self.num_layers + 1, self.num_decoder_layers + 1
        out = [StackSpec("encoder", encoder), StackSpec("decoder", decoder)]
        return out + ([StackSpec("candidates", decoder, per_candidate=True)] if with_candidates else [])

    # --- tokens -------------------------------------------------------------------------------

    def shift_right(self, labels: list[int]) -> list[int]:
        """Teacher-forcing input: the start token, then the labels without the last."""
        return [self.decoder_start_token_id, *labels[:-1]]

    def _targets(self, texts: list[str], max_target_length: int) -> dict[str, list[list[int]]]:
        labels = self.tokenizer(texts, truncation=True, max_length=max_target_length)["input_ids"]
        return {"input_ids": [self.shift_right(t) for t in labels], "labels": labels}

    def tokenize(self, examples: list[Example], spec: TaskSpec, max_length: int, max_target_length: int):
        """The reference's text-to-text source string, and the target string with the end token."""
        sources = [spec.source_text(ex) for ex in examples]
        encoder = {"input_ids": self.tokenizer(sources, truncation=True, max_length=max_length)["input_ids"]}
        return {"encoder": encoder, "decoder": self._targets([spec.target_text(ex.label) for ex in examples], max_target_length)}

    def candidate_inputs(self, spec: TaskSpec, max_target_length: int):
        return {"candidates": self._targets(spec.candidates(), max_target_length)}

    def example_columns(self, examples: list[Example], spec: TaskSpec) -> dict[str, list]:
        return {"target_text": [spec.target_text(ex.label) for ex in examples]}

    def candidate_labels(self, spec: TaskSpec) -> list[str]:
        return spec.candidates()

    # --- states -------------------------------------------------------------------------------

    @staticmethod
    def _run_stack(stack, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = stack.embed_tokens(input_ids)
        block_outputs: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: block_outputs.append(out[0])) for b in stack.block]
        try:
            final = stack(inputs_embeds=embeddings, **kwargs).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack([embeddings, *block_outputs], dim=2), final

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, L, states, d], post-norm encoder output [B, L, d])."""
        return self._run_stack(self.model.encoder, input_ids, attention_mask=attention_mask)

    def decode(self, decoder_input_ids: torch.Tensor, decoder_mask: torch.Tensor, encoder_final: torch.Tensor,
               encoder_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder states [B, T, states, d]."""
        states, _ = self._run_stack(self.model.decoder, decoder_input_ids, attention_mask=decoder_mask,
                                    encoder_hidden_states=encoder_final, encoder_attention_mask=encoder_mask, use_cache=False)
        return states

    @torch.inference_mode()
    def states(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        enc = batch["encoder"]
        states, final = self.encode(enc["input_ids"], enc.get("attention_mask"))
        out = {"encoder": states}
        if "decoder" in batch:
            dec = batch["decoder"]
            out["decoder"] = self.decode(dec["input_ids"], dec.get("attention_mask"), final, enc.get("attention_mask"))
        if "candidates" in batch:
            cand = batch["candidates"]
            k = cand["input_ids"].shape[0] // final.shape[0]
            out["candidates"] = self.decode(cand["input_ids"], cand["attention_mask"], final.repeat_interleave(k, 0),
                                            enc["attention_mask"].repeat_interleave(k, 0))
        return out

    def lm_head(self) -> tuple[torch.Tensor, float]:
        """The frozen LM head weight and the scale T5 applies before it (d^-0.5 when tied)."""
        scale_flag = getattr(self.config, "scale_decoder_outputs", None)
        if scale_flag is None:
            scale_flag = bool(getattr(self.config, "tie_word_embeddings", True))
        return self.model.lm_head.weight, (self.d_model**-0.5 if scale_flag else 1.0)

    def lm_head_tensor_names(self) -> list[str]:
        return ["lm_head.weight", "shared.weight"] if not getattr(self.config, "tie_word_embeddings", True) else \
            ["shared.weight", "lm_head.weight", "encoder.embed_tokens.weight"]

    # --- importance ---------------------------------------------------------------------------

    def score_targets(self) -> ScoreTargets:
        rows, qkv = [], []
        for stack, blocks in (("encoder", self.num_layers), ("decoder", self.num_decoder_layers)):
            for i in range(blocks):
                prefix = f"{stack}.block.{i}.layer"
                attentions = [("0", "SelfAttention")] + ([("1", "EncDecAttention")] if stack == "decoder" else [])
                for index, name in attentions:
                    attn = f"{prefix}.{index}.{name}"
                    qkv.append((attn, f"{attn}.q", f"{attn}.k", f"{attn}.v"))
                    rows.append(f"{attn}.o")
                ff = f"{prefix}.{len(attentions)}.DenseReluDense"
                gated = hasattr(self.model.get_submodule(ff), "wi_0")
                rows += [f"{ff}.wi_0" if gated else f"{ff}.wi", f"{ff}.wo"]
        return ScoreTargets(rows=rows, qkv=qkv, columns=["shared"])

    def fisher_objective(self, batches, labels, spec):
        """T5's own LM loss on the target text, per example (mean over its target tokens)."""
        def losses(batch: TokenBatch, _labels: torch.Tensor) -> torch.Tensor:
            enc, dec = batch["encoder"], batch["decoder"]
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                decoder_input_ids=dec["input_ids"], decoder_attention_mask=dec["attention_mask"]).logits
            token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), dec["labels"], reduction="none")
            counted = (dec["labels"] != -100).float()
            return (token * counted).sum(1) / counted.sum(1).clamp(min=1)

        return losses
