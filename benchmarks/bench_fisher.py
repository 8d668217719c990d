"""Batched Fisher scores (backbone_cache.fisher) against the batch-1 loop, on random BERT-base and T5-base shapes.

    python benchmarks/bench_fisher.py --samples 1024 --batch1-samples 48
    python benchmarks/bench_fisher.py --samples 128 --models bert   # a quick run

The batch-1 loop is `backbone_cache.importance`'s recipe (one example at a time in eval mode,
`p.grad.float() ** 2` summed over every 2-D weight, then the per-row reductions). It is timed on
the first --batch1-samples examples and its seconds per example extrapolated to --samples; the
batched engine is timed on all --samples. The timings alternate in --rounds slices (a shared
machine's background load hits both alike); the 1-minute load average and the process CPU
seconds are reported too (with --threads 1 the CPU seconds barely depend on that load). The
batched engine is then run untimed on the subset: its scores against the batch-1 loop's give the
max relative difference (per key, scaled by the key's largest reference score).
Lengths: source tokens drawn from a seeded distribution over 20-60; T5 targets are 2 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbone_cache.fisher import ScoreTargets, default_targets, fisher_scores, length_batches  # noqa: E402
from backbone_cache.importance import squared_gradient_sums  # noqa: E402


def lengths(n: int, seed: int) -> np.ndarray:
    """Source lengths in [20, 60], skewed short like sentence-level GLUE inputs (seeded)."""
    return np.clip(np.round(np.random.default_rng(seed).gamma(6.0, 5.5, n)), 20, 60).astype(int)


SEQ2SEQ = {"bert": False, "t5": True}  # whether a shape's model is an encoder-decoder with label token sequences


def make_examples(shape: str, n: int, vocab: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths(n, seed):
        example = {"input_ids": torch.randint(5, vocab, (int(length),), generator=gen)}
        example["labels"] = torch.randint(5, vocab, (2,), generator=gen) if SEQ2SEQ[shape] else torch.randint(0, 2, (), generator=gen)
        out.append(example)
    return out


def pad(sequences: list[torch.Tensor], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def collate(shape: str, examples: list[dict]) -> dict[str, torch.Tensor]:
    ids, mask = pad([e["input_ids"] for e in examples])
    if SEQ2SEQ[shape]:
        return {"input_ids": ids, "attention_mask": mask, "labels": pad([e["labels"] for e in examples], -100)[0]}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([e["labels"] for e in examples])}


def build(shape: str, seed: int):
    torch.manual_seed(seed)
    if SEQ2SEQ[shape]:
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                          feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T5ForConditionalGeneration(config).eval(), None
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)).eval()
    return model, torch.nn.Linear(768, 2).requires_grad_(False)


def losses_fn(shape: str, head):
    """(batched per-example losses, the batch-1 loss of one example): the same loss."""
    if SEQ2SEQ[shape]:
        def batched(model, batch):
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
            token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
            keep = (labels != -100).float()
            return (token * keep).sum(1) / keep.sum(1)

        def single(model, example):
            return model(input_ids=example["input_ids"][None], labels=example["labels"][None]).loss

        return batched, single

    def batched(model, batch):
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
        return torch.nn.functional.cross_entropy(head(((hidden * mask).sum(1) / mask.sum(1)).float()), batch["labels"], reduction="none")

    def single(model, example):
        pooled = model(input_ids=example["input_ids"][None]).last_hidden_state.mean(1).float()
        return torch.nn.functional.cross_entropy(head(pooled), example["labels"][None])

    return batched, single


def batch1(model: torch.nn.Module, examples: list[dict], loss_of, targets: ScoreTargets,
           fisher: dict[str, torch.Tensor] | None = None, reduce: bool = True) -> dict[str, torch.Tensor]:
    """importance.squared_gradient_sums over every 2-D weight (the reference's loop), then the targets' per-row reductions.
    `fisher`: the running sums to continue (one allocation and one reduction for all timing rounds, as in one run)."""
    params = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    fisher = squared_gradient_sums(params, (lambda e=e: loss_of(model, e) for e in examples), fisher)
    if not reduce:
        return {}
    by_weight = {id(p): fisher[name] for name, p in params.items()}

    def full(name: str) -> torch.Tensor:
        return by_weight[id(model.get_submodule(name).weight)]

    scores = {f"{n}.rows": full(n).sum(1) for n in targets.rows}
    scores.update({f"{n}.columns": full(n).sum(0) for n in targets.columns})
    scores.update({f"{a}.qkv": (full(q) * full(k) * full(v)).sum(1) for a, q, k, v in targets.qkv})
    return scores


def batched(model, examples, shape, loss_of, targets, args, quiet=True) -> dict[str, torch.Tensor]:
    groups = length_batches([len(e["input_ids"]) for e in examples], args.max_tokens, args.max_examples)
    batches = (collate(shape, [examples[i] for i in g]) for g in groups)
    return fisher_scores(model, batches, loss_of, targets, quiet=quiet, total=len(examples))


def run(shape: str, args) -> dict:
    model, head = build(shape, args.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = default_targets(model)
    examples = make_examples(shape, args.samples, model.config.vocab_size, args.seed + 1)
    subset = examples[: args.batch1_samples]
    batched_loss, single_loss = losses_fn(shape, head)
    batch1(model, subset[:2], single_loss, targets)  # warm-up (allocator, kernels)
    batched(model, examples[:16], shape, batched_loss, targets, args)

    # Rounds alternate the two (each round: a slice of the batch-1 subset, then a slice of all
    # examples batched), so both see the same background load on a shared machine.
    load = [round(os.getloadavg()[0], 2)]
    wall, cpu = [0.0, 0.0], [0.0, 0.0]  # batch-1, batched
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters() if p.dim() == 2}
    for r in range(args.rounds):
        for i, items in enumerate((subset, examples)):
            part = items[r * len(items) // args.rounds : (r + 1) * len(items) // args.rounds]
            start, start_cpu = time.perf_counter(), time.process_time()
            if i == 0:  # the running Fisher's scores: after the last round, over the whole subset
                reference = batch1(model, part, single_loss, targets, fisher, reduce=r == args.rounds - 1)
            else:
                batched(model, part, shape, batched_loss, targets, args, args.quiet)
            wall[i] += time.perf_counter() - start
            cpu[i] += time.process_time() - start_cpu
    load.append(round(os.getloadavg()[0], 2))
    t_batch1, t_batched = wall[0] / len(subset), wall[1] / len(examples)
    cpu_batch1, cpu_batched = cpu[0] / len(subset), cpu[1] / len(examples)

    ours = batched(model, subset, shape, batched_loss, targets, args)
    assert set(ours) == set(reference)
    diff = max(((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30)).item() for k in reference)
    return {
        "model": shape, "samples": len(examples), "batch1_samples": len(subset), "keys": len(reference),
        "mean_tokens": round(float(np.mean([len(e["input_ids"]) for e in examples])), 1),
        "mean_tokens_batch1_subset": round(float(np.mean([len(e["input_ids"]) for e in subset])), 1),
        "batch1_s_per_example": round(t_batch1, 4), "batched_s_per_example": round(t_batched, 4),
        "batch1_extrapolated_s": round(t_batch1 * len(examples), 1), "batched_s": round(t_batched * len(examples), 1),
        "speedup": round(t_batch1 / t_batched, 2), "max_rel_diff": diff, "threads": torch.get_num_threads(),
        "cpu_s_per_example_batch1_batched": [round(cpu_batch1, 4), round(cpu_batched, 4)],
        "cpu_speedup": round(cpu_batch1 / cpu_batched, 2),
        "loadavg_1min_start_end": load,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,t5", help="comma-separated: bert (12 x 768 encoder), t5 (T5-base shape, tied)")
    p.add_argument("--samples", type=int, default=1024, help="examples the batched engine scores")
    p.add_argument("--batch1-samples", type=int, default=48, help="examples the batch-1 loop is timed on (extrapolated)")
    p.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per batch")
    p.add_argument("--max-examples", type=int, default=64, help="examples per batch at most")
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two timings")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.batch1_samples = min(args.batch1_samples, args.samples)
    if args.threads:
        torch.set_num_threads(args.threads)
    for shape in args.models.split(","):
        print(json.dumps(run(shape.strip(), args)), flush=True)


if __name__ == "__main__":
    main()
