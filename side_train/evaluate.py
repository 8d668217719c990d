"""Evaluation: the family's predictions (candidate scoring, a head) or generation with a live backbone."""

from __future__ import annotations

import numpy as np
import torch

from shared.metrics import compute_metrics
from shared.tasks import TaskSpec
from side_train.data import eval_batches
from side_train.model import SideNetwork


@torch.no_grad()
def predict(model: SideNetwork, source, spec: TaskSpec, device: torch.device, batch_size: int,
            mode: str = "candidates", autocast: bool = False) -> np.ndarray:
    """Predicted label values for every example of a split, in storage order."""
    model.eval()
    predictions = np.zeros(source.num_examples)
    for rows in eval_batches(source.num_examples, batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if mode == "generate":
                predictions[rows] = model.generate_values(source, rows, device, spec)
            else:
                predictions[rows] = model.predict(source.batch(rows).to(device)).numpy()
    return predictions


def evaluate(model: SideNetwork, source, spec: TaskSpec, device: torch.device, batch_size: int, mode: str = "candidates",
             autocast: bool = False) -> dict:
    predictions = predict(model, source, spec, device, batch_size, mode, autocast)
    return compute_metrics(spec.metrics, predictions, source.labels)
