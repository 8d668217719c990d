"""Importance scores for the side network's pruning-based init (notes §1.8), stored per row.

The family says which parameters are scored (`Backbone.score_targets`) and what loss Fisher
importance differentiates (`Backbone.fisher_objective`: T5's LM loss on the target text; for
an encoder, the loss of a linear probe fitted on its frozen pooled states).

- fisher: squared per-example gradients of that loss, summed over `samples` training
  examples drawn by a seeded permutation, in eval mode (the reference's recipe);
- magnitude: |W|.

Per target we store the L1 of its importance over each row (`<linear>.rows`), over the
vocabulary for each hidden dim of the word embeddings (`<embedding>.columns`), and for every
attention the L1 over each row of the elementwise product of the q, k and v importances
(`<attention>.qkv`), which is how the reference scores attention rows; a fused qkv weight
(target `(attention, fused, chunks)`) is cut into its q, k and v row chunks first.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.families import Backbone, ScoreTargets
from shared.tasks import TaskSpec


def reduce_scores(importance: dict[str, torch.Tensor], targets: ScoreTargets) -> dict[str, torch.Tensor]:
    """Full importance tensors (by module name) -> the stored per-row scores of `targets`."""
    scores = {f"{name}.rows": importance[name].abs().sum(1) for name in targets.rows}
    scores.update({f"{name}.columns": importance[name].abs().sum(0) for name in targets.columns})
    for attention, *parts in targets.qkv:
        if len(parts) == 2:  # (attention, fused, chunks): the fused weight's rows are q, k, v in equal chunks
            parts = importance[parts[0]].chunk(parts[1], 0)
        else:
            parts = [importance[name] for name in parts]
        scores[f"{attention}.qkv"] = math.prod(parts[1:], start=parts[0]).abs().sum(1)
    return {k: v.float().contiguous().cpu() for k, v in scores.items()}


def target_weights(model: torch.nn.Module, targets: ScoreTargets) -> dict[str, torch.Tensor]:
    """The weight of every module `targets` names."""
    names = {*targets.rows, *targets.columns, *(n for group in targets.qkv for n in group[1:] if isinstance(n, str))}
    return {name: model.get_submodule(name).weight for name in sorted(names)}


def magnitude_scores(backbone: Backbone) -> dict[str, torch.Tensor]:
    """|W| scores, float32 on the CPU whatever the weights' device and dtype (one weight at a time)."""
    targets = backbone.score_targets()
    weights = target_weights(backbone.model, targets)
    return reduce_scores({name: w.detach().float().cpu().abs() for name, w in weights.items()}, targets)


def fisher_rows(num_examples: int, samples: int) -> np.ndarray:
    """The Fisher samples: the first `samples` of a seeded permutation of the split."""
    return np.random.default_rng(0).permutation(num_examples)[: min(samples, num_examples)]


FISHER_MAX_TOKENS = 4096  # padded tokens per batched Fisher forward (examples * longest)
FISHER_MAX_EXAMPLES = 64


def fisher_scores(backbone: Backbone, spec: TaskSpec, plan, samples: int, quiet: bool = False,
                  batched: bool = True) -> dict[str, torch.Tensor]:
    """Fisher importance of the family's targets over `samples` training examples.

    Batched (backbone_cache.fisher: per-example gradients read from hooks, a few examples per
    backward pass, equal to the batch-1 loop to float rounding) where every scored use is per example
    (the family's `fisher_objective` runs every scored weight through the module that holds it); the
    batch-1 loop otherwise, or with `batched=False`."""
    device = backbone.device
    rows = fisher_rows(plan.num_examples, samples)
    labels = torch.tensor([float(plan.examples[i].label) for i in rows])
    chunks = [rows[i : i + 32] for i in range(0, len(rows), 32)]
    objective = backbone.fisher_objective([plan.token_batch(c, device) for c in chunks],
                                          [labels[i : i + len(c)] for i, c in zip(range(0, len(rows), 32), chunks)], spec)
    targets = backbone.score_targets()
    if batched:
        from backbone_cache import fisher

        groups = fisher.length_batches(plan.lengths[rows], backbone.fisher_max_tokens(spec, FISHER_MAX_TOKENS),
                                       FISHER_MAX_EXAMPLES)
        batches = ((plan.token_batch(rows[g], device), labels[g]) for g in groups)
        try:
            return fisher.fisher_scores(backbone.model, batches, lambda _model, b: objective(*b), targets,
                                        quiet=quiet, total=len(rows))
        except fisher.NotPerExample as err:
            if not quiet:
                print(f"fisher: {err}; scoring one example at a time instead", file=sys.stderr)
    return fisher_scores_batch1(backbone, objective, targets, plan, rows, labels, quiet)


def fisher_scores_batch1(backbone: Backbone, objective, targets: ScoreTargets, plan, rows: np.ndarray,
                         labels: torch.Tensor, quiet: bool = False) -> dict[str, torch.Tensor]:
    """The reference's loop: one example per backward pass, the squared weight gradients summed."""
    device = backbone.device
    losses = (lambda n=n, i=i: objective(plan.token_batch([i], device), labels[n : n + 1]).sum()
              for n, i in enumerate(tqdm(rows, desc="fisher", unit="ex", disable=quiet, dynamic_ncols=True)))
    return reduce_scores(squared_gradient_sums(target_weights(backbone.model, targets), losses), targets)


def squared_gradient_sums(weights: dict[str, torch.Tensor], losses: Iterable[Callable[[], torch.Tensor]],
                          fisher: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The batch-1 loop: backprop each loss (one example's) alone and add every weight's squared
    gradient to `fisher` (float32 running sums; new zeros when None), which is returned."""
    if fisher is None:
        fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for loss in losses:
            for w in weights.values():
                w.grad = None
            with torch.enable_grad():
                loss().backward()
            for name, w in weights.items():
                if w.grad is not None:
                    fisher[name] += w.grad.float() ** 2
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
    return fisher


def importance_bytes(scores: dict[str, torch.Tensor], kind: str) -> bytes:
    """The scores as a safetensors file's bytes (written whole by the cache's location)."""
    from safetensors.torch import save

    return save(scores, metadata={"kind": kind})


def load_importance(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        kind = (handle.metadata() or {}).get("kind", "fisher")
        return {k: handle.get_tensor(k) for k in handle.keys()}, kind
