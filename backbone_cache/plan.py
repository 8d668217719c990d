"""The extraction plan: tokenized examples in storage order, batches, offsets.

Examples are stored sorted by source length (longest first, stable), so batches are
length-bucketed and a batch's tokens are one contiguous range of every stack. The plan
depends only on the data and the flags, so a resumed run replays exactly the same
batches and writes the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.backbones import Backbone
from shared.errors import UserError
from shared.tasks import Example, TaskSpec


@dataclass
class SplitPlan:
    """One split, tokenized and ordered for storage."""

    name: str
    examples: list[Example]  # storage order
    source_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    target_ids: list[list[int]] | None = None  # T5 only
    batches: list[range] = field(default_factory=list)
    offsets: dict[str, np.ndarray] = field(default_factory=dict)  # per stack
    dataset_index: np.ndarray | None = None  # position of each stored example in the split

    @property
    def num_examples(self) -> int:
        return len(self.examples)


def offsets_from_lengths(lengths: list[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


def plan_split(
    name: str,
    examples: list[Example],
    spec: TaskSpec,
    backbone: Backbone,
    max_length: int,
    max_target_length: int,
    batch_size: int,
    candidate_ids: list[list[int]] | None,
) -> SplitPlan:
    """Tokenize a split, order it longest first, and cut it into batches."""
    if not examples:
        raise UserError(f"split {name!r} holds no examples; check the data or --limit")
    texts = [ex.texts for ex in examples]
    sources = [spec.source_text(ex) for ex in examples]
    tokens = backbone.tokenize_sources(texts, sources, max_length)
    lengths = np.array([len(ids) for ids in tokens["input_ids"]])
    if lengths.min() == 0:
        raise UserError(f"split {name!r} has an example with no tokens; drop empty texts")
    order = np.argsort(-lengths, kind="stable")
    plan = SplitPlan(
        name=name,
        examples=[examples[i] for i in order],
        source_ids=[tokens["input_ids"][i] for i in order],
        token_type_ids=[tokens["token_type_ids"][i] for i in order] if "token_type_ids" in tokens else None,
        dataset_index=order.astype(np.int64),
    )
    plan.batches = [range(s, min(s + batch_size, len(order))) for s in range(0, len(order), batch_size)]
    plan.offsets["encoder"] = offsets_from_lengths(lengths[order])
    if backbone.family == "t5":
        targets = [spec.target_text(ex.label) for ex in plan.examples]
        plan.target_ids = backbone.tokenize_targets(targets, max_target_length)
        plan.offsets["decoder"] = offsets_from_lengths([len(t) for t in plan.target_ids])
        if candidate_ids is not None:
            per_example = [len(c) for c in candidate_ids]
            plan.offsets["candidates"] = offsets_from_lengths(per_example * len(order))
    return plan
