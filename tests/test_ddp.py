"""Data-parallel training and spread sweeps under torchrun: 2 local processes with gloo.

Each torchrun launch pays a few seconds of imports per process, so the launches are few: one
DDP run killed mid-run (rank 1 SIGKILLs itself after a step) and resumed, checked against one
process with the same global batch; one sweep spread over 2 ranks, checked against one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from shared.errors import UserError
from side_train.data import epoch_batches, rank_plan, rank_share, row_runs, share_bounds

# rank 1 of the killed launch dies by SIGKILL right after this optimizer step (a checkpoint is made every 2)
KILL_AFTER_STEP = 7
KILLER = f"""
import os
if os.environ.get("RANK") == "1" and os.environ.get("LST_TEST_KILL") == "1":
    import signal
    import side_train.train as train

    step = train.TrainState.step

    def dying_step(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        if self.step_count == {KILL_AFTER_STEP}:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    train.TrainState.step = dying_step
"""
# the one-process run: batch 8; the DDP run: 4 per rank on 2 ranks, from the disk tier
FLAGS = ["--epochs", "2", "--warmup-steps", "2", "--dropout", "0", "--save-every", "2", "--eval-batch-size", "16"]


def torchrun(module: str, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m module args` from the repo root."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@contextmanager
def one_thread():
    """One intra-op thread, as torchrun gives each worker (and steadier on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"} for line in path.read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(t5_cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-rank run killed after step 7, then the same command again: it resumes from step 6."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(KILLER)
    out = root / "run"
    flags = ["--cache", str(t5_cache), "--out", str(out), "--batch-size", "4", "--tier", "disk", *FLAGS]
    path = os.pathsep.join([str(root / "site"), os.environ.get("PYTHONPATH", "")])
    killed = torchrun("side_train.run", *flags, "--quiet", env={"LST_TEST_KILL": "1", "PYTHONPATH": path})
    assert killed.returncode != 0, "rank 1 was to be killed"
    assert not (out / "summary.json").exists()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["progress"]["step"] == 6
    resumed = torchrun("side_train.run", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, resumed


def test_killed_ddp_run_resumes_from_rank_0s_checkpoint(ddp_run):
    out, resumed = ddp_run
    assert "resuming from step 6" in resumed.stdout + resumed.stderr
    steps = [r["step"] for r in records(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, 11))  # no step lost or logged twice
    assert resumed.stdout.count("run folder:") == 1  # rank 0 alone reports (and writes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8 and summary["steps"] == 10
    assert json.loads((out / "config.json").read_text())["identity"]["world_size"] == 2


def test_ddp_losses_and_weights_equal_one_process_with_the_global_batch(ddp_run, t5_cache, tmp_path):
    """T5's loss averages target tokens: each rank's mean is weighted by its tokens, so the
    gradient is the global batch's; evaluation is sharded over the ranks, then gathered."""
    from side_train.run import parse_args, run

    out, _ = ddp_run
    alone = tmp_path / "alone"
    with one_thread():
        run(parse_args(["--cache", str(t5_cache), "--out", str(alone), "--batch-size", "8", "--tier", "ram", "--quiet", *FLAGS]))
    a, b = records(alone / "metrics.jsonl"), records(out / "metrics.jsonl")
    assert [r["type"] for r in a] == [r["type"] for r in b]
    train_a, train_b = ([r["loss"] for r in rs if r["type"] == "train"] for rs in (a, b))
    assert len(set(train_a)) > 1
    np.testing.assert_allclose(train_b, train_a, rtol=1e-5)
    assert [r for r in a if r["type"] == "eval"] == [r for r in b if r["type"] == "eval"]
    for folder in ("side_model", "best_side_model", "checkpoint"):
        wa, wb = weights(alone / folder), weights(out / folder)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6, msg=f"{folder}/{key}")


def test_sweep_over_two_ranks_gives_the_same_members(t5_cache, tmp_path):
    from side_train import sweep as sweep_mod

    args = ["--cache", str(t5_cache), "--grid", "reduction=4,8", "seed=0,1", "--epochs", "1", "--batch-size", "8",
            "--warmup-steps", "2", "--init", "magnitude", "--quiet"]
    with one_thread():  # as each torchrun worker: the same arithmetic, bit for bit
        assert sweep_mod.main([*args, "--out", str(tmp_path / "one")]) == 0
    spread = torchrun("side_train.sweep", *args, "--out", str(tmp_path / "two"))
    assert spread.returncode == 0, spread.stderr[-3000:]
    assert spread.stdout.count("sweep folder:") == 1
    names = sorted(p.name for p in (tmp_path / "one" / "runs").iterdir())
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "two" / "runs").iterdir())
    for name in names:
        one, two = tmp_path / "one" / "runs" / name, tmp_path / "two" / "runs" / name
        assert records(one / "metrics.jsonl") == records(two / "metrics.jsonl"), name
        wa, wb = weights(one / "side_model"), weights(two / "side_model")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    record = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert record["world_size"] == 2 and sorted(p["rank"] for p in record["passes"]) == [0, 1]
    trained = sorted(m for p in record["passes"] for m in p["members"])
    assert trained == names  # every member trained once, by one rank
    drop = ("train_seconds",)
    rows = [[{k: v for k, v in row.items() if k not in drop} for row in csv_rows(tmp_path / d / "results.csv")]
            for d in ("one", "two")]
    assert rows[0] == rows[1]


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_rank_gets_its_share_of_every_global_batch():
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(5, 400, size=3000))[::-1].copy()
    plan = epoch_batches(lengths, 37, seed=3, epoch=1)
    for world in (2, 3):
        shares = [rank_plan(plan, r, world) for r in range(world)]
        fractions = []
        for index, rows in enumerate(plan):
            parts = [s[index] for s in shares]
            owned = [p for s, p in zip(shares, parts, strict=True) if index not in s.weightless]
            assert sorted(np.concatenate(owned).tolist()) == sorted(rows.tolist())
            assert max(map(len, owned)) - min(map(len, owned)) <= 1
        for s in shares:
            assert [p[:2] for p in s.pools] == [p[:2] for p in plan.pools]
            for first, stop, ranges in s.pools:  # a pool's ranges cover the rank's rows, and little else
                covered = np.concatenate([np.arange(a, b) for a, b in ranges])
                mine = np.unique(np.concatenate(s[first:stop]))
                assert np.isin(mine, covered).all()
                pool_rows = sum(b - a for a, b in plan.pools[[p[0] for p in plan.pools].index(first)][2])
                fractions.append(len(covered) / pool_rows)
        assert np.mean(fractions) < 1 / world + 0.1 and max(fractions) < 0.75
    # a global batch with fewer rows than ranks: the rank left out borrows a row, weighted 0
    tiny = epoch_batches(np.full(5, 10), 4, seed=0, epoch=0)
    last = [i for i, rows in enumerate(tiny) if len(rows) == 1][0]
    other = rank_plan(tiny, 1, 2)
    assert last in other.weightless and other[last].tolist() == tiny[last].tolist()
    assert rank_share(np.array([9, 2, 5]), 0, 2).tolist() == [2, 5]
    assert row_runs(np.array([1, 2, 3, 7, 40, 41, 90]), gap=4) == [(1, 8), (40, 42), (90, 91)]
    bounds = share_bounds(np.array([50, 40, 30, 20, 10, 10, 10, 10]), 2)
    assert bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == 8
    assert share_bounds(np.array([5]), 3) == [(0, 0), (0, 0), (0, 1)]  # more ranks than rows: some score nothing


def test_a_device_a_job_cannot_use_is_one_line(t5_cache, tmp_path, monkeypatch):
    from side_train.run import parse_args, run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="cuda:LOCAL_RANK"):
        run(parse_args(["--cache", str(t5_cache), "--out", str(tmp_path / "r"), "--device", "cuda:1", "--quiet"]))
    assert not (tmp_path / "r").exists()


# --- training from object storage ------------------------------------------------------------


def test_training_from_an_s3_cache_equals_training_from_the_folder(t5_cache, s3_server, tmp_path):
    """The same cache on a local S3 server (moto): streamed pools (read ahead on a thread, the
    remote default) and the RAM tier give the local folder's losses and weights, bit for bit."""
    from shared.stores import CacheLocation
    from side_train.recipe import default_reader
    from side_train.run import parse_args, run

    _, options = s3_server
    url = "s3://lst-test/train-from/cache"
    remote = CacheLocation(url, options)
    remote.remove(recursive=True)
    remote.fs.put(str(t5_cache) + "/", remote._fs_root[1] + "/", recursive=True)
    assert default_reader(remote=True) in ("thread", 1)  # never inline: the next pools come over the network meanwhile
    flags = ["--batch-size", "8", "--epochs", "1", "--warmup-steps", "2", "--quiet", "--init", "fisher"]
    with one_thread():
        run(parse_args(["--cache", str(t5_cache), "--out", str(tmp_path / "local"), "--tier", "disk", *flags]))
        for tier in ("disk", "ram"):
            run(parse_args(["--cache", url, "--storage-options", json.dumps(options), "--out", str(tmp_path / tier),
                            "--tier", tier, *flags]))
    for tier in ("disk", "ram"):
        assert records(tmp_path / tier / "metrics.jsonl") == records(tmp_path / "local" / "metrics.jsonl"), tier
        wa, wb = weights(tmp_path / "local" / "side_model"), weights(tmp_path / tier / "side_model")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), tier
    config = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert config["identity"]["cache"] == url
    assert config["settings"]["source"]["storage_options"]["secret"] == "<hidden>"  # no credentials in the run folder
    with pytest.raises(UserError, match="storage-options"):  # options for a folder: a mistake, said in one line
        parse_args(["--cache", str(t5_cache), "--storage-options", '{"key": "k"}', "--out", str(tmp_path / "x")])
