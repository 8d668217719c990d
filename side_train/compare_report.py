"""Reporting a comparison: one record per method, the Table 1-shaped table, compare.csv/json/png."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from side_train.memory import MemoryAccount

LABELS = {"full": "Full fine-tuning", "adapter": "Adapters", "lora": "LoRA", "qlora": "QLoRA (4-bit NF4 + LoRA)", "bitfit": "BitFit", "prompt": "Prompt-tuning",
          "lst-live": "LST (live backbone)", "lst-cached": "LST (from cache)",
          "lst-cached-recompute": "LST (from cache, recompute)"}


@dataclass
class Row:
    """One method's measurements."""

    method: str
    trainable_parameters: int
    backbone_parameters: int
    memory: MemoryAccount
    seconds_per_step: float | None = None
    training: dict = field(default_factory=dict)  # lr, train_seconds, train_loss_last, validation, test
    skipped: str | None = None  # why the method did not run here (e.g. QLoRA without a GPU); nothing measured

    @property
    def share(self) -> float:
        return self.trainable_parameters / self.backbone_parameters if self.backbone_parameters else 0.0


def row_record(row: Row, full_bytes: int | None) -> dict:
    if row.skipped:
        return {"method": row.method, "skipped": row.skipped}
    m = row.memory
    record = {"method": row.method, "trainable_parameters": row.trainable_parameters, "backbone_parameters": row.backbone_parameters,
              "trainable_percent": round(100 * row.share, 4), **m.to_json(),
              "memory_vs_full": round(m.total_bytes / full_bytes, 4) if full_bytes else None,
              "seconds_per_step": None if row.seconds_per_step is None else round(row.seconds_per_step, 4)}
    for split in ("validation", "test"):
        if split in row.training:
            record[f"{split}_score"] = round(row.training[split]["score"], 2)
    if row.training:
        record["train_seconds"] = round(row.training["train_seconds"], 1)
        record["train_loss_last"] = round(row.training["train_loss_last"], 5)
        record["lr"] = row.training["lr"]
    return record


def format_table(records: list[dict], settings: dict) -> str:
    """The shape of the paper's Table 1: method, updated parameters, memory, (score)."""
    gib = 2**30
    cuda = any(r.get("cuda_peak_bytes") is not None for r in records)
    scored = any("test_score" in r for r in records)
    head = ["Method", "Update param. (%)", "Memory (GiB)", "vs full", "Saved (GiB)"]
    head += ["CUDA peak (GiB)"] if cuda else []
    head += ["s/step"] + (["Val.", "Test"] if scored else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("skipped"):
            lines.append("| " + " | ".join([LABELS[r["method"]], f"skipped: {r['skipped']}", *[""] * (len(head) - 2)]) + " |")
            continue
        cells = [LABELS[r["method"]], f"{r['trainable_percent']:.3f}", f"{r['total_bytes'] / gib:.3f}",
                 "" if r["memory_vs_full"] is None else f"{r['memory_vs_full']:.3f}x",
                 f"{(r['saved_bytes'] + r['recompute_bytes']) / gib:.3f}"]
        if cuda:
            cells.append("" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / gib:.3f}")
        cells.append("" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}")
        if scored:
            cells += [f"{r.get('validation_score', float('nan')):.2f}", f"{r.get('test_score', float('nan')):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    where = "meta-device accounting" if settings["memory_on"] == "meta" else f"accounting on {settings['device']}"
    target = f", {settings['target_tokens']} target tokens" if settings["target_tokens"] else ""
    lines.append(f"\n{settings['model']} ({settings['family']}), task {settings['task']}, batch {settings['batch_size']} x "
                 f"{settings['source_tokens']} source tokens{target}; memory: {where}; "
                 f"s/step: batch {settings['time_batch_size']} on {settings['device']}")
    if any(r["method"].startswith("lst") for r in records):
        side = [f"r = {settings['reduction']}", f"dropout {settings.get('dropout', 0.1):g}"]
        side += [name for key, name in (("merge_final", "--merge-final"), ("standardize_ladders", "--standardize-ladders"))
                 if settings.get(key)]
        lines.append("LST side network: " + ", ".join(side))
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Memory (x) against test score (y), or against the updated-parameter share when nothing was trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if not r.get("skipped")]
    scored = all("test_score" in r for r in records)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        x = (r["cuda_peak_bytes"] or r["total_bytes"]) / 2**30
        y = r["test_score"] if scored else r["trainable_percent"]
        ax.scatter([x], [y])
        ax.annotate(LABELS[r["method"]], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("training memory (GiB)")
    ax.set_ylabel("test score" if scored else "updated parameters (%)")
    if not scored:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[Row], settings: dict, out: Path) -> list[dict]:
    """compare.csv, compare.json and compare.png in `out`; returns the records."""
    full = next((r.memory.total_bytes for r in rows if r.method == "full" and not r.skipped), None)
    records = [row_record(r, full) for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(out / "compare.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    (out / "compare.json").write_text(json.dumps({"settings": settings, "methods": records}, indent=1))
    plot(records, out / "compare.png")
    return records
