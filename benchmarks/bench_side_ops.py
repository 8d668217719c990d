"""Micro-benchmark (issue 4): the CPU side-step operations changed on 2026-11-27, old against new,
in one run. Each line times the old way and the new way on the same tensor.

1. dropout mask for 31.5M elements (one T5-base-shaped side step at 32 tokens):
   `torch.rand(n) >= p` against `side_train.model.keep_mask` (PCG64 16-bit draws);
2. applying a mask: `torch.where(keep, x * s, 0)` against `x * keep.view(uint8) * s`,
   on a [100, 32, 384] (in cache) and a [100, 12, 103, 103] (51 MB) tensor;
1 and 2 run with the allocator setting training uses; 3. an elementwise product on the 51 MB tensor with glibc's default allocator against
   `shared.allocator.keep_freed_memory` (run in two subprocesses: the setting is per process);
4. `--precision bf16` on a CPU: the ladder product from the stored bf16 states, through a
   float32 copy against directly in bf16; and the attention-map operations (softmax, bias add,
   the two products) in float32 against bf16 on [100, 12, L, L] maps, L = 32 and 103.

    python benchmarks/bench_side_ops.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch


def best_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def allocator_probe(keep: bool) -> float:
    code = ("import time, torch\n"
            "from shared.allocator import keep_freed_memory\n"
            f"if {keep}: keep_freed_memory()\n"
            "x = torch.randn(100, 12, 103, 103)\n"
            "x * 1.1\n"
            "t = []\n"
            "for _ in range(20):\n"
            "    s = time.perf_counter(); x * 1.1; t.append(time.perf_counter() - s)\n"
            "print(1e3 * min(t))\n")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    from shared.allocator import keep_freed_memory
    from side_train.model import keep_mask

    keep_freed_memory()  # as in training (1 and 2); 3 compares it against the default
    cpu = torch.device("cpu")
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_before": os.getloadavg(), "torch_threads": torch.get_num_threads()}
    n = 31_500_000
    results["mask_torch_rand_ms"] = best_ms(lambda: torch.rand(n) >= 0.1, 5)
    results["mask_keep_mask_ms"] = best_ms(lambda: keep_mask((n,), cpu, 0.1), 5)
    for name, shape in (("small", (100, 32, 384)), ("attention", (100, 12, 103, 103))):
        x = torch.randn(shape)
        keep, scale = keep_mask(shape, cpu, 0.1)
        results[f"apply_{name}_where_ms"] = best_ms(lambda x=x, keep=keep, scale=scale: torch.where(keep, x * scale, 0.0))
        results[f"apply_{name}_uint8_ms"] = best_ms(lambda x=x, keep=keep, scale=scale: x.mul(keep.view(torch.uint8)).mul_(scale))
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        states = torch.randn(100, 48, 10, 768).bfloat16()[:, :, 3]  # one ladder's view of a batch
        weight = torch.randn(96, 768)
        results["ladder_float32_copy_ms"] = best_ms(lambda: torch.nn.functional.linear(states.float(), weight))
        results["ladder_bf16_direct_ms"] = best_ms(lambda: torch.nn.functional.linear(states, weight.bfloat16()))
        for length in (32, 103):
            for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                q = torch.randn(100, 12, length, 8).to(dtype)
                scores = (q @ q.transpose(-2, -1)).softmax(-1)
                bias = torch.randn(1, 12, length, length).to(dtype)
                key = f"maps_L{length}_{tag}"
                results[f"{key}_softmax_ms"] = best_ms(lambda s=scores: s.softmax(-1))
                results[f"{key}_bias_add_ms"] = best_ms(lambda s=scores, b=bias: s.add_(b))
                results[f"{key}_products_ms"] = best_ms(lambda q=q, s=scores: (q @ q.transpose(-2, -1), s @ q))
    results["product_51MB_default_allocator_ms"] = allocator_probe(False)
    results["product_51MB_keep_freed_memory_ms"] = allocator_probe(True)
    results["load_after"] = os.getloadavg()
    results["mask_speedup"] = results["mask_torch_rand_ms"] / results["mask_keep_mask_ms"]
    for name in ("small", "attention"):
        results[f"apply_{name}_speedup"] = results[f"apply_{name}_where_ms"] / results[f"apply_{name}_uint8_ms"]
    if "ladder_bf16_direct_ms" in results:
        results["ladder_bf16_speedup"] = results["ladder_float32_copy_ms"] / results["ladder_bf16_direct_ms"]
        for length in (32, 103):
            for op in ("softmax", "bias_add", "products"):
                results[f"maps_L{length}_{op}_bf16_over_fp32"] = (results[f"maps_L{length}_bf16_{op}_ms"]
                                                                  / results[f"maps_L{length}_fp32_{op}_ms"])
    results["allocator_speedup"] = results["product_51MB_default_allocator_ms"] / results["product_51MB_keep_freed_memory_ms"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
