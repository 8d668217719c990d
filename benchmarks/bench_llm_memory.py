"""Benchmark: training memory at Llama-2-7B and Llama-2-70B shapes by meta-device accounting (no weights).

    python benchmarks/bench_llm_memory.py [--batch 4] [--length 512] [--reductions 8,16,32] [--json OUT.json]

For each shape (transformers `LlamaConfig` with the published sizes) the model is built on
PyTorch's meta device, so nothing is allocated or computed, and every method's training step
is counted with side_train.memory's saved-tensor counter on a meta forward pass at the full
stated batch x length (not scaled from a smaller one):

- LST from the cache: the real decoder side network (`DecoderSideNetwork.config_for` on the
  meta backbone, r = 8, 16, 32; all 32 / 80 layers unless --drop-layers), trained in fp32 with
  AdamW: parameters 4 B + gradients 4 B + m, v 8 B per trainable parameter; the tensors its
  forward saves (fp32, no autocast); the frozen LM head it keeps (label words: the candidates'
  rows only, fp32; for causal-LM tuning the whole head in bf16 would add 2 x V x d bytes, shown
  apart); and the cached ladder inputs of one batch (bf16, every stored state of the side's layers).
- LST live: the same, plus the frozen backbone's weights (NF4 4-bit with double-quantized
  statistics, 4.127 bits per block-linear weight and bf16 embeddings / head, as QLoRA stores
  them; or bf16), and no backbone activation saved (it runs under inference mode; the one
  layer's transient workspace is not counted).
- LoRA: rank 64 on every linear layer of every block (the QLoRA paper's setting), adapters in
  fp32 (16 B per trainable parameter as above), backbone in bf16, the tensors a bf16 forward
  saves (counted, with the label-word head of the baselines, `DecoderTuned`).
- QLoRA: LoRA with the block-linear weights in NF4 (as above); the saved tensors of LoRA's bf16
  forward (QLoRA computes in bf16 and saves the same activations).
- Full fine-tuning: bf16 weights and gradients, fp32 master weights and AdamW m, v: 16 B per
  parameter; the saved tensors of the bf16 forward.

No method uses activation checkpointing. Attention runs in transformers' eager implementation
(its probabilities [B, H, L, L] are saved; a flash kernel would save O(L) instead) in every
backbone forward; the side network's attention is its own. QST's published LLaMA-2-70B figures
(weights 36 GB, optimizer 4, activations 69, total about 109 GB; QLoRA about 243 GB) are quoted
beside ours at QST's own batch and length, which this script does not re-derive.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.families.decoder import DecoderBackbone, prompt_template  # noqa: E402
from shared.tasks import TaskSpec  # noqa: E402
from side_train.baselines import TokenInputs  # noqa: E402
from side_train.compare_run import cached_ladder_batch, new_side_network  # noqa: E402
from side_train.families.decoder import DecoderSideNetwork, DecoderTuned  # noqa: E402
from side_train.memory import SavedTensorCounter, device_tensors, recompute_bytes  # noqa: E402
from side_train.model import SideOptions  # noqa: E402

GB = 1e9
META = torch.device("meta")
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # NF4 + fp8 absmax per 64 + fp32 per 256 blocks (double quantization)
LORA_RANK = 64
QST_70B = {"weights": 36, "optimizer": 4, "activations": 69, "total": 109, "qlora_total": 243}
SPEC = TaskSpec("rotten_tomatoes", ["text"], "class", ["negative", "positive"], ["Review:"], ["accuracy"], 1)


def llama_config(shape: str):
    """Llama-2 7B / 70B as published (70B: grouped-query attention with 8 KV heads)."""
    from transformers import LlamaConfig

    sizes = {"7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008),
             "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672)}
    return LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes[shape])


def tokenizer():
    """A small byte-level BPE that adds <bos> (as Llama's does), with " negative" and " positive" one token each
    (as in Llama-2's tokenizer: one token per label word); only the label words' ids matter here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Review: a film\nSentiment: negative", "Review: a film\nSentiment: positive"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def meta_backbone(shape: str, tok) -> DecoderBackbone:
    """The model on the meta device in bf16; the rotary frequencies and block 0's input norm are real
    (small) tensors, since the side config reads them."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    config = llama_config(shape)
    with META:
        model = transformers.LlamaForCausalLM(config)
    backbone = DecoderBackbone(model, tok, f"llama-2-{shape}-shaped", None, META, torch.bfloat16)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # after the move to meta
    model.model.layers[0].input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
    return backbone


def token_inputs(batch: int, length: int) -> TokenInputs:
    ids = torch.zeros(batch, length, dtype=torch.long, device=META)
    return TokenInputs({"decoder": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}},
                       torch.zeros(batch, device=META), padded=False)


def saved_bytes(module: torch.nn.Module, run, exclude: list[torch.Tensor]) -> int:
    with SavedTensorCounter(exclude=[*device_tensors(module), *exclude]) as counter:
        run()
    return counter.saved_bytes


def block_linear_parameters(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name)


def lst(backbone: DecoderBackbone, reduction: int, drop: int, batch: int, length: int) -> dict:
    options = SideOptions(reduction=reduction, drop_layers=drop)
    cfg = DecoderSideNetwork.config_for(backbone, SPEC, options)
    side = new_side_network(DecoderSideNetwork, cfg, backbone).train()
    inputs = token_inputs(batch, length)
    ladder = cached_ladder_batch(inputs, side)
    trainable = sum(p.numel() for p in side.parameters() if p.requires_grad)
    exclude = [*ladder.states.values(), *ladder.masks.values(), ladder.labels]
    saved = saved_bytes(side, lambda: side.loss(ladder), exclude)
    side.set_recompute(True)  # activation checkpointing of the side blocks (lst-cached-recompute)
    saved_recompute = saved_bytes(side, lambda: side.loss(ladder), exclude)
    recompute = recompute_bytes(side, lambda: side.loss(ladder), [*device_tensors(side), *exclude])
    head = sum(b.numel() * b.element_size() for name, b in side.named_buffers() if name == "lm_head")
    d, vocab = backbone.d_model, int(backbone.config.vocab_size)
    return {"reduction": reduction, "side_layers": len(cfg.decoder_layers), "side_width": cfg.d, "trainable": trainable,
            "weights": 4 * trainable, "gradients": 4 * trainable, "optimizer": 8 * trainable, "activations": saved,
            "activations_recompute": saved_recompute + recompute, "lm_head": head, "ladder_inputs": sum(s.numel() * s.element_size() for s in ladder.states.values()),
            "full_vocab_head_bf16": 2 * vocab * d}


def lst_total(row: dict, recompute: bool = False) -> int:
    activations = row["activations_recompute"] if recompute else row["activations"]
    return activations + sum(row[k] for k in ("weights", "gradients", "optimizer", "lm_head", "ladder_inputs"))


def backbone_weights(backbone: DecoderBackbone, four_bit: bool) -> int:
    total = sum(p.numel() for p in backbone.model.parameters())
    linear = block_linear_parameters(backbone.model)
    return int(linear * NF4_BYTES + (total - linear) * 2) if four_bit else 2 * total


def baseline(backbone: DecoderBackbone, method: str, batch: int, length: int) -> dict:
    """Full fine-tuning or LoRA (rank 64, every block linear layer) with the label-word head, counted on meta."""
    from peft import LoraConfig, get_peft_model

    model = backbone.model.to(device=META, dtype=torch.bfloat16)  # the real rotary and norm of meta_backbone too
    total = sum(p.numel() for p in model.parameters())
    if method == "full":
        model.requires_grad_(True)
        wrapped = model
    else:
        model.requires_grad_(False)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        wrapped = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA_RANK, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=targets))
    module = DecoderTuned(wrapped, backbone, SPEC, "words").to(META).train()
    inputs = token_inputs(batch, length)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    saved = saved_bytes(module, lambda: module.loss(inputs), inputs.tensors())
    if method == "full":
        return {"trainable": trainable, "backbone": total, "weights": 2 * total + 4 * total, "gradients": 2 * total,
                "optimizer": 8 * total, "activations": saved}
    return {"trainable": trainable, "backbone": total, "lora_weights": 4 * trainable, "gradients": 4 * trainable,
            "optimizer": 8 * trainable, "activations": saved}


def measure(shape: str, batch: int, length: int, reductions: list[int], drops: list[int], tok) -> dict:
    out: dict = {"shape": shape, "batch": batch, "length": length, "lst": []}
    for drop in drops:
        for r in reductions:
            row = lst(meta_backbone(shape, tok), r, drop, batch, length)
            row["drop_layers"] = drop
            out["lst"].append(row)
    bb = meta_backbone(shape, tok)
    out["backbone_parameters"] = sum(p.numel() for p in bb.model.parameters())
    out["backbone_nf4"] = backbone_weights(bb, True)
    out["backbone_bf16"] = backbone_weights(bb, False)
    out["lora"] = baseline(meta_backbone(shape, tok), "lora", batch, length)
    out["full"] = baseline(meta_backbone(shape, tok), "full", batch, length)
    return out


def table(result: dict) -> str:
    """One markdown table per shape: GB (1e9 bytes) per category and in all."""
    g = lambda b: f"{b / GB:.1f}" if b >= 0.05 * GB else f"{b / GB:.2f}"  # noqa: E731
    lines = [f"**{result['shape'].upper()}** ({result['backbone_parameters'] / 1e9:.2f}B parameters), batch {result['batch']} x "
             f"{result['length']} tokens; GB = 1e9 bytes\n",
             "| method | trainable | weights | grads | optimizer | activations | LM head | ladder inputs | total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["lst"]:
        name = f"LST from cache, r={row['reduction']}, {row['side_layers']} side layers (d={row['side_width']})"
        lines.append(f"| {name} | {row['trainable'] / 1e6:.0f}M | {g(row['weights'])} | {g(row['gradients'])} | "
                     f"{g(row['optimizer'])} | {g(row['activations'])} | {row['lm_head'] / 1e3:.0f} kB | {g(row['ladder_inputs'])} | "
                     f"**{g(lst_total(row))}** |")
    for row in result["lst"]:
        name = f"LST from cache + recompute, r={row['reduction']}"
        lines.append(f"| {name} | {row['trainable'] / 1e6:.0f}M | {g(row['weights'])} | {g(row['gradients'])} | "
                     f"{g(row['optimizer'])} | {g(row['activations_recompute'])} | {row['lm_head'] / 1e3:.0f} kB | "
                     f"{g(row['ladder_inputs'])} | **{g(lst_total(row, True))}** |")
    main = next(r for r in result["lst"] if r["reduction"] == 8 and r["drop_layers"] == 0)
    for kind, key in (("4-bit NF4", "backbone_nf4"), ("bf16", "backbone_bf16")):
        total = lst_total(main) + result[key]
        lines.append(f"| LST live, r=8, {kind} backbone | {main['trainable'] / 1e6:.0f}M | {g(main['weights'] + result[key])} "
                     f"(backbone {g(result[key])}) | {g(main['gradients'])} | {g(main['optimizer'])} | {g(main['activations'])} | "
                     f"{main['lm_head'] / 1e3:.0f} kB | {g(main['ladder_inputs'])} | **{g(total)}** |")
    lora = result["lora"]
    for kind, key in (("QLoRA (NF4 backbone)", "backbone_nf4"), ("LoRA (bf16 backbone)", "backbone_bf16")):
        weights = result[key] + lora["lora_weights"]
        total = weights + lora["gradients"] + lora["optimizer"] + lora["activations"]
        lines.append(f"| {kind}, r={LORA_RANK} on every block linear | {lora['trainable'] / 1e6:.0f}M | {g(weights)} | "
                     f"{g(lora['gradients'])} | {g(lora['optimizer'])} | {g(lora['activations'])} | (in weights) | | **{g(total)}** |")
    full = result["full"]
    total = full["weights"] + full["gradients"] + full["optimizer"] + full["activations"]
    lines.append(f"| Full fine-tuning (bf16 + fp32 master, AdamW) | {full['trainable'] / 1e9:.2f}B | {g(full['weights'])} | "
                 f"{g(full['gradients'])} | {g(full['optimizer'])} | {g(full['activations'])} | (in weights) | | **{g(total)}** |")
    if result["shape"] == "70b":
        q = QST_70B
        lines.append(f"| QST (published, LLaMA-2-70B) | | {q['weights']} | | {q['optimizer']} | {q['activations']} | | | "
                     f"**~{q['total']}** |")
        lines.append(f"| QLoRA (as QST publishes it) | | | | | | | | **~{q['qlora_total']}** |")
    lines.append(f"\nA full-vocabulary frozen head in bf16 (causal-LM tuning instead of label words) would add "
                 f"{g(main['full_vocab_head_bf16'])} GB to every LST row.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--reductions", default="8,16,32")
    p.add_argument("--drop-layers", default="0", help="comma-separated: LST rows with this many backbone layers dropped")
    p.add_argument("--shapes", default="7b,70b")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tok = tokenizer()
    assert [len(w) for w in DecoderBackbone.candidate_token_ids(meta_backbone("7b", tok), SPEC)] == [1, 1]
    assert prompt_template(SPEC).words == (" negative", " positive")
    results = [measure(s, args.batch, args.length, [int(r) for r in args.reductions.split(",")],
                       [int(d) for d in args.drop_layers.split(",")], tok) for s in args.shapes.split(",")]
    for result in results:
        print(table(result) + "\n")
        if result["shape"] == "70b":
            for r in result["lst"]:
                for rc in (False, True):
                    total = lst_total(r, rc)
                    print(f"70B, LST from the cache at r = {r['reduction']}{' + recompute' if rc else ''}: {total / GB:.1f} GB = "
                          f"{total / GB / QST_70B['total']:.2f} of QST's {QST_70B['total']} GB (aim: < 0.25)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
