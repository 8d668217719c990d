"""Evaluation: candidate scoring (no backbone), class heads, or greedy generation (live)."""

from __future__ import annotations

import numpy as np
import torch

from shared.metrics import compute_metrics
from shared.tasks import TaskSpec
from side_train.data import eval_batches
from side_train.model import LadderSideNetwork


def parse_target(text: str, spec: TaskSpec) -> float:
    """Target string -> label value; anything unparsable is -1 (counted wrong)."""
    try:
        value = float(text.strip())
    except ValueError:
        return -1.0
    if spec.label_kind == "class" and (value != int(value) or not 0 <= value < spec.num_labels):
        return -1.0
    return value


@torch.no_grad()
def predict(model: LadderSideNetwork, source, spec: TaskSpec, device: torch.device, batch_size: int,
            mode: str = "candidates", autocast: bool = False) -> np.ndarray:
    """Predicted label values for every example of a split, in storage order."""
    model.eval()
    predictions = np.zeros(source.num_examples)
    candidates = spec.candidates()
    for rows in eval_batches(source.num_examples, batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if model.cfg.family != "t5":
                batch = source.batch(rows).to(device)
                predictions[rows] = model.predict_classes(batch).float().cpu().numpy()
            elif mode == "generate":
                texts = greedy_generate(model, source, rows, device)
                predictions[rows] = [parse_target(t, spec) for t in texts]
            else:
                batch = source.batch(rows, candidates=True).to(device)
                best = model.score_candidates(batch).argmax(-1).cpu().numpy()
                predictions[rows] = [parse_target(candidates[b], spec) for b in best]
    return predictions


def evaluate(model, source, spec: TaskSpec, device, batch_size: int, mode: str = "candidates", autocast: bool = False) -> dict:
    predictions = predict(model, source, spec, device, batch_size, mode, autocast)
    return compute_metrics(spec.metrics, predictions, source.labels)


@torch.no_grad()
def greedy_generate(model: LadderSideNetwork, source, rows: np.ndarray, device: torch.device, max_new_tokens: int = 8) -> list[str]:
    """Greedy decoding with the live backbone: each step reruns the backbone decoder on the prefix."""
    bb = source.backbone
    if bb is None or bb.family != "t5":
        raise ValueError("greedy generation needs a live T5 backbone")
    from backbone_cache.extract import pad

    plan = source.plan
    ids, mask = pad([plan.source_ids[i] for i in rows], bb.device)
    states, final = bb.encode(ids, mask)
    enc_states = states[:, :, source.enc_positions].to(torch.bfloat16)
    encoded = model.encode(enc_states.to(device), mask.bool().to(device))
    eos = bb.tokenizer.eos_token_id if bb.tokenizer.eos_token_id is not None else bb.tokenizer.sep_token_id
    prefix = torch.full((len(rows), 1), bb.decoder_start_token_id, dtype=torch.long, device=bb.device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=bb.device)
    generated: list[list[int]] = [[] for _ in rows]
    for _ in range(max_new_tokens):
        dec_mask = torch.ones_like(prefix)
        dec_states = bb.decode(prefix, dec_mask, final, mask)[:, :, source.dec_positions].to(torch.bfloat16)
        logits = model.lm_logits(encoded, mask.bool().to(device), dec_states.to(device), dec_mask.bool().to(device))
        next_ids = logits[:, -1].argmax(-1).to(bb.device)
        for b in range(len(rows)):
            if not finished[b]:
                if next_ids[b] == eos:
                    finished[b] = True
                else:
                    generated[b].append(int(next_ids[b]))
        if bool(finished.all()):
            break
        prefix = torch.cat([prefix, next_ids[:, None]], dim=1)
    return [bb.tokenizer.decode(g, skip_special_tokens=True) for g in generated]
