"""Fisher scores on a real decoder (Gemma 3 270M): the batched engine against the batch-1 loop, through extract's own code.

    python benchmarks/bench_fisher_decoder.py --model GEMMA_DIR --gguf-file gemma-3-270m-q4_k_m.gguf --samples 1024 --batch1-samples 64
    python benchmarks/bench_fisher_decoder.py --model GEMMA_DIR --gguf-file gemma-3-270m-q4_k_m.gguf --task instruct --samples 256

--task label-words (the default) scores the embedded task's label words; --task instruct an instruction task made
from the same texts (prompt: "Continue: " and a review's first 4 words; response: its next 12 words), whose Fisher
loss is the response tokens' cross-entropy through the whole head.

Both arms call `backbone_cache.importance.fisher_scores` on the embedded Rotten Tomatoes training split, as
`backbone_cache.extract --init fisher` does: the batched engine on the first --samples Fisher rows, the batch-1
loop on the first --batch1-samples of the same rows (its seconds per example extrapolated to --samples). The
loop's subset runs in two halves, one before and one after the batched arm, so both see the same background
load. The batched engine then scores the subset again, untimed: the largest difference from the loop's scores,
relative to each key's largest score, is reported.
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

from backbone_cache.importance import fisher_rows, fisher_scores  # noqa: E402
from backbone_cache.plan import plan_split  # noqa: E402
from shared.backbones import load_backbone  # noqa: E402
from shared.tasks import INSTRUCT_TASK, Example, TaskSpec, load_default  # noqa: E402


class RowsPlan:
    """A split plan seen through a subset of its Fisher rows (the rows fisher_scores would draw, in order)."""

    def __init__(self, plan, rows: np.ndarray):
        self.plan, self.rows = plan, rows
        self.num_examples = len(rows)
        self.examples = [plan.examples[i] for i in rows]
        self.lengths = np.asarray(plan.lengths)[rows]

    def token_batch(self, indices, device):
        return self.plan.token_batch(self.rows[np.asarray(indices)], device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a decoder's folder (or hub name)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--task", choices=("label-words", "instruct"), default="label-words")
    p.add_argument("--samples", type=int, default=1024, help="Fisher examples the batched engine scores")
    p.add_argument("--batch1-samples", type=int, default=64, help="examples the batch-1 loop is timed on (extrapolated)")
    p.add_argument("--max-length", type=int, default=128, help="source tokens kept (extract's default)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    backbone = load_backbone(args.model, device, gguf_file=args.gguf_file)
    spec, splits = load_default()
    train = splits["train"]
    if args.task == "instruct":
        spec = TaskSpec(INSTRUCT_TASK, ["prompt", "response"], "lm", [], [], ["loss", "perplexity"], 3)
        train = [Example(e.example_id, ["Continue: " + " ".join(e.texts[0].split()[:4]) + "\n",
                                        " ".join(e.texts[0].split()[4:16]) or "ok"], 0) for e in train]
    plan = plan_split("train", train, spec, backbone, args.max_length, 16, len(train), False)
    rows = fisher_rows(plan.num_examples, args.samples)  # exactly the rows extract --fisher-samples N scores
    subset = RowsPlan(plan, rows[: args.batch1_samples])
    halves = [RowsPlan(plan, part) for part in np.array_split(rows[: args.batch1_samples], 2)]
    everything = RowsPlan(plan, rows)
    for batched in (True, False):  # warm-up of both arms: the loop's first [V, d] gradients fault in their pages
        fisher_scores(backbone, spec, RowsPlan(plan, rows[:8]), 8, quiet=True, batched=batched)

    load = [round(os.getloadavg()[0], 2)]
    start = time.perf_counter()
    fisher_scores(backbone, spec, halves[0], len(halves[0].rows), quiet=True, batched=False)
    batch1_s = time.perf_counter() - start
    start = time.perf_counter()
    fisher_scores(backbone, spec, everything, len(rows), quiet=True)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    fisher_scores(backbone, spec, halves[1], len(halves[1].rows), quiet=True, batched=False)
    batch1_s += time.perf_counter() - start
    load.append(round(os.getloadavg()[0], 2))

    reference = fisher_scores(backbone, spec, subset, len(subset.rows), quiet=True, batched=False)
    ours = fisher_scores(backbone, spec, subset, len(subset.rows), quiet=True)
    diff = max(float((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30)) for k in reference)
    per_example = (batch1_s / len(subset.rows), batched_s / len(rows))
    result = {
        "model": backbone.name, "task": args.task, "samples": len(rows), "batch1_samples": len(subset.rows), "keys": len(reference),
        "mean_tokens": round(float(np.mean(everything.lengths)), 1),
        "batch1_s_per_example": round(per_example[0], 4), "batched_s_per_example": round(per_example[1], 4),
        "batch1_extrapolated_s": round(per_example[0] * len(rows), 1), "batched_s": round(batched_s, 1),
        "speedup": round(per_example[0] / per_example[1], 2), "max_rel_diff": diff, "threads": torch.get_num_threads(),
        "loadavg_1min_start_end": load,
    }
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
