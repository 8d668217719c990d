"""Streaming from disk: the same batches as RAM and live, block shuffle, only the layers used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_one_line_error, run_cli

from shared.cache_format import read_manifest
from side_train.data import block_bounds, epoch_batches
from side_train.run import parse_args, run


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def test_block_shuffle_is_a_deterministic_permutation_by_pools():
    lengths = np.sort(np.random.default_rng(0).integers(3, 90, 5000))[::-1].copy()
    plan = epoch_batches(lengths, 64, seed=3, epoch=1)
    rows = np.concatenate(plan)
    assert np.array_equal(np.sort(rows), np.arange(5000))
    assert all(np.array_equal(a, b) for a, b in zip(plan, epoch_batches(lengths, 64, seed=3, epoch=1)))
    assert not np.array_equal(rows, np.concatenate(epoch_batches(lengths, 64, seed=3, epoch=2)))
    covered = 0
    for first, stop, ranges in plan.pools:
        allowed = np.concatenate([np.arange(a, b) for a, b in ranges])
        assert np.isin(np.concatenate(plan[first:stop]), allowed).all()
        covered += stop - first
    assert covered == len(plan)
    bounds = block_bounds(lengths)
    assert bounds[0] == 0 and bounds[-1] == 5000 and np.all(np.diff(bounds) > 0)
    sizes = [lengths[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    assert max(sizes[:-1]) < 4096 + lengths.max()


@pytest.mark.parametrize("workers", ["inline", "thread", "1"])
def test_disk_tier_gives_the_same_losses_as_ram(t5_cache, tmp_path, workers):
    common = ["--cache", str(t5_cache), "--epochs", "2", "--batch-size", "8", "--warmup-steps", "2", "--quiet"]
    ram = run(parse_args([*common, "--tier", "ram", "--out", str(tmp_path / "ram")]))
    disk = run(parse_args([*common, "--tier", "disk", "--reader", workers, "--out", str(tmp_path / "disk")]))
    assert ram["tier"] == "ram" and disk["tier"] == "disk"
    assert losses(tmp_path / "ram") == losses(tmp_path / "disk")
    assert ram["test_last"] == disk["test_last"]


def test_reader_modes_and_their_defaults(monkeypatch):
    from shared.errors import UserError
    from side_train.recipe import default_reader, reader_mode

    assert [reader_mode(t) for t in ("inline", "Thread", "3")] == ["inline", "thread", 3]
    for bad in ("-1", "0", "fast", "1.5"):
        with pytest.raises(UserError, match="not a reader mode"):
            reader_mode(bad)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_reader(torch.device("cpu")) == "inline"  # the step needs both cores
    assert default_reader(torch.device("cuda")) == "thread"  # the CPU is free while the GPU steps
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_reader(torch.device("cpu")) == 1


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on a lent GPU)")
@pytest.mark.parametrize("workers", ["thread", 1])
def test_streamed_batches_reach_the_gpu_from_pinned_memory(t5_cache, workers):
    from side_train.streaming import StreamingSplit

    manifest = read_manifest(t5_cache)
    split = StreamingSplit(t5_cache, manifest, "train", {"encoder": [0, 1, 2], "decoder": [0, 1, 2]}, workers=workers, pin_memory=True)
    seen = 0
    for _index, batch in split.stream(epoch_batches(split.lengths, 8, 0, 0)):
        assert all(t.is_pinned() for t in batch.states.values())  # pinned by the reader, not the step
        moved = batch.to(torch.device("cuda"))
        assert moved.states["encoder"].is_cuda and torch.equal(moved.states["encoder"].cpu(), batch.states["encoder"])
        assert torch.equal(moved.targets["decoder"].cpu(), batch.targets["decoder"])
        seen += batch.size
    assert seen == split.num_examples


def test_streaming_reads_only_the_layers_used(t5_cache, monkeypatch):
    from side_train import data
    from side_train.streaming import StreamingSplit

    requested = []
    real = data.StackReader.read_tokens

    def spy(self, start, stop, layers=None, out=None):
        requested.append((self.path.name, layers))
        return real(self, start, stop, layers, out)

    monkeypatch.setattr(data.StackReader, "read_tokens", spy)
    manifest = read_manifest(t5_cache)
    split = StreamingSplit(t5_cache, manifest, "train", {"encoder": [2], "decoder": [0]}, workers="thread")  # encoder 0, 3; decoder 0, 1
    batches = list(split.stream(epoch_batches(split.lengths, 8, 0, 0)))
    assert len(batches) == 5 and batches[0][1].states["encoder"].shape[2] == 2
    assert {(name, sl.start, sl.stop) for name, sl in requested} == {("encoder", 0, 1), ("encoder", 3, 4), ("decoder", 0, 2)}
    chunks = zarr.open_array(str(t5_cache / "train" / "encoder" / "hidden"), mode="r").metadata.codecs[0].chunk_shape
    assert chunks[1] == 1  # one layer per inner chunk, so skipped layers are never decoded


def test_gpu_tier_without_a_gpu_is_one_line(t5_cache, tmp_path):
    proc = run_cli("side_train.run", "--cache", str(t5_cache), "--out", str(tmp_path / "r"), "--device", "cpu", "--tier", "gpu",
                   check=False)
    assert_one_line_error(proc, "--tier gpu needs --device cuda")


def test_auto_tier_counts_the_page_cache_the_kernel_can_drop(tmp_path, monkeypatch):
    """auto takes RAM when the states fit in half of MemAvailable (free pages plus reclaimable page cache,
    which a just-extracted cache fills), not half of the free pages alone, and never more than the
    process's cgroup memory limit leaves."""
    from types import SimpleNamespace

    from side_train import recipe

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24683584 kB\nMemFree:         1000 kB\nMemAvailable:   19001168 kB\nCached: 8053256 kB\n")
    nothing = str(tmp_path / "no-cgroup")
    assert recipe.available_host_memory(str(info), nothing) == 19001168 * 1024
    info.write_text("MemTotal:       24683584 kB\nMemFree:         1000 kB\n")  # an old kernel: free pages
    monkeypatch.setattr(recipe.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 5, "SC_PAGE_SIZE": 4096}[name])
    assert recipe.available_host_memory(str(info), nothing) == 5 * 4096
    assert recipe.available_host_memory(str(tmp_path / "missing"), nothing) == 5 * 4096

    # a container's or job's cgroup limit caps it: v2 (limit less usage, inactive page cache given back) and v1
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text("8000000\n")
    (v2 / "job" / "memory.current").write_text("5000000\n")
    (v2 / "job" / "memory.stat").write_text("anon 3000000\ninactive_file 1000000\n")
    (tmp_path / "cg2").write_text("0::/job\n")
    assert recipe.cgroup_available_memory(str(tmp_path / "cg2"), str(v2)) == 4000000
    info.write_text("MemAvailable:   19001168 kB\n")
    assert recipe.available_host_memory(str(info), str(tmp_path / "cg2"), str(v2)) == 4000000
    (v2 / "job" / "memory.max").write_text("max\n")
    assert recipe.cgroup_available_memory(str(tmp_path / "cg2"), str(v2)) is None
    assert recipe.available_host_memory(str(info), str(tmp_path / "cg2"), str(v2)) == 19001168 * 1024
    v1 = tmp_path / "v1" / "memory"  # the group's folder is not visible from inside the namespace: its root is read
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("6000000\n")
    (v1 / "memory.usage_in_bytes").write_text("2000000\n")
    (v1 / "memory.stat").write_text("cache 500\ntotal_inactive_file 500000\n")
    (tmp_path / "cg1").write_text("4:memory:/process_api/abc\n3:cpuset:/\n0::/\n")
    assert recipe.cgroup_available_memory(str(tmp_path / "cg1"), str(tmp_path / "v1")) == 4500000
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert recipe.cgroup_available_memory(str(tmp_path / "cg1"), str(tmp_path / "v1")) is None

    manifest = {"splits": {"train": {"stacks": {"encoder": {"num_tokens": 1000}}}}, "model": {"d_model": 64}}
    cfg = SimpleNamespace(stack_layers=lambda: {"encoder": [0, 1]})
    need = 1000 * 3 * 64 * 2
    assert recipe.state_bytes(manifest, "train", cfg) == need
    monkeypatch.setattr(recipe, "available_host_memory", lambda: 3 * need)
    assert recipe.choose_tier(manifest, cfg, torch.device("cpu")) == "ram"
    monkeypatch.setattr(recipe, "available_host_memory", lambda: 1.5 * need)
    assert recipe.choose_tier(manifest, cfg, torch.device("cpu")) == "disk"
    assert recipe.choose_tier(manifest, cfg, torch.device("cpu"), "ram") == "ram"  # an explicit tier is taken as given
