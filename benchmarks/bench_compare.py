"""Benchmark: `side_train.compare` on a T5-base-shaped model (random weights) and on the embedded MiniLM.

    python benchmarks/bench_compare.py t5-base-shape [--time-batch-size 8] [extra compare flags]
    python benchmarks/bench_compare.py minilm-rt [--train-steps 300] [extra compare flags]
    python benchmarks/bench_compare.py breakdown METHOD      # T5-base shape: the largest saved tensors

t5-base-shape writes a model folder holding only a T5-base config (d_model 768, d_ff 3072,
12+12 layers, 12 heads, d_kv 64; vocab 30522 to match the embedded MiniLM WordPiece tokenizer)
and that tokenizer, then runs compare with --random-init on --task synthetic at batch 100 x 128
source tokens, counting memory on the meta device and timing on the CPU, with the paper's
LST setting (r = 8, 3 layers dropped per stack). minilm-rt runs the embedded default (all-MiniLM-L6-v2,
Rotten Tomatoes) with memory counted on a real CPU step. Results go to benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from make_tiny_t5 import copy_tokenizer  # noqa: E402


def make_t5_base_shaped(folder: Path) -> Path:
    """config.json of a T5-base-shaped model and the MiniLM tokenizer; no weights."""
    from transformers import T5Config

    folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(folder)
    T5Config(vocab_size=30522, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
             feed_forward_proj="relu", pad_token_id=0, eos_token_id=102, decoder_start_token_id=0,
             tie_word_embeddings=True).save_pretrained(folder)
    return folder


def breakdown(folder: Path, method: str) -> int:
    """Where one method's saved-for-backward bytes go, at batch 100 x 128 on the meta device."""
    import numpy as np
    import torch

    from side_train import compare_run as R
    from side_train.compare import parse_args
    from side_train.families import side_family

    config = parse_args(["--model", str(folder), "--random-init", "--task", "synthetic", "--batch-size", "100",
                         "--max-length", "128", "--memory-on", "meta", "--drop-layers", "3", "--methods", method])
    meta = torch.device("meta")
    reference = R.fresh_backbone(config, meta)
    spec, plans = R.synthetic_plans(reference, 128, 100, config.seed)
    stacks = side_family(reference.family).train_stacks
    batch = R.token_inputs(plans["train"], np.arange(100), stacks).to(meta)
    memory, counter = R.measure_memory(R.prepare(method, config, spec, meta), batch)
    print(f"{method}: {memory.saved_bytes / 2**30:.3f} GiB saved in {memory.saved_storages} storages; largest groups:")
    for nbytes, storages, (shape, dtype, node) in counter.largest(12):
        print(f"  {nbytes / 2**20:9.1f} MiB  {storages:3d} x {list(shape)} {dtype} ({node})")
    return 0


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str]) -> int:
    from side_train.compare import main as compare_main

    if not argv or argv[0] not in ("t5-base-shape", "minilm-rt", "breakdown"):
        print(__doc__)
        return 2
    which, extra = argv[0], argv[1:]
    work = Path(os.environ.get("BENCH_DIR", "/tmp/lst-bench"))
    if which == "breakdown":
        return breakdown(make_t5_base_shaped(work / "t5-base-shaped"), extra[0] if extra else "lst-cached")
    if which == "t5-base-shape":
        folder = make_t5_base_shaped(work / "t5-base-shaped")
        command = ["--model", str(folder), "--random-init", "--task", "synthetic", "--batch-size", "100", "--max-length", "128",
                   "--memory-on", "meta", "--drop-layers", "3", "--out", str(work / "t5-base-shape"), *extra]
    else:
        command = ["--batch-size", "100", "--out", str(work / "minilm-rt"), *extra]
    print("load before:", uptime(), flush=True)
    print("python -m side_train.compare " + " ".join(command), flush=True)
    status = compare_main(command)
    print("load after:", uptime(), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
