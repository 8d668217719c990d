"""Training-memory accounting that does not depend on the machine.

The peak memory of a training step is, to a close approximation, what stays allocated
across its backward pass:

    parameters + buffers      every tensor the method keeps on the device, frozen or not
    + gradients               one per trainable parameter
    + optimizer state         AdamW's two moment buffers per trainable parameter
    + saved for backward      what autograd keeps from the forward pass
    + inputs                  the batch on the device (for LST-cached: the stored states)
    + recomputation           with activation checkpointing of the side blocks (`--recompute`):
                              the most one block's forward saves, re-made for that block alone
                              while its backward runs (the blocks' inputs are in "saved")

The first three are sums over parameters. The fourth is counted with
`torch.autograd.graph.saved_tensors_hooks`: every tensor packed during the forward pass is
recorded once per storage (views share their base's storage, and a view keeps the whole
storage alive), and storages that are parameters, buffers or inputs are left out since
they are counted above. The count depends only on shapes, dtypes and the autograd graph,
so it is the same on any machine and on PyTorch's `meta` device, where nothing is computed.
Transient workspace (an activation used and freed within the forward) is not counted; on
CUDA `torch.cuda.max_memory_allocated` measures everything, and `compare` reports both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, each the size of the parameter


@dataclass
class MemoryAccount:
    """Bytes per category for one training step (see the module docstring)."""

    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    saved_bytes: int
    input_bytes: int
    saved_storages: int
    recompute_bytes: int = 0
    cuda_peak_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        return (self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.saved_bytes + self.input_bytes
                + self.recompute_bytes)

    def to_json(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}

    @classmethod
    def from_json(cls, data: dict) -> MemoryAccount:
        """The account `to_json` wrote (its derived `total_bytes` dropped)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage (the StorageImpl's address, shared by all its views).

    `data_ptr` cannot serve here: every storage on the meta device has data pointer 0.
    """
    return tensor.untyped_storage()._cdata


def storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """Unique storages of `tensors` -> their size in bytes."""
    return {storage_key(t): t.untyped_storage().nbytes() for t in tensors if t is not None}


def device_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of a module (tied ones once)."""
    return [*module.parameters(), *module.buffers()]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _output_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _output_tensors(item)]
    return []


class SavedTensorCounter:
    """Record what autograd saves for backward inside a `with` block.

    exclude: tensors whose storages are counted elsewhere (parameters, buffers, inputs).
    watch: modules to watch; `saves_inside_watched` counts saves made while any of them (or
    a submodule) runs forward, and `watched_outputs` holds the storages they returned.
    Every recorded tensor is kept alive until the block ends, so that no later tensor can
    reuse a recorded storage's address; nothing is held after it.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), watch: Iterable[nn.Module] = ()):
        self.excluded = set(storage_bytes(exclude))
        self.saved: dict[int, int] = {}  # storage -> bytes
        self.described: dict[int, tuple[tuple[int, ...], str, str]] = {}  # storage -> (shape, dtype, autograd node)
        self.saves_inside_watched = 0
        self.watched_outputs: set[int] = set()
        self._alive: list[torch.Tensor] = []
        self._watch = list(watch)
        self._depth = 0
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed)

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    def largest(self, count: int = 10) -> list[tuple[int, int, tuple]]:
        """The biggest groups of saved storages with the same (shape, dtype, node): (bytes, storages, key)."""
        groups: dict[tuple, list[int]] = {}
        for key, nbytes in self.saved.items():
            groups.setdefault(self.described[key], []).append(nbytes)
        ranked = sorted(((sum(v), len(v), k) for k, v in groups.items()), key=lambda item: -item[0])
        return ranked[:count]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._depth:
            self.saves_inside_watched += 1
        key = storage_key(tensor)
        if key not in self.excluded and key not in self.saved:
            self.saved[key] = tensor.untyped_storage().nbytes()
            node = tensor.grad_fn.name() if tensor.grad_fn is not None else "no grad_fn"
            self.described[key] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), node)
            self._alive.append(tensor)
        # Detached: the same storage and version counter, but no link back to the node that
        # saves it (an output saved with its grad_fn would keep the graph alive in a cycle).
        return tensor.detach()

    def _enter_module(self, _module, _inputs) -> None:
        self._depth += 1

    def _leave_module(self, _module, _inputs, output) -> None:
        self._depth -= 1
        for tensor in _output_tensors(output):
            self.watched_outputs.add(storage_key(tensor))
            self._alive.append(tensor)

    def __enter__(self) -> SavedTensorCounter:
        for root in self._watch:
            for module in root.modules():
                self._handles.append(module.register_forward_pre_hook(self._enter_module))
                self._handles.append(module.register_forward_hook(self._leave_module))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._alive.clear()


def recompute_bytes(network: nn.Module, run_forward: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """The backward-time peak that activation checkpointing adds: the most bytes one side block's
    forward saves (new storages only), counted on a forward run with checkpointing off and the
    RNG forked. 0 when `network` (a SideNetwork) does not recompute.
    """
    stacks = network.ladder_stacks() if hasattr(network, "ladder_stacks") else []
    if not any(stack.recompute for stack in stacks):
        return 0
    counter, starts, block_bytes, handles = SavedTensorCounter(exclude=exclude), [], [], []
    for block in (block for stack in stacks for block in stack.blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, _i: starts.append(counter.saved_bytes)))
        handles.append(block.register_forward_hook(lambda _m, _i, _o: block_bytes.append(counter.saved_bytes - starts.pop())))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        network.set_recompute(False)
        with torch.random.fork_rng(devices=devices), counter:
            run_forward()
    finally:
        network.set_recompute(True)
        for handle in handles:
            handle.remove()
    return max(block_bytes, default=0)


def account(module: nn.Module, inputs: Iterable[torch.Tensor], counter: SavedTensorCounter, recompute: int = 0) -> MemoryAccount:
    """Combine a module's parameter bytes with a finished counter's saved bytes (and `recompute_bytes`)."""
    params = storage_bytes(device_tensors(module))
    gradient_bytes = sum(p.numel() * p.element_size() for p in trainable_parameters(module))
    return MemoryAccount(
        parameter_bytes=sum(params.values()),
        gradient_bytes=gradient_bytes,
        optimizer_bytes=ADAM_MOMENTS * gradient_bytes,
        saved_bytes=counter.saved_bytes,
        input_bytes=sum(storage_bytes(inputs).values()),
        saved_storages=len(counter.saved),
        recompute_bytes=recompute,
    )
