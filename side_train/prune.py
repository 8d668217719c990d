"""Pruning-based init of the side blocks from the backbone (notes §1.8, `fisher-v2`).

Rows of each backbone weight are ranked by an importance score and the top 1/r kept,
in ascending index order; the next weight's columns are sliced to match, chaining
through every backbone block (dropped ones too) so side block j starts as the pruned
backbone block `side_layers[j]`. The chain follows the reference:

    K = top d/r embedding dims                       (word-embedding column scores)
    per block: norm[K]; q,k,v[:, K] rows by qkv score -> K_att
               o[:, K_att] rows -> K; norm[K]; [decoder: cross q,k,v[:, K] -> K_att; o -> K; norm[K]]
               wi[:, K] rows -> K_ff; wo[:, K_ff] rows -> K
    final norm[K]; the decoder continues from the encoder's last K.

Scores come per row (see backbone_cache.importance): fisher from the cache's
importance.safetensors, magnitude from |W|. Deliberate difference from the reference: a row's
score is its L1 over *all* columns, not only the kept ones, so scores can be stored per
row instead of as a full copy of the model.
"""

from __future__ import annotations

import torch

from side_train.model import LadderSideNetwork


def magnitude_scores(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row L1 of |W| for every 2-D weight, plus qkv products, named as in importance files.

    Scores are float32 on the CPU whatever the weights' device and dtype (a bf16 backbone on a
    GPU ranks rows as the same backbone in float32 on a CPU does)."""
    def magnitude(name: str) -> torch.Tensor:  # one weight at a time: no second copy of the whole model
        return state[name].detach().float().cpu().abs()

    names = [name for name, w in state.items() if w.dim() == 2 and name.endswith(".weight")]
    scores = {}
    for name in names:
        w = magnitude(name)
        base = name.removesuffix(".weight")
        scores[base + ".rows"] = w.sum(1)
        scores[base + ".columns"] = w.sum(0)
    for name in names:
        for q, k, v in (("q", "k", "v"), ("query", "key", "value")):
            if name.endswith(f".{q}.weight"):
                base = name[: -len(f".{q}.weight")]
                parts = [f"{base}.{n}.weight" for n in (q, k, v)]
                if all(part in state for part in parts):
                    scores[f"{base}.qkv"] = (magnitude(parts[0]) * magnitude(parts[1]) * magnitude(parts[2])).sum(1)
    return scores


def top_rows(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, ascending (ties broken by lower index)."""
    order = torch.argsort(-score.double(), stable=True)[:keep]
    return torch.sort(order).values


class _Copier:
    """Copies sliced backbone tensors into side parameters and records what it did."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.log: list[tuple[str, str]] = []

    def put(self, param: torch.Tensor, source: str, rows=None, cols=None) -> None:
        w = self.state[source]
        if rows is not None:
            w = w[rows]
        if cols is not None:
            w = w[:, cols]
        with torch.no_grad():
            param.copy_(w.to(param.dtype))
        self.log.append((source, "sliced"))


def init_t5_from_backbone(side: LadderSideNetwork, state: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict:
    """Prune a T5 backbone state dict into the side network; returns the kept indices per block."""
    cfg, r = side.cfg, side.cfg.reduction
    copy = _Copier(state)
    keep_d, keep_ff, keep_inner = cfg.d, cfg.d_ff, cfg.num_heads * cfg.d_kv
    kept: dict = {}
    K = top_rows(scores["shared.columns"], keep_d)
    for stack_name, side_stack, n_blocks in (
        ("encoder", side.encoder, cfg.num_backbone_layers),
        ("decoder", side.decoder, cfg.num_backbone_decoder_layers),
    ):
        position = {layer: j for j, layer in enumerate(side_stack.layers)}
        for i in range(n_blocks):
            prefix = f"{stack_name}.block.{i}.layer"
            block = side_stack.blocks[position[i]] if i in position else None
            sublayers = [("0", "SelfAttention", "self")] + ([("1", "EncDecAttention", "cross")] if stack_name == "decoder" else [])
            record = {}
            for idx, attn_name, ours in sublayers:
                K_att = top_rows(scores[f"{prefix}.{idx}.{attn_name}.qkv"], keep_inner)
                K_new = top_rows(scores[f"{prefix}.{idx}.{attn_name}.o.rows"], keep_d)
                if block is not None:
                    copy.put(getattr(block, f"{ours}_norm").weight, f"{prefix}.{idx}.layer_norm.weight", rows=K)
                    attn = getattr(block, f"{ours}_attn")
                    for n in ("q", "k", "v"):
                        copy.put(getattr(attn, n).weight, f"{prefix}.{idx}.{attn_name}.{n}.weight", rows=K_att, cols=K)
                    copy.put(attn.o.weight, f"{prefix}.{idx}.{attn_name}.o.weight", rows=K_new, cols=K_att)
                record[ours] = (K.clone(), K_att)
                K = K_new
            ff = f"{prefix}.{len(sublayers)}"
            gated = f"{ff}.DenseReluDense.wi_0.weight" in state
            wi_names = ["wi_0", "wi_1"] if gated else ["wi"]
            K_ff = top_rows(scores[f"{ff}.DenseReluDense.{wi_names[0]}.rows"], keep_ff)
            K_next = top_rows(scores[f"{ff}.DenseReluDense.wo.rows"], keep_d)
            if block is not None:
                copy.put(block.ff_norm.weight, f"{ff}.layer_norm.weight", rows=K)
                for n in wi_names:
                    copy.put(getattr(block, n).weight, f"{ff}.DenseReluDense.{n}.weight", rows=K_ff, cols=K)
                copy.put(block.wo.weight, f"{ff}.DenseReluDense.wo.weight", rows=K_next, cols=K_ff)
            record["ff"] = (K.clone(), K_ff, K_next)
            K = K_next
            kept[f"{stack_name}.{i}"] = record
        copy.put(side_stack.final_norm.weight, f"{stack_name}.final_layer_norm.weight", rows=K)
        # The relative bias always comes from backbone block 0 (same number of heads).
        copy.put(side_stack.relative_bias.weight, f"{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    del r
    return kept


def init_encoder_from_backbone(side: LadderSideNetwork, state: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict:
    """Prune a BERT-family state dict (post-norm layers with biases) into the side encoder."""
    cfg = side.cfg
    copy = _Copier(state)
    prefix0 = "embeddings.word_embeddings" if "embeddings.word_embeddings.weight" in state else None
    if prefix0 is None:
        raise KeyError("no word embeddings in the backbone state dict")
    K = top_rows(scores[f"{prefix0}.columns"], cfg.d)
    position = {layer: j for j, layer in enumerate(side.encoder.layers)}
    kept = {}
    for i in range(cfg.num_backbone_layers):
        p = f"encoder.layer.{i}"
        K_att = top_rows(scores[f"{p}.attention.self.qkv"], cfg.d)
        K_new = top_rows(scores[f"{p}.attention.output.dense.rows"], cfg.d)
        K_ff = top_rows(scores[f"{p}.intermediate.dense.rows"], cfg.d_ff)
        K_next = top_rows(scores[f"{p}.output.dense.rows"], cfg.d)
        if i in position:
            block = side.encoder.blocks[position[i]]
            attn = block.self_attn
            for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
                copy.put(getattr(attn, ours).weight, f"{p}.attention.self.{theirs}.weight", rows=K_att, cols=K)
                copy.put(getattr(attn, ours).bias, f"{p}.attention.self.{theirs}.bias", rows=K_att)
            copy.put(attn.o.weight, f"{p}.attention.output.dense.weight", rows=K_new, cols=K_att)
            copy.put(attn.o.bias, f"{p}.attention.output.dense.bias", rows=K_new)
            copy.put(block.attn_norm.weight, f"{p}.attention.output.LayerNorm.weight", rows=K_new)
            copy.put(block.attn_norm.bias, f"{p}.attention.output.LayerNorm.bias", rows=K_new)
            copy.put(block.wi.weight, f"{p}.intermediate.dense.weight", rows=K_ff, cols=K_new)
            copy.put(block.wi.bias, f"{p}.intermediate.dense.bias", rows=K_ff)
            copy.put(block.wo.weight, f"{p}.output.dense.weight", rows=K_next, cols=K_ff)
            copy.put(block.wo.bias, f"{p}.output.dense.bias", rows=K_next)
            copy.put(block.ff_norm.weight, f"{p}.output.LayerNorm.weight", rows=K_next)
            copy.put(block.ff_norm.bias, f"{p}.output.LayerNorm.bias", rows=K_next)
        kept[f"encoder.{i}"] = {"in": K.clone(), "att": K_att, "mid": K_new, "ff": K_ff, "out": K_next}
        K = K_next
    return kept


def random_init(side: LadderSideNetwork) -> None:
    """Fan-in normal init of the side blocks' linear layers; norms at 1, biases 0."""
    blocks = [*side.encoder.blocks] + ([*side.decoder.blocks] if side.cfg.family == "t5" else [])
    for block in blocks:
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, 0.0, module.in_features**-0.5)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
