"""The backbone families, one module each; adding a family is a module and one line here."""

from __future__ import annotations

from shared.errors import UserError
from shared.families.base import Backbone, BackboneInfo, ScoreTargets, StackSpec
from shared.families.decoder import DecoderBackbone
from shared.families.encoder import EncoderBackbone
from shared.families.t5 import T5Backbone

FAMILIES: dict[str, type[Backbone]] = {
    "t5": T5Backbone,
    "encoder": EncoderBackbone,
    "decoder": DecoderBackbone,
}


def is_causal_lm(config) -> bool:
    """Whether a config declares a decoder-only causal LM (its architectures, or `is_decoder`)."""
    architectures = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(a.endswith("ForCausalLM") for a in architectures)


def family_of(config) -> type[Backbone]:
    """The family a transformers config declares itself to be (never guessed from its attributes)."""
    for family in FAMILIES.values():
        if family.accepts(config):
            return family
    kind = ("a decoder-only causal LM" if is_causal_lm(config) else
            "an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else "a model")
    raise UserError(f"{config.model_type!r} is {kind} of no supported family; supported: "
                    f"{', '.join(supported_families())}")


def supported_families() -> list[str]:
    return ["t5 (T5, T5 v1.1, mT5)", "encoder (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa, ALBERT, ModernBERT, MiniLM ...)",
            "decoder (causal LMs: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3)"]


__all__ = ["FAMILIES", "Backbone", "BackboneInfo", "ScoreTargets", "StackSpec", "family_of", "is_causal_lm", "supported_families"]
