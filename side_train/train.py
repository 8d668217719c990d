"""The training loop: AdamW, warmup then linear decay, clipping, per-epoch evaluation, checkpoints.

No trainer class: `train()` takes a model, data sources and a `TrainConfig`, writes
`metrics.jsonl` and checkpoints into the run folder, and returns the summary figures.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from shared.tasks import TaskSpec
from side_train.checkpoint import load_checkpoint, save_checkpoint
from side_train.data import epoch_batches
from side_train.evaluate import evaluate
from side_train.model import LadderSideNetwork


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 100
    eval_batch_size: int = 100
    lr: float = 3e-3
    warmup_steps: int = 500
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    eval_mode: str = "candidates"  # or "generate" (T5, live backbone)
    save_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    quiet: bool = False


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup for `warmup_steps`, then linear decay to 0 at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    remaining = max(total_steps - step, 0)
    return cfg.lr * remaining / max(total_steps - cfg.warmup_steps, 1)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """CUDA's max_memory_allocated on GPU, the process's peak RSS on CPU (bytes)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak_rss"


def train(
    model: LadderSideNetwork,
    train_source,
    eval_sources: dict,
    spec: TaskSpec,
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
) -> dict:
    """Train, evaluating each epoch; resume from run_dir/checkpoint when it exists."""
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(train_source.lengths, cfg.batch_size, cfg.seed, 0))
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    autocast = device.type == "cuda"
    checkpoint_dir = run_dir / "checkpoint"
    metrics_path = run_dir / "metrics.jsonl"
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "train_seconds": 0.0}
    if (checkpoint_dir / "state.json").is_file():
        progress = load_checkpoint(checkpoint_dir, model, optimizer)
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= progress["step"]]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        if not cfg.quiet:
            print(f"resuming from step {progress['step']} (epoch {progress['epoch']})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log = open(metrics_path, "a", encoding="utf-8")
    step = progress["step"]
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=cfg.quiet, dynamic_ncols=True)
    try:
        for epoch in range(progress["epoch"], cfg.epochs):
            if step >= total_steps:
                break
            model.train()
            batches = epoch_batches(train_source.lengths, cfg.batch_size, cfg.seed, epoch)
            t0, seen = time.perf_counter(), 0
            for index in range(progress["batch"] if epoch == progress["epoch"] else 0, len(batches)):
                if step >= total_steps:
                    break
                lr = lr_at(step, cfg, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = train_source.batch(batches[index]).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = model.loss(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seen += batch.size
                rate = seen / (time.perf_counter() - t0)
                log.write(json.dumps({"type": "train", "step": step, "epoch": epoch, "loss": loss.item(), "lr": lr}) + "\n")
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", ex_s=f"{rate:,.0f}", refresh=False)
                if cfg.save_every and step % cfg.save_every == 0 and index + 1 < len(batches):
                    log.flush()
                    progress.update(epoch=epoch, batch=index + 1, step=step)
                    save_checkpoint(checkpoint_dir, model, optimizer, progress)
            epoch_seconds = time.perf_counter() - t0
            progress["train_seconds"] += epoch_seconds
            results = {name: evaluate(model, source, spec, device, cfg.eval_batch_size, cfg.eval_mode, autocast)
                       for name, source in eval_sources.items()}
            record = {"type": "eval", "step": step, "epoch": epoch, "epoch_seconds": round(epoch_seconds, 3), **results}
            progress["history"].append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if not cfg.quiet:
                shown = ", ".join(f"{k} {v['score']:.2f}" for k, v in results.items())
                tqdm.write(f"epoch {epoch}: {shown}")
            if "validation" not in eval_sources or _is_best(progress["history"]):
                model.save_pretrained(run_dir / "best_side_model")
            progress.update(epoch=epoch + 1, batch=0, step=step)
            save_checkpoint(checkpoint_dir, model, optimizer, progress)
    finally:
        bar.close()
        log.close()
    memory, memory_kind = peak_memory(device)
    return summarize(progress, memory, memory_kind)


def _is_best(history: list[dict]) -> bool:
    """Whether the last epoch has the best validation score so far (first one wins ties)."""
    scores = [h["validation"]["score"] for h in history if "validation" in h]
    return bool(scores) and scores.index(max(scores)) == len(scores) - 1


def summarize(progress: dict, memory: int, memory_kind: str) -> dict:
    history = progress["history"]
    summary = {"steps": progress["step"], "epochs": len(history), "train_seconds": round(progress["train_seconds"], 3),
               "seconds_per_epoch": round(progress["train_seconds"] / max(len(history), 1), 3),
               "peak_memory_bytes": memory, "peak_memory_kind": memory_kind}
    if history:
        last = history[-1]
        summary["validation_last"] = last.get("validation")
        summary["test_last"] = last.get("test")
        with_val = [h for h in history if "validation" in h]
        if with_val:
            best = max(with_val, key=lambda h: h["validation"]["score"])
            summary["best_epoch"] = best["epoch"]
            summary["validation_best"] = best["validation"]
            summary["test_at_best_validation"] = best.get("test")
    return summary


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
