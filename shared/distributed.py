"""torch.distributed under torchrun: which process this is, and the few collectives both phases use.

Without torchrun (no WORLD_SIZE in the environment, or 1) everything here is a no-op for a
single process, so library code calls these functions unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.errors import UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def ranks() -> Ranks:
    """The ranks torchrun gave this process (0 of 1 when not launched by torchrun)."""
    world = _env_int("WORLD_SIZE", 1)
    return Ranks(rank=_env_int("RANK", 0), world_size=world, local_rank=_env_int("LOCAL_RANK", 0))


def setup(device: str = "auto") -> Ranks:
    """Join the process group when launched by torchrun (NCCL beside CUDA GPUs, gloo otherwise); idempotent."""
    r = ranks()
    if r.distributed and not dist.is_initialized():
        on_cuda = torch.cuda.is_available() and not device.startswith("cpu")
        if on_cuda:
            torch.cuda.set_device(r.local_rank)
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return r


def rank_device(device: str, r: Ranks) -> str:
    """`cuda:LOCAL_RANK` for a distributed job on GPUs; the requested device otherwise."""
    if r.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{r.local_rank}"
    return device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (the object itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj, group=None) -> list:
    """Every rank's `obj`, in rank order, over `group` (default: the whole job; [obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- data-parallel training and spread sweeps (side_train) -----------------------------------


def local_world_size() -> int:
    """Processes torchrun started on this node (LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(_env_int("LOCAL_WORLD_SIZE", 1), 1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every rank, in place (itself without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def patient_group(hours: float = 72.0):
    """A gloo group with a long timeout, for waits whose length is the slowest rank's whole work (`all_gather_objects(obj, group)`)
    (a sweep's ranks finish their members at different times); None without a process group.
    Every rank must call it, in the same order."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from datetime import timedelta

    return dist.new_group(backend="gloo", timeout=timedelta(hours=hours))


def check_devices(device: str, r: Ranks) -> None:
    """One-line errors for device settings a job of several ranks cannot use."""
    if not r.distributed:
        return
    if device.startswith("cuda:"):
        raise UserError(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; use --device cuda or auto")
    if device in ("auto", "cuda") and torch.cuda.is_available() and r.local_rank >= torch.cuda.device_count():
        raise UserError(f"rank {r.rank} has LOCAL_RANK {r.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                        "start at most one process per GPU (--nproc-per-node)")
