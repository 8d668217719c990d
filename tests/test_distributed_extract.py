"""torchrun extraction: two gloo processes write the same cache as one, and a killed rank resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, SMALL_EXTRACT_ARGS, cache_files

from backbone_cache.extraction import EXIT_AFTER_SHARDS_ENV, PROGRESS
from shared.cache_format import read_manifest


def torchrun_extract(model: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
                     check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m backbone_cache.extract` (gloo on this CPU)."""
    import os

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "backbone_cache.extract", "--model", str(model), "--out", str(out), *SMALL_EXTRACT_ARGS, *extra]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun extract failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def assert_same_cache(ours: Path, reference: Path) -> None:
    mine, theirs = cache_files(ours), cache_files(reference)
    assert sorted(mine) == sorted(theirs)
    differ = [name for name in mine if mine[name] != theirs[name]]
    assert not differ, f"files differ from the one-process cache: {differ[:5]}"


def test_two_processes_write_the_one_process_cache(tiny_t5, small_t5_reference, tmp_path):
    out = tmp_path / "cache"
    proc = torchrun_extract(tiny_t5, out)
    assert proc.stdout.count("cache ready") == 1  # rank 0 alone reports
    manifest = read_manifest(out)
    assert manifest["complete"] and not (out / PROGRESS).exists()
    stacks = [m for split in manifest["splits"].values() for m in split["stacks"].values()]
    assert sum(m["num_shards"] for m in stacks) >= 6  # enough shards for both ranks to write some
    assert_same_cache(out, small_t5_reference)  # every array, parquet table, importance file and the manifest


def test_a_killed_rank_resumes_to_the_same_cache(tiny_t5, small_t5_reference, tmp_path):
    out = tmp_path / "cache"
    killed = torchrun_extract(tiny_t5, out, env={EXIT_AFTER_SHARDS_ENV: "1:1"}, check=False)
    assert killed.returncode != 0
    assert not read_manifest(out)["complete"]
    markers = sorted(p for p in (out / PROGRESS).rglob("*") if p.is_file())
    assert markers, "rank 1 exits after recording its first shard"
    split, stack, index = markers[0].relative_to(out / PROGRESS).parts
    shard = out / split / stack / "hidden" / "c" / index / "0" / "0"
    before = shard.stat().st_mtime_ns
    torchrun_extract(tiny_t5, out)  # the same command again
    assert shard.stat().st_mtime_ns == before, "a recorded shard was written again instead of resumed"
    assert read_manifest(out)["complete"] and not (out / PROGRESS).exists()
    assert_same_cache(out, small_t5_reference)


def test_shards_are_dealt_whole_to_every_rank(tiny_t5, small_t5_reference):
    """The deal of a 3-rank job: every shard not done has exactly one rank, each rank some, done shards none."""
    from backbone_cache.extract import parse_args
    from backbone_cache.extraction import Extraction

    config = parse_args(["--model", str(tiny_t5), "--out", str(small_t5_reference), *SMALL_EXTRACT_ARGS])
    extraction = Extraction(config)
    manifest = read_manifest(small_t5_reference)
    every = {f"{split}/{stack}": meta["num_shards"] for split, s in manifest["splits"].items() for stack, meta in s["stacks"].items()}
    done = {key: set() for key in every}
    done["train/encoder"] = {0, 1}
    work = extraction.assign_shards(manifest, done, 3)
    owners: dict[tuple[str, int], int] = {}
    for rank, splits in enumerate(work):
        assert splits, f"rank {rank} got no shard"
        for split, stacks in splits.items():
            for stack, indices in stacks.items():
                for index in indices:
                    assert (f"{split}/{stack}", index) not in owners, "a shard dealt twice"
                    owners[(f"{split}/{stack}", index)] = rank
    expected = {(key, i) for key, n in every.items() for i in range(n) if i not in done[key]}
    assert set(owners) == expected
