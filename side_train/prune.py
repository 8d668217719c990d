"""The two steps every family's pruned init (notes §1.8) is made of: rank rows, copy slices.

Rows of each backbone weight are ranked by an importance score and the top 1/r kept, in
ascending index order; the next weight's columns are sliced to match. Each family's
`init_from_backbone` chains these through its blocks (side_train/families/). Scores come per
row (backbone_cache.importance): fisher from the cache's importance.safetensors, magnitude
from |W|. Deliberate difference from the reference: a row's score is its L1 over *all*
columns, not only the kept ones, so scores can be stored per row instead of as a full copy of
the model.
"""

from __future__ import annotations

import torch


def top_rows(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, ascending (ties broken by lower index)."""
    order = torch.argsort(-score.double(), stable=True)[:keep]
    return torch.sort(order).values


def copy_slice(param: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """param <- weight[rows][:, cols] (either index optional), in param's dtype."""
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    with torch.no_grad():
        param.copy_(weight.to(param.dtype))
