"""Importance scores for the side network's pruning-based init (notes §1.8), stored per row.

- fisher: squared gradients of the label loss, summed over `samples` training examples
  taken one at a time in eval mode (the reference's recipe). T5 uses its LM loss on the
  target text. Encoders have no task head, so a linear probe is fitted on the frozen
  mean-pooled last layer first and the Fisher is taken of the probe's loss.
- magnitude: |W|.

Per weight matrix W [out, in] we store the L1 of its importance over each row ([out]);
for the word embeddings [V, d] the L1 over the vocabulary of each hidden dim ([d]); and
for every attention the L1 over each row of the elementwise product of the q, k and v
importances (`<attention>.qkv`), which is how the reference scores attention rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.backbones import Backbone
from shared.tasks import TaskSpec

QKV_NAMES = (("q", "k", "v"), ("query", "key", "value"))


def row_scores(model: torch.nn.Module, importance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reduce full importance tensors to per-row scores (see the module docstring)."""
    embeddings = model.get_input_embeddings().weight
    scores: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.dim() != 2 or name not in importance:
            continue
        if param is embeddings:
            scores[name.removesuffix(".weight") + ".columns"] = importance[name].abs().sum(0)
        else:
            scores[name.removesuffix(".weight") + ".rows"] = importance[name].abs().sum(1)
    for module_name, module in model.named_modules():
        for q, k, v in QKV_NAMES:
            if all(hasattr(module, n) and isinstance(getattr(module, n), torch.nn.Linear) for n in (q, k, v)):
                keys = [f"{module_name}.{n}.weight" for n in (q, k, v)]
                if all(key in importance for key in keys):
                    product = importance[keys[0]] * importance[keys[1]] * importance[keys[2]]
                    scores[f"{module_name}.qkv"] = product.abs().sum(1)
    return {k: v.float().contiguous().cpu() for k, v in scores.items()}


def magnitude_importance(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().abs() for name, p in model.named_parameters() if p.dim() == 2}


def _fit_probe(features: torch.Tensor, labels: torch.Tensor, spec: TaskSpec) -> torch.nn.Linear:
    """A linear head on frozen features (LBFGS), so encoders get a label loss to differentiate.

    It starts from zeros, not from torch's global RNG: the problem is convex, and a random start
    made the scores, so the pruned init and the trained network, differ from run to run."""
    head = torch.nn.Linear(features.shape[1], spec.num_labels).to(features.device, features.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=100, line_search_fn="strong_wolfe")
    loss_fn = _loss_fn(spec)

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(head(features), labels) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.requires_grad_(False)


def _loss_fn(spec: TaskSpec):
    if spec.label_kind == "regression":
        return lambda out, y: torch.nn.functional.mse_loss(out.squeeze(-1), y.float())
    return lambda out, y: torch.nn.functional.cross_entropy(out, y.long())


def fisher_importance(backbone: Backbone, spec: TaskSpec, plan, samples: int, quiet: bool = False) -> dict[str, torch.Tensor]:
    """Sum of squared gradients of the label loss, one example at a time, in eval mode."""
    model, device = backbone.model, backbone.device
    n = min(samples, plan.num_examples)
    rows = np.random.default_rng(0).permutation(plan.num_examples)[:n]
    params = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    probe = None
    if backbone.family == "encoder":
        with torch.inference_mode():
            pooled = []
            for i in rows:
                ids = torch.tensor([plan.source_ids[i]], device=device)
                pooled.append(model(input_ids=ids).last_hidden_state.mean(1).float())
        features = torch.cat(pooled).clone()
        labels = torch.tensor([plan.examples[i].label for i in rows], device=device)
        with torch.enable_grad():
            probe = _fit_probe(features, labels, spec)
    loss_fn = _loss_fn(spec)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for i in tqdm(rows, desc="fisher", unit="ex", disable=quiet, dynamic_ncols=True):
            ids = torch.tensor([plan.source_ids[i]], device=device)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                if backbone.family == "t5":
                    labels = torch.tensor([plan.target_ids[i]], device=device)
                    loss = model(input_ids=ids, labels=labels).loss
                else:
                    kwargs = {}
                    if plan.token_type_ids is not None:
                        kwargs["token_type_ids"] = torch.tensor([plan.token_type_ids[i]], device=device)
                    pooled = model(input_ids=ids, **kwargs).last_hidden_state.mean(1).float()
                    loss = loss_fn(probe(pooled), torch.tensor([plan.examples[i].label], device=device))
                loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.float() ** 2
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return fisher


def compute_importance(backbone: Backbone, spec: TaskSpec, plan, kind: str, samples: int, quiet: bool = False) -> dict[str, torch.Tensor]:
    """Per-row scores of the given kind ("fisher" or "magnitude")."""
    if kind == "magnitude":
        return row_scores(backbone.model, magnitude_importance(backbone.model))
    return row_scores(backbone.model, fisher_importance(backbone, spec, plan, samples, quiet))


def save_importance(path: Path, scores: dict[str, torch.Tensor], kind: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(scores, str(tmp), metadata={"kind": kind})
    tmp.replace(path)


def load_importance(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        kind = (handle.metadata() or {}).get("kind", "fisher")
        return {k: handle.get_tensor(k) for k in handle.keys()}, kind
