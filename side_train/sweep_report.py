"""Reporting a sweep: runs.csv, results.csv/.md (mean ± std over seeds) and the paper-style plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from side_train.runs import Member
from side_train.sweep_plan import SIZE_OPTIONS, option_value


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def metric_names(metrics: list[str]) -> list[str]:
    return [*metrics, "score"] if len(metrics) > 1 else list(metrics)


def member_rows(members: list[Member], metrics: list[str]) -> list[dict]:
    """One row per finished member, from its summary.json; every option the sweep varies as a column."""
    keys = list(dict.fromkeys(k for m in members for k in m.overrides if k != "seed"))
    rows = []
    for m in members:
        path = m.run_dir / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        options = {k: m.overrides.get(k, str(option_value(m.config, k))) for k in keys}
        best = bool(s.get("validation_best"))
        row = {"name": m.name, "config": "_".join(f"{k}={v}" for k, v in options.items()) or "base", **options,
               "seed": m.train_cfg.seed, "trainable_parameters": s["trainable_parameters"],
               "trainable_share_pct": 100 * s["trainable_share"],
               "training_memory_mib": s["training_memory_bytes"] / 2**20 if s.get("training_memory_bytes") else None,
               "train_seconds": s["train_seconds"], "epochs": s["epochs"], "steps": s["steps"]}
        for name in metric_names(metrics):
            row[f"validation_{name}"] = (s.get("validation_best" if best else "validation_last") or {}).get(name)
            row[f"test_{name}"] = (s.get("test_at_best_validation" if best else "test_last") or {}).get(name)
        rows.append(row)
    return rows


def aggregate(rows: list[dict], metrics: list[str], option_keys: list[str]) -> list[dict]:
    """One row per configuration (options other than the seed): mean and sample standard deviation over seeds."""
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)
    out = []
    for config, group in by_config.items():
        first = group[0]
        agg = {"config": config, **{k: first[k] for k in option_keys}, "seeds": len(group),
               "trainable_parameters": first["trainable_parameters"], "trainable_share_pct": first["trainable_share_pct"],
               "training_memory_mib": _mean([r["training_memory_mib"] for r in group]),
               "train_seconds": float(np.mean([r["train_seconds"] for r in group]))}
        for split in ("validation", "test"):
            for name in metric_names(metrics):
                values = [r[f"{split}_{name}"] for r in group if r.get(f"{split}_{name}") is not None]
                agg[f"{split}_{name}_mean"] = float(np.mean(values)) if values else None
                agg[f"{split}_{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out.append(agg)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(configs: list[dict], metrics: list[str]) -> str:
    def pm(row: dict, key: str) -> str:
        mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
        if mean is None:
            return "-"
        return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"

    names = metric_names(metrics)
    head = ["configuration", "seeds", "trainable params", "share", "training memory", "train time"]
    head += [f"validation {n}" for n in names] + [f"test {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in configs:
        cells = [r["config"], str(r["seeds"]), f"{r['trainable_parameters']:,}", f"{r['trainable_share_pct']:.3f}%",
                 "-" if r["training_memory_mib"] is None else f"{r['training_memory_mib']:,.1f} MiB", f"{r['train_seconds']:,.1f} s"]
        cells += [pm(r, f"validation_{n}") for n in names] + [pm(r, f"test_{n}") for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TABLE_NOTE = ("Mean ± sample standard deviation over seeds (no ± with one seed). Validation: the best epoch; "
              "test: at the best validation epoch. Training memory: parameters, buffers, gradients, AdamW state, the batch "
              "and what autograd saves, in the largest step (side_train.memory). Train time: the network's own steps plus "
              "its share of batch reads.\n\n")


def write_results(out: Path, members: list[Member], metrics: list[str]) -> list[dict]:
    """runs.csv (one row per run), results.csv/.md (one row per configuration), two PNG plots."""
    rows = member_rows(members, metrics)
    if not rows:
        return []
    option_keys = [k for k in rows[0] if k in {k for m in members for k in m.overrides} and k != "seed"]
    configs = aggregate(rows, metrics, option_keys)
    write_csv(out / "runs.csv", rows)
    write_csv(out / "results.csv", configs)
    (out / "results.md").write_text(TABLE_NOTE + markdown_table(configs, metrics))
    plot_results(out, configs, metrics, option_keys)
    return configs


def plot_results(out: Path, configs: list[dict], metrics: list[str], option_keys: list[str]) -> None:
    """metric_vs_parameters.png and metric_vs_memory.png, after the paper's Figures 5 and 6.

    Configurations that differ only in size (reduction, drop_layers, side_layers) form one
    line; every other option that varies starts a new line. Error bars: std over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    key = "score" if len(metrics) > 1 else metrics[0]
    y_label = "test score (mean of the metrics)" if len(metrics) > 1 else f"test {key}"
    varying = [k for k in option_keys if len({str(c[k]) for c in configs}) > 1]
    size_keys = [k for k in varying if k in SIZE_OPTIONS]
    series: dict[str, list[dict]] = {}
    for c in configs:
        series.setdefault(", ".join(f"{k}={c[k]}" for k in varying if k not in SIZE_OPTIONS) or "LST", []).append(c)
    for x_key, x_label, filename, log in (
        ("trainable_share_pct", "trainable parameters (% of the backbone)", "metric_vs_parameters.png", True),
        ("training_memory_mib", "training memory (MiB)", "metric_vs_memory.png", False),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, points in series.items():
            points = sorted((p for p in points if p[f"test_{key}_mean"] is not None and p[x_key] is not None), key=lambda p: p[x_key])
            if not points:
                continue
            xs, ys = [p[x_key] for p in points], [p[f"test_{key}_mean"] for p in points]
            ax.errorbar(xs, ys, yerr=[p[f"test_{key}_std"] or 0.0 for p in points], marker="o", capsize=3, label=name)
            for p, x, y in zip(points, xs, ys, strict=True):
                tag = ", ".join(f"{k}={p[k]}" for k in size_keys) if size_keys else p["config"]
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if log:
            ax.set_xscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.set_title(f"{y_label} vs {x_label.split(' (')[0]}")
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)
