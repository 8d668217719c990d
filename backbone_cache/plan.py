"""The extraction plan: tokenized examples in storage order, batches, offsets.

Examples are stored sorted by the length of their primary stack (longest first, stable),
so batches are length-bucketed and a batch's tokens are one contiguous range of every
stack. Per-candidate stacks hold K sequences per example, example-major. The plan depends
only on the data and the flags, so a resumed run replays exactly the same batches and
writes the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from shared.errors import UserError
from shared.families import FAMILIES, Backbone, StackSpec
from shared.tasks import Example, TaskSpec
from shared.tokens import TokenBatch, pad_stack


@dataclass
class SplitPlan:
    """One split, tokenized and ordered for storage."""

    name: str
    examples: list[Example]  # storage order
    stacks: list[StackSpec]
    inputs: dict[str, dict[str, list[list[int]]]]  # stack -> id arrays, one sequence per stored sequence
    batches: list[range] = field(default_factory=list)
    offsets: dict[str, np.ndarray] = field(default_factory=dict)  # per stack
    dataset_index: np.ndarray | None = None  # position of each stored example in the split

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def per_example(self, stack: str) -> int:
        """Sequences per example in `stack` (1, or K for a per-candidate stack)."""
        return (len(self.offsets[stack]) - 1) // self.num_examples

    def sequences(self, stack: str, rows: np.ndarray | range) -> np.ndarray:
        """The stored sequence indices of `rows` in `stack` (example-major for per-candidate stacks)."""
        rows, k = np.asarray(rows, dtype=np.int64), self.per_example(stack)
        return rows if k == 1 else (rows[:, None] * k + np.arange(k)[None, :]).reshape(-1)

    def token_batch(self, rows: np.ndarray | range, device: torch.device, stacks: list[str] | None = None) -> TokenBatch:
        """The padded ids of `rows` for `stacks` (default: every stack), on `device`."""
        out: TokenBatch = {}
        for stack in stacks or list(self.inputs):
            sequences = self.sequences(stack, rows)
            out[stack] = pad_stack({name: [values[i] for i in sequences] for name, values in self.inputs[stack].items()}, device)
        return out

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example's primary stack, in storage order."""
        return np.diff(self.offsets[self.stacks[0].name])


def offsets_from_lengths(lengths: list[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


def plan_split(name: str, examples: list[Example], spec: TaskSpec, backbone: Backbone, max_length: int, max_target_length: int,
               batch_size: int, with_candidates: bool) -> SplitPlan:
    """Tokenize a split, order it longest first, and cut it into batches."""
    if not examples:
        raise UserError(f"split {name!r} holds no examples; check the data or --limit")
    if spec.label_kind not in backbone.label_kinds:
        able = [name for name, family in FAMILIES.items() if spec.label_kind in family.label_kinds]
        raise UserError(f"the {backbone.family} family trains {', '.join(backbone.label_kinds)} tasks, not "
                        f"{spec.label_kind!r} ones; use a backbone of the {' or '.join(able) or 'no'} family")
    if (spec.prompt or spec.label_words) and not backbone.takes_prompts:
        flag = "--prompt" if spec.prompt else "--label-words"
        able = [name for name, family in FAMILIES.items() if family.takes_prompts]
        raise UserError(f"the {backbone.family} family reads no prompt template: drop {flag} (it is for the "
                        f"{' and '.join(able)} family)")
    stacks = backbone.stacks(with_candidates)
    tokens = backbone.tokenize(examples, spec, max_length, max_target_length)
    primary = stacks[0].name
    lengths = np.array([len(ids) for ids in tokens[primary]["input_ids"]])
    if lengths.min() == 0:
        raise UserError(f"split {name!r} has an example with no tokens; drop empty texts")
    order = np.argsort(-lengths, kind="stable")
    inputs = {stack: {k: [v[i] for i in order] for k, v in arrays.items()} for stack, arrays in tokens.items()}
    if with_candidates:
        for stack, arrays in backbone.candidate_inputs(spec, max_target_length).items():
            inputs[stack] = {k: v * len(order) for k, v in arrays.items()}
    plan = SplitPlan(name=name, examples=[examples[i] for i in order], stacks=stacks, inputs=inputs,
                     dataset_index=order.astype(np.int64))
    plan.batches = [range(s, min(s + batch_size, len(order))) for s in range(0, len(order), batch_size)]
    plan.offsets = {s.name: offsets_from_lengths([len(x) for x in inputs[s.name]["input_ids"]]) for s in stacks}
    return plan
