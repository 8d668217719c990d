"""Benchmark: how much a prompt template puts into a frozen decoder's states, before any cache is built.

    python benchmarks/bench_prompts.py --model GEMMA_CONVERTED_DIR [--train-examples 2000] [--out OUT]

For each template (the default task's own, one with an instruction before the review, one with two
fixed demonstrations before it), the frozen model runs over an evenly spaced subset of the embedded
Rotten Tomatoes training split and the whole validation split, in batches of 16 left-padded
prompts, through the model's own forward (transformers, float32). Two figures per template:

- zero-shot: the share of validation prompts whose " positive" logit beats " negative" at the
  last position (no training);
- probe: a logistic regression (scikit-learn, C in 0.01, 0.1, 1 picked on validation) on the
  final-normed state of the last position, fitted on the training subset.

A causal model's states at a token see only the tokens before it, so only text placed before the
review changes the states of the review's tokens, which LST's ladders read. Prints one line per
template and writes OUT/prompts.json. Needs scikit-learn (the `baselines` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.tasks import load_task  # noqa: E402

TEMPLATES = {
    "plain": "Review: {sentence}\nSentiment:",
    "intro": "Is this movie review positive or negative?\nReview: {sentence}\nSentiment:",
    "fewshot": "Review: a gorgeous, witty and moving film.\nSentiment: positive\n"
               "Review: a dull, lifeless and tedious mess.\nSentiment: negative\nReview: {sentence}\nSentiment:",
}


@torch.inference_mode()
def features(model, tokenizer, examples, template: str, words: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(final-normed last-position states [n, d], positive-minus-negative logit [n])."""
    states, margins = [], []
    for start in range(0, len(examples), 16):
        prompts = [template.format(sentence=ex.texts[0]) for ex in examples[start : start + 16]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        out = model(**enc, output_hidden_states=True, logits_to_keep=1)
        states.append(out.hidden_states[-1][:, -1].float().numpy())
        margins.append((out.logits[:, -1, words[1]] - out.logits[:, -1, words[0]]).numpy())
    return np.concatenate(states), np.concatenate(margins)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a safetensors folder (a GGUF's converted folder)")
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--out", default="runs/bench_prompts")
    args = p.parse_args()
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    _, splits = load_task(None)
    step = max(1, len(splits["train"]) // args.train_examples)
    train, validation = splits["train"][::step][: args.train_examples], splits["validation"]
    words = tuple(tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " positive"))
    y_train, y_val = np.array([e.label for e in train]), np.array([e.label for e in validation])
    results = {}
    for name, template in TEMPLATES.items():
        start = time.time()
        x_train, _ = features(model, tokenizer, train, template, words)
        x_val, margin = features(model, tokenizer, validation, template, words)
        probe, c = max((LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train).score(x_val, y_val), c)
                       for c in (0.01, 0.1, 1.0))
        results[name] = {"template": template, "zero_shot_validation": round(100 * float(np.mean((margin > 0) == y_val)), 2),
                         "probe_validation": round(100 * probe, 2), "C": c, "seconds": round(time.time() - start)}
        print(f"{name}: zero-shot val {results[name]['zero_shot_validation']:.2f}  probe val "
              f"{results[name]['probe_validation']:.2f} (C={c})  {results[name]['seconds']}s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prompts.json").write_text(json.dumps({"train_examples": len(train), **results}, indent=1))


if __name__ == "__main__":
    main()
