"""Task metrics as the paper reports them (x100), via scikit-learn and scipy."""

from __future__ import annotations

import math

import numpy as np


def compute_metrics(names: list[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Each named metric x100, plus `score`, their mean (the reference's `average_metrics`).

    Class predictions are indices; an invalid prediction (-1) counts as wrong, and for F1
    as the opposite class, as in the reference.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            value = accuracy_score(labels.astype(int), predictions.astype(int))
        elif name == "f1":
            fixed = np.where(predictions < 0, 1 - labels.astype(int), predictions).astype(int)
            value = f1_score(labels.astype(int), fixed, zero_division=0)
        elif name == "matthews_correlation":
            value = matthews_corrcoef(labels.astype(int), predictions.astype(int))
        elif name in ("pearson", "spearman"):
            if np.std(predictions) == 0 or np.std(labels) == 0:
                value = 0.0
            else:
                value = (pearsonr if name == "pearson" else spearmanr)(predictions, labels)[0]
        else:
            raise ValueError(f"unknown metric {name}")
        value = float(value)
        out[name] = 0.0 if math.isnan(value) else 100.0 * value
    out["score"] = float(np.mean([out[n] for n in names]))
    return out
