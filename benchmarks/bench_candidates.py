"""Time the decoder family's label-word scoring of multi-token words (`score_candidates`) on a synthetic batch.

    python benchmarks/bench_candidates.py --side-model RUN/side_model --words 4 --word-tokens 3 \
        --prompt-tokens 48 --batch-size 32 --rounds 7

The side network's shape comes from a saved side model (`side_config.json`; its weights and the
backbone's LM head are replaced by random ones of the same shape, which cost the same). The batch
has the cache's layout: a right-padded prompt stack [B, L, P, D] (lengths spread over L/2 .. L)
and a candidates stack [B K, M, P, D], random bfloat16. Prints the median seconds per batch and
the examples per second. Run it from two checkouts to compare implementations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path.cwd()))

from side_train.data import Batch  # noqa: E402
from side_train.model import load_side_config  # noqa: E402


def synthetic_batch(cfg, batch_size: int, prompt_tokens: int, words: list[list[int]], generator: torch.Generator) -> Batch:
    """Random ladder inputs in the cache's layout, with each word's next-token targets."""
    positions, width = 1 + len(cfg.decoder_layers), cfg.backbone_d
    k, m = len(words), max(len(w) for w in words)
    lengths = torch.randint(prompt_tokens // 2, prompt_tokens + 1, (batch_size,), generator=generator)
    mask = torch.arange(prompt_tokens)[None] < lengths[:, None]
    prompt = torch.randn(batch_size, prompt_tokens, positions, width, generator=generator).bfloat16() * mask[..., None, None]
    cand = torch.randn(batch_size * k, m, positions, width, generator=generator).bfloat16()
    cand_mask = torch.tensor([[j < len(w) for j in range(m)] for w in words] * batch_size)
    targets = torch.tensor([[w[j + 1] if j + 1 < len(w) else -100 for j in range(m)] for w in words] * batch_size)
    batch = Batch(torch.arange(batch_size), torch.zeros(batch_size, dtype=torch.float64))
    batch.states = {"decoder": prompt, "candidates": cand * cand_mask[..., None, None]}
    batch.masks = {"decoder": mask, "candidates": cand_mask}
    batch.targets = {"candidates": targets}
    return batch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side-model", required=True, help="a saved decoder side model folder (its side_config.json gives the shape)")
    p.add_argument("--words", type=int, default=4)
    p.add_argument("--word-tokens", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)

    from side_train.families import side_family

    cfg = load_side_config(Path(args.side_model))
    words = [[100 + args.word_tokens * i + j for j in range(args.word_tokens)] for i in range(args.words)]
    cfg = replace(cfg, candidate_tokens=words, candidate_values=[float(i) for i in range(args.words)])
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = torch.randn(max(max(w) for w in words) + 1, cfg.backbone_d, generator=generator)
    network = side_family(cfg.family)(cfg, head).eval()
    batch = synthetic_batch(cfg, args.batch_size, args.prompt_tokens, words, generator)
    network.score_candidates(batch)  # warm-up
    seconds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        network.score_candidates(batch)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    print(f"{args.words} words x {args.word_tokens} tokens, prompts up to {args.prompt_tokens}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads: {median:.4f} s per batch (median of {args.rounds}), "
          f"{args.batch_size / median:,.0f} examples/s")


if __name__ == "__main__":
    main()
