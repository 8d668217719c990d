"""Evaluation: the family's predictions (candidate scoring, a head) or generation with a live backbone.

Under torchrun (`ranks` given) each rank scores its contiguous share of the split
(`side_train.data.share_bounds`) and the predictions are gathered on every rank.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.distributed import Ranks, all_gather_objects
from shared.errors import UserError
from shared.metrics import compute_metrics
from shared.tasks import TaskSpec
from side_train.data import eval_batches, share_bounds
from side_train.model import SideNetwork


@torch.no_grad()
def predict(model: SideNetwork, source, spec: TaskSpec, device: torch.device, batch_size: int,
            mode: str = "candidates", autocast: bool = False, ranks: Ranks | None = None) -> np.ndarray:
    """Predicted label values for every example of a split, in storage order (with `ranks`:
    each rank predicts its share, and every rank gets them all)."""
    model.eval()
    predictions = np.zeros(source.num_examples)
    lo, hi = (0, source.num_examples) if ranks is None else share_bounds(source.lengths, ranks.world_size)[ranks.rank]
    for rows in eval_batches(hi, batch_size, start=lo):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if mode == "generate":
                predictions[rows] = model.generate_values(source, rows, device, spec)
            else:
                predictions[rows] = model.predict(source.batch(rows).to(device)).numpy()
    if ranks is not None:
        for a, b, part in all_gather_objects((lo, hi, predictions[lo:hi])):
            predictions[a:b] = part
    return predictions


GENERATE_ON_LM = ("--eval generate reads label words; an instruction task is scored by its response tokens' loss: "
                  "drop --eval generate")


def evaluate(model: SideNetwork, source, spec: TaskSpec, device: torch.device, batch_size: int, mode: str = "candidates",
             autocast: bool = False, ranks: Ranks | None = None) -> dict:
    """The split's metrics: the task's (from `predict`), or instruction tasks' response-token loss."""
    if spec.label_kind == "lm":
        if mode == "generate":
            raise UserError(GENERATE_ON_LM)
        return language_model_metrics(model, source, device, batch_size, autocast, ranks)
    predictions = predict(model, source, spec, device, batch_size, mode, autocast, ranks)
    return compute_metrics(spec.metrics, predictions, source.labels)


@torch.no_grad()
def language_model_metrics(model: SideNetwork, source, device: torch.device, batch_size: int, autocast: bool = False,
                           ranks: Ranks | None = None) -> dict:
    """Instruction tasks: the response tokens' mean cross-entropy (`loss`), its `perplexity`, the
    token count, and `score` = -loss (higher is better, as the best-model choice wants)."""
    model.eval()
    total, count = 0.0, 0.0
    lo, hi = (0, source.num_examples) if ranks is None else share_bounds(source.lengths, ranks.world_size)[ranks.rank]
    for rows in eval_batches(hi, batch_size, start=lo):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            nll, tokens = model.token_losses(source.batch(rows).to(device))
        total, count = total + float(nll.sum()), count + float(tokens.sum())
    if ranks is not None:
        parts = all_gather_objects((total, count))
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    if count == 0:
        raise UserError(f"the {getattr(source, 'split', 'evaluation')} split holds no response tokens to score (every "
                        "response is empty or cut off); give it examples with responses, or a larger --max-target-length")
    loss = total / count
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "tokens": int(count), "score": -loss}
