"""Benchmark: batched against one-prompt-at-a-time generation of a trained decoder side network.

    python benchmarks/bench_generate.py --run RUN --prompts 32 --max-new-tokens 16 --batch-sizes 1,8 --rounds 2

RUN is a label-word or instruction run folder of `side_train.run` on a decoder backbone. The
prompts are the embedded Rotten Tomatoes test texts, rendered with the run's template (an
instruction run gets them as raw prompts). Each round generates every prompt greedily at every
batch size, batch sizes alternated; it reports wall seconds and generated tokens per second per
batch size (median over rounds), and whether every batch size gave the same texts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from shared.tasks import load_default
    from side_train.model import GenerationConfig
    from side_train.predict import Predictor

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    predictor = Predictor.from_run(Path(args.run), args.device)
    texts = [ex.texts[0] for ex in load_default()[1]["test"][: args.prompts]]
    inputs = texts if predictor.spec.label_kind == "lm" else [[t] for t in texts]
    predictor.generate_texts(inputs[:2], GenerationConfig(max_new_tokens=2))  # load the backbone, warm up
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    seconds: dict[int, list[float]] = {b: [] for b in sizes}
    outputs: dict[int, list[str]] = {}
    for _ in range(args.rounds):
        for b in sizes:
            settings = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=b)
            start = time.perf_counter()
            outputs[b] = predictor.generate_texts(inputs, settings)
            seconds[b].append(time.perf_counter() - start)
    tokenizer = predictor.backbone.tokenizer
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in outputs[sizes[0]])
    print(f"{len(inputs)} prompts, at most {args.max_new_tokens} new tokens each, {tokens} generated (re-tokenized)")
    print("| batch size | seconds (median) | rounds | prompts / s | speed-up |")
    print("|---|---|---|---|---|")
    base = statistics.median(seconds[sizes[0]])
    for b in sizes:
        med = statistics.median(seconds[b])
        rounds = ", ".join(f"{s:.1f}" for s in seconds[b])
        print(f"| {b} | {med:.1f} | {rounds} | {len(inputs) / med:.2f} | {base / med:.2f}x |")
    same = all(outputs[b] == outputs[sizes[0]] for b in sizes)
    differing = sum(any(outputs[b][i] != outputs[sizes[0]][i] for b in sizes) for i in range(len(inputs)))
    print(f"same texts at every batch size: {same} ({differing} of {len(inputs)} prompts differ)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
