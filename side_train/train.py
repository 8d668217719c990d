"""The training loop: AdamW, warmup then linear decay, clipping, per-epoch evaluation, checkpoints.

`TrainState` holds one side network's training: optimizer, schedule, RNG stream, log and
checkpoints, with `step()` per batch and `end_epoch()` per epoch. `train_networks()` is the
one training loop: it drives one or many of them over one shared batch stream (a run is a
sweep of one). Each run folder gets `metrics.jsonl` and `checkpoint/`, and the same numbers.
"""

from __future__ import annotations

import json
import math
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.backbones import gpu_has_bf16
from shared.distributed import Ranks, all_gather_objects, all_reduce_sum
from shared.errors import UserError
from shared.tasks import TaskSpec
from side_train.checkpoint import load_checkpoint, save_checkpoint
from side_train.data import Batch, EpochPlan, epoch_batches, iter_batches, rank_plan
from side_train.evaluate import evaluate
from side_train.memory import MemoryAccount, SavedTensorCounter, account, device_tensors, recompute_bytes
from side_train.model import SideNetwork


@dataclass
class TrainConfig:
    epochs: int | None = None  # None: the task's (20 for small tasks, 10 for large ones)
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
    recompute: bool = False  # activation checkpointing of the side blocks (less memory, ~1 more side forward)
    precision: str = "auto"  # side step: "bf16" (autocast), "fp32", or "auto" (bf16 on CUDA, fp32 elsewhere)
    quiet: bool = False


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup for `warmup_steps`, then linear decay to 0 at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    remaining = max(total_steps - step, 0)
    return cfg.lr * remaining / max(total_steps - cfg.warmup_steps, 1)


LOSS_READS_EVERY = 16  # GPU steps whose losses are read from the device together


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the side step runs under bfloat16 autocast (`TrainConfig.precision` on `device`).

    bf16 pays only where it is native: on a CPU with AVX512-BF16 or AMX, on a GPU of compute
    capability 8.0 or more. Elsewhere it is emulated and slower, so `auto` means float32
    there and asking for bf16 is an error."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "bf16":
        return precision == "auto" and device.type == "cuda" and gpu_has_bf16(device)
    if device.type == "cpu" and not cpu_has_bf16():
        raise UserError("--precision bf16: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), "
                        "so bf16 would be slower than float32; use --precision fp32")
    if device.type == "cuda" and not gpu_has_bf16(device):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 units "
                        "(compute capability below 8.0), so bf16 would be emulated; use --precision fp32")
    return True


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def peak_memory(device: torch.device) -> tuple[int, str]:
    """CUDA's max_memory_allocated on GPU, the process's peak RSS on CPU (bytes)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak_rss"


def rng_snapshot(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG state that dropout draws from (CPU, plus CUDA on a GPU)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_restore(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _Loss(torch.nn.Module):
    """The network's training loss as a forward pass, the call DistributedDataParallel wraps."""

    def __init__(self, model: SideNetwork):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model.loss(batch)


class _NoLog:
    """metrics.jsonl on ranks other than 0: written nowhere."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TrainState:
    """One side network in training: AdamW, LR schedule, its own RNG stream, metrics log, checkpoints.

    Created after the model is seeded (see recipe.build_side_network); resumes from
    run_dir/checkpoint when it exists. The global RNG is swapped to this network's stream
    around each step and checkpoint, so several states can share one process and still
    draw the dropout masks a lone run would draw.

    With `ranks` of a torchrun job (data parallel), the network is wrapped in
    DistributedDataParallel: each rank steps on its share of every global batch of
    `batch_size x world_size` examples, each rank's mean loss weighted by its share of the
    loss's terms so the averaged gradient is the global batch's; rank 0 alone writes the
    metrics, checkpoints and models, and every rank resumes from rank 0's checkpoint.

    With `run_dir` None nothing is written or resumed: compare trains its methods' modules
    this way (any module with `loss(batch)`; the caller evaluates it after training).
    """

    def __init__(self, model: SideNetwork | torch.nn.Module, lengths, spec: TaskSpec, cfg: TrainConfig,
                 run_dir: Path | None, device: torch.device, track_memory: bool = False, ranks: Ranks | None = None):
        self.model, self.spec, self.cfg, self.device = model, spec, cfg, device
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.lengths = lengths
        self.ranks = ranks or Ranks()
        self.world = self.ranks.world_size if self.ranks.distributed else 1
        self.writes = self.ranks.is_main and self.run_dir is not None  # rank 0 alone writes the run folder
        self.global_batch = cfg.batch_size * self.world
        model.to(device)
        if isinstance(model, SideNetwork):
            model.set_recompute(cfg.recompute)
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # built before the checkpoint is loaded; it broadcasts rank 0's initial weights (all ranks seed alike)
            self.ddp = DistributedDataParallel(_Loss(model), device_ids=[device.index] if device.type == "cuda" else None,
                                               forward_sync_buffers=False)  # buffers are alike on every rank
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters (4x faster than the per-parameter loop on a CPU)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                           fused=device.type in ("cpu", "cuda"))
        # the block-shuffled sampler's batch count can differ between epochs: count each one
        epochs_steps = sum(len(epoch_batches(lengths, self.global_batch, cfg.seed, e)) for e in range(cfg.epochs))
        self.total_steps = epochs_steps if cfg.max_steps is None else min(cfg.max_steps, epochs_steps)
        self.autocast = uses_bf16(cfg.precision, device)
        folder = self.run_dir or Path(".")
        self.checkpoint_dir = folder / "checkpoint"
        self.metrics_path = folder / "metrics.jsonl"
        self.progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "train_seconds": 0.0}
        self.resumed = self.run_dir is not None and (self.checkpoint_dir / "state.json").is_file()
        if self.resumed:
            self.progress = load_checkpoint(self.checkpoint_dir, model, self.optimizer)
            if self.writes:
                kept = [line for line in self.metrics_path.read_text().splitlines()
                        if json.loads(line)["step"] <= self.progress["step"]]
                self.metrics_path.write_text("".join(line + "\n" for line in kept))
        if self.world > 1:
            seen = all_gather_objects(self.progress["step"])
            if len(set(seen)) > 1:
                raise UserError(f"the ranks found different checkpoints in {self.run_dir} (steps {seen}); "
                                "--out must be a folder every rank sees (a shared file system)")
        self.rng = rng_snapshot(device)
        self.step_count = self.progress["step"]
        self.track_memory = track_memory
        # the largest step's account (track_memory; see side_train.memory), kept in the checkpoint's progress
        # so a resumed run still reports the largest step of the whole run
        stored = self.progress.pop("training_memory", None)
        self.memory: MemoryAccount | None = MemoryAccount.from_json(stored) if stored and track_memory else None
        self.log = open(self.metrics_path, "a", encoding="utf-8") if self.writes else _NoLog()
        # on a GPU, reading a step's loss waits for the step: losses are read LOSS_READS_EVERY
        # steps at a time, so the host queues the next steps while the GPU runs (a caller that
        # times each step, like a sweep, sets this to 1)
        self.loss_reads_every = LOSS_READS_EVERY if device.type == "cuda" else 1
        self.pending: list[tuple[dict, torch.Tensor]] = []  # train records whose loss is still on the device
        self.last_loss = float("nan")

    @contextmanager
    def own_rng(self):
        """Run with this network's RNG stream as the global one; keep where it ends."""
        outer = rng_snapshot(self.device)
        rng_restore(self.rng, self.device)
        try:
            yield
        finally:
            self.rng = rng_snapshot(self.device)
            rng_restore(outer, self.device)

    @property
    def done(self) -> bool:
        return self.step_count >= self.total_steps

    def batches(self, epoch: int) -> EpochPlan:
        """This rank's batches of an epoch (with one rank: the epoch's batches)."""
        plan = epoch_batches(self.lengths, self.global_batch, self.cfg.seed, epoch)
        return rank_plan(plan, self.ranks.rank, self.world) if self.world > 1 else plan

    def first_batch(self, epoch: int) -> int:
        """Where this epoch starts: past the batches a mid-epoch checkpoint already covers."""
        return self.progress["batch"] if epoch == self.progress["epoch"] else 0

    def trains_in(self, epoch: int) -> bool:
        """Whether `epoch` runs for this network (asked at the epoch's start)."""
        return self.progress["epoch"] <= epoch < self.cfg.epochs and not self.done

    def step(self, batch: Batch, epoch: int, index: int, num_batches: int, weightless: bool = False) -> float:
        """One optimizer step on `batch` (already on the device; data parallel: this rank's share,
        `weightless` when it holds another rank's rows only); returns the last loss read from
        the device (on a GPU up to LOSS_READS_EVERY - 1 steps old; nan before the first read)."""
        cfg = self.cfg
        lr = lr_at(self.step_count, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.model.training:
            self.model.train()
        with self.own_rng():
            loss = self._parallel_backward(batch, weightless) if self.ddp is not None else self._backward(batch)
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
            self.pending.append(({"type": "train", "step": self.step_count, "epoch": epoch, "loss": None, "lr": lr}, loss.detach()))
            if len(self.pending) >= self.loss_reads_every:
                self.write_losses()
            if cfg.save_every and self.step_count % cfg.save_every == 0 and index + 1 < num_batches:
                self.write_losses()
                self.log.flush()
                self.progress.update(epoch=epoch, batch=index + 1, step=self.step_count)
                if self.writes:
                    save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.saved_progress())
        return self.last_loss

    def _backward(self, batch: Batch) -> torch.Tensor:
        """The step's forward and backward in one process; returns the loss."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.track_memory:
                inputs = batch.tensors()
                with SavedTensorCounter(exclude=[*device_tensors(self.model), *inputs]) as counter:
                    loss = self.model.loss(batch)
                step_memory = account(self.model, inputs, counter)
            else:
                loss = self.model.loss(batch)
        loss.backward()
        # the extra forward that counts recomputation, only for a batch that may be the largest,
        # and after backward, so its graph never sits beside the step's on the device
        if self.track_memory and (self.memory is None
                                  or step_memory.total_bytes > self.memory.total_bytes - self.memory.recompute_bytes):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                step_memory.recompute_bytes = recompute_bytes(self.model, lambda: self.model.loss(batch),
                                                              [*device_tensors(self.model), *inputs])
            if self.memory is None or step_memory.total_bytes > self.memory.total_bytes:
                self.memory = step_memory
        return loss

    def _parallel_backward(self, batch: Batch, weightless: bool) -> torch.Tensor:
        """The step's forward and backward on this rank's share; returns the global batch's loss.

        Each rank's loss is its family's mean over its share; scaled by world x (its terms / the
        global batch's terms) before DistributedDataParallel averages the gradients, the average
        is the gradient of the global batch's mean, as one process would compute it. Dropout
        masks come from a per-rank seed drawn from the shared RNG stream, so ranks draw different
        masks and a resumed run draws the same ones (with dropout the masks differ from a one-process
        run's; without it the losses agree to float rounding)."""
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from the stream every rank shares
        shared = rng_snapshot(self.device)
        own = int(np.random.SeedSequence([seed, self.ranks.rank]).generate_state(1, np.uint64)[0] >> 1)
        torch.random.default_generator.manual_seed(own)
        if self.device.type == "cuda":
            torch.cuda.default_generators[self.device.index].manual_seed(own)  # this rank's GPU only
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.ddp(batch)
            weight = torch.zeros((), dtype=torch.float64, device=self.device) if weightless else \
                torch.as_tensor(self.model.loss_weight(batch), dtype=torch.float64, device=self.device)
            totals = all_reduce_sum(torch.stack([weight, weight * loss.detach().double()]))
            terms = totals[0].clamp(min=1)  # a step with no loss terms on any rank (e.g. no response tokens) adds zero
            (loss * (weight * self.world / terms).to(loss.dtype)).backward()
        finally:
            rng_restore(shared, self.device)
        return (totals[1] / terms).float()

    def write_losses(self) -> None:
        """Read the pending steps' losses from the device (one wait) and log them."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []  # taken first: an interrupted write never repeats a line
        values = torch.stack([loss for _, loss in pending]).float().tolist()
        for (record, _), value in zip(pending, values, strict=True):
            record["loss"] = value
            self.log.write(json.dumps(record) + "\n")
        self.last_loss = values[-1]

    def end_epoch(self, epoch: int, epoch_seconds: float, eval_sources: dict) -> dict:
        """Evaluate, log, keep the best model, checkpoint; returns the eval record."""
        self.write_losses()
        self.progress["train_seconds"] += epoch_seconds
        results = {name: evaluate(self.model, source, self.spec, self.device, self.cfg.eval_batch_size, self.cfg.eval_mode,
                                  self.autocast, self.ranks if self.world > 1 else None)
                   for name, source in eval_sources.items()}
        record = {"type": "eval", "step": self.step_count, "epoch": epoch, "epoch_seconds": round(epoch_seconds, 3), **results}
        self.progress["history"].append(record)
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        if self.writes and ("validation" not in eval_sources or _is_best(self.progress["history"])):
            self.model.save_pretrained(self.run_dir / "best_side_model")
        self.progress.update(epoch=epoch + 1, batch=0, step=self.step_count)
        if self.writes:
            with self.own_rng():
                save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.saved_progress())
        return record

    def saved_progress(self) -> dict:
        """The progress a checkpoint stores: with memory tracked, the largest step's account so far."""
        if self.memory is None:
            return self.progress
        return {**self.progress, "training_memory": self.memory.to_json()}

    def summary(self) -> dict:
        memory, memory_kind = peak_memory(self.device)
        return summarize(self.progress, memory, memory_kind)

    def close(self) -> None:
        try:
            self.write_losses()
        except RuntimeError:  # the device failed: the error that did it is already on its way up
            pass
        self.log.close()


@dataclass
class Trainee:
    """One network of a training loop: its state, where its states sit in the shared batches,
    and the sources it is evaluated on."""

    name: str
    state: TrainState
    positions: dict[str, list[int] | None] = field(default_factory=dict)  # per stack (None or missing: all)
    evals: dict = field(default_factory=dict)  # split -> source of batches for this network
    seconds: float = 0.0  # its share of the training time, evaluation included


def train_networks(trainees: list[Trainee], train_source, device: torch.device, label: str = "train",
                   quiet: bool = False) -> None:
    """The training loop: every trainee steps on each batch of one shared stream, each with its own
    optimizer, schedule, dropout RNG, evaluation and checkpoints. The trainees share batch size and
    seed (which fix the data order). With one trainee this is a plain training run; with several,
    each step is timed alone (its loss read at once), so each network gets its own seconds."""
    timed = len(trainees) > 1
    quiet = quiet or not trainees[0].state.writes  # data parallel: rank 0 shows the progress
    say = (lambda text: None) if quiet else tqdm.write
    for t in trainees:
        if timed:
            t.state.loss_reads_every = 1  # each step is timed: wait for it
        if t.state.resumed:
            say(f"{t.name + ': ' if timed else ''}resuming from step {t.state.progress['step']} (epoch {t.state.progress['epoch']})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch_size, seed = trainees[0].state.cfg.batch_size, trainees[0].state.cfg.seed
    if any((t.state.cfg.batch_size, t.state.cfg.seed, t.state.ranks) != (batch_size, seed, trainees[0].state.ranks)
           for t in trainees):
        raise ValueError("networks trained on one batch stream must share batch size, seed and ranks")
    remaining = sum(t.state.total_steps - t.state.step_count for t in trainees)
    bar = tqdm(total=remaining, desc=label, unit="step", disable=quiet, dynamic_ncols=True)
    try:
        first = min(t.state.progress["epoch"] for t in trainees)
        for epoch in range(first, max(t.state.cfg.epochs for t in trainees)):
            running = [t for t in trainees if t.state.trains_in(epoch)]
            if not running:
                continue
            batches = running[0].state.batches(epoch)  # data parallel: this rank's share of each global batch
            starts = {t.name: t.state.first_batch(epoch) for t in running}
            seconds = dict.fromkeys(starts, 0.0)
            t0 = epoch_start = time.perf_counter()
            seen = 0
            for index, batch in iter_batches(train_source, batches, min(starts.values())):
                stepping = [t for t in running if index >= starts[t.name] and not t.state.done]
                if not stepping:
                    if all(t.state.done for t in running):
                        break
                    t0 = time.perf_counter()
                    continue
                batch = batch.to(device)
                read_share = (time.perf_counter() - t0) / len(stepping)  # waiting for the batch, shared
                for t in stepping:
                    t1 = time.perf_counter()
                    own = batch.select(t.positions) if t.positions else batch
                    loss = t.state.step(own, epoch, index, len(batches), index in batches.weightless)
                    seconds[t.name] += time.perf_counter() - t1 + read_share
                    bar.update(1)
                seen += batch.size * running[0].state.world
                shown = {} if math.isnan(loss) else {"loss": f"{loss:.4f}"}  # nan: not read from the GPU yet
                bar.set_postfix(epoch=epoch, **shown, ex_s=f"{seen / (time.perf_counter() - epoch_start):,.0f}", refresh=False)
                t0 = time.perf_counter()
            for t in running:
                if not timed:  # the epoch's time includes waiting for its last steps
                    t.state.write_losses()
                    seconds[t.name] = time.perf_counter() - epoch_start
                t2 = time.perf_counter()
                record = t.state.end_epoch(epoch, seconds[t.name], t.evals)
                t.seconds += seconds[t.name] + time.perf_counter() - t2
                shown = ", ".join(f"{k} {v['score']:.2f}" for k, v in record.items() if isinstance(v, dict))
                say(f"{t.name + ' ' if timed else ''}epoch {epoch}: {shown}")
    finally:
        bar.close()
        for t in trainees:
            t.state.close()


def epochs_for_steps(lengths, batch_size: int, seed: int, steps: int) -> int:
    """How many epochs of side_train.data.epoch_batches hold `steps` steps (at least one)."""
    epochs, covered = 0, 0
    while covered < steps or epochs == 0:
        covered += len(epoch_batches(lengths, batch_size, seed, epochs))
        epochs += 1
    return epochs


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


def config_dict(cfg: TrainConfig, device: torch.device | None = None) -> dict:
    """The settings that define a run (what a resumed run must repeat); `quiet` is not one.
    With `device`: also the dtype the side step runs in there (`--precision auto` differs by
    device, so a run is not resumed on a device that would change its arithmetic)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "quiet"}
    if device is not None:
        settings["step_dtype"] = "bfloat16" if uses_bf16(cfg.precision, device) else "float32"
    return settings
