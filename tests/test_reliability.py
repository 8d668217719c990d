"""Reliability: bad caches are caught, bad input is one line, faults lose nothing, nothing unsafe is loaded."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import REPO, T5_EXTRACT_ARGS, assert_one_line_error, run_cli
from safetensors.torch import load_file

from shared.cache_format import read_manifest, shard_path


@pytest.fixture
def cache_copy(t5_cache, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(t5_cache, target)
    return target


def train_fails(cache: Path, tmp_path: Path, *needles: str) -> None:
    proc = run_cli("side_train.run", "--cache", str(cache), "--out", str(tmp_path / "run"), "--max-steps", "1", "--quiet", check=False)
    assert_one_line_error(proc, *needles)


# --- the checker ------------------------------------------------------------------------------


def test_verify_accepts_a_sound_cache_and_recomputes_samples_bit_for_bit(t5_cache):
    proc = run_cli("backbone_cache.verify", str(t5_cache), "--sample", "3", "--quiet")
    assert "every CRC32C matches, no NaN or Inf" in proc.stdout
    assert "9 examples recomputed, bit-identical" in proc.stdout and proc.stdout.strip().endswith("is a sound cache")


def test_altered_shard_is_caught_by_verify_and_by_training(cache_copy, tmp_path):
    path = shard_path(cache_copy, "train", "encoder", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    assert_one_line_error(run_cli("backbone_cache.verify", str(cache_copy), "--quiet", check=False), "failed its checksum")
    train_fails(cache_copy, tmp_path, "failed its checksum")


def test_truncated_shard_is_caught(cache_copy, tmp_path):
    path = shard_path(cache_copy, "validation", "candidates", 0)  # a stack evaluation reads
    path.write_bytes(path.read_bytes()[:-100])
    assert_one_line_error(run_cli("backbone_cache.verify", str(cache_copy), "--quiet", check=False), "failed its checksum")
    train_fails(cache_copy, tmp_path, "failed its checksum")


def test_missing_shard_is_caught_at_open(cache_copy, tmp_path):
    shard_path(cache_copy, "test", "encoder", 2).unlink()  # zarr alone would read zeros here
    assert_one_line_error(run_cli("backbone_cache.verify", str(cache_copy), "--quiet", check=False), "missing shard 2 of test/encoder/hidden")
    train_fails(cache_copy, tmp_path, "missing shard 2 of test/encoder/hidden")


@pytest.mark.parametrize("damage, needle", [
    ("train/encoder/hidden/zarr.json", "train/encoder lacks an array or its metadata"),
    ("train/examples.parquet", "train/examples.parquet is missing"),
    ("manifest d_model", "states per token where the manifest says"),
])
def test_lost_metadata_and_edited_manifests_are_caught_at_open(cache_copy, tmp_path, damage, needle):
    if damage == "manifest d_model":
        manifest = json.loads((cache_copy / "manifest.json").read_text())
        manifest["model"]["d_model"] = 512
        (cache_copy / "manifest.json").write_text(json.dumps(manifest))
    else:
        (cache_copy / damage).unlink()
    assert_one_line_error(run_cli("backbone_cache.verify", str(cache_copy), "--quiet", check=False), needle, "--overwrite")
    train_fails(cache_copy, tmp_path, needle)


def test_nan_in_the_cache_is_caught(cache_copy):
    hidden = zarr.open_array(str(cache_copy / "train" / "encoder" / "hidden"), mode="r+")
    hidden[5, 1, 3] = np.uint16(0x7FC0)  # bf16 NaN, written with a valid checksum
    assert_one_line_error(run_cli("backbone_cache.verify", str(cache_copy), "--quiet", check=False), "NaN or Inf at token 5")


def test_missing_empty_and_half_written_caches(cache_copy, tmp_path):
    train_fails(tmp_path / "nowhere", tmp_path, "does not exist")
    (tmp_path / "empty").mkdir()
    train_fails(tmp_path / "empty", tmp_path, "no manifest.json")
    manifest = read_manifest(cache_copy)
    manifest["complete"] = False
    (cache_copy / "manifest.json").write_text(json.dumps(manifest))
    train_fails(cache_copy, tmp_path, "incomplete", "rerun the extract command")


def test_missing_manifest_and_other_format_version(cache_copy, tmp_path):
    manifest = read_manifest(cache_copy)
    manifest["format_version"] = 0
    (cache_copy / "manifest.json").write_text(json.dumps(manifest))
    train_fails(cache_copy, tmp_path, "format version 0", "reads version 2")
    assert_one_line_error(run_cli("backbone_cache.verify", str(cache_copy), check=False), "format version 0")
    (cache_copy / "manifest.json").unlink()
    train_fails(cache_copy, tmp_path, "no manifest.json")


def test_manifest_paths_never_leave_the_cache(cache_copy, tmp_path):
    manifest = read_manifest(cache_copy)
    manifest["splits"]["../../etc"] = manifest["splits"].pop("test")
    (cache_copy / "manifest.json").write_text(json.dumps(manifest))
    train_fails(cache_copy, tmp_path, "unsafe split")


# --- bad input ----------------------------------------------------------------------------------


def test_checkpoint_with_other_settings_is_refused(t5_cache, tmp_path):
    out = tmp_path / "run"
    slow = run_cli("side_train.run", "--cache", str(t5_cache), "--out", str(out), "--max-steps", "1", "--quiet")
    assert slow.returncode == 0
    (out / "summary.json").unlink()  # pretend it was interrupted
    for flags, needle in ((["--reduction", "4"], "side.reduction is 8, the flags give 4"),
                          (["--side-layers", "0,2"], "side.decoder_layers is [0, 1, 2], the flags give [0, 2]")):
        proc = run_cli("side_train.run", "--cache", str(t5_cache), "--out", str(out), "--max-steps", "1", "--quiet", *flags, check=False)
        assert_one_line_error(proc, needle)


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([], "holds no rows"),
        ([{"text": "fine", "label": "pos"}, {"text": "bad", "label": None}], "has no label"),
        ([{"text": "fine", "label": "pos"}, {"text": "bad"}], "has no column 'label'"),
        ([{"text": None, "label": "pos"}, {"text": "bad", "label": "neg"}], "has no text in 'text'"),
    ],
)
def test_bad_local_data(tiny_t5, tmp_path, rows, needle):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if rows and "label" not in rows[-1]:  # a missing column in the *first* row is what is checked
        train.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    proc = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(tmp_path / "c"), "--task", "local",
                   "--data", f"train={train}", "--text-fields", "text", check=False)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "c").exists()


def test_label_outside_the_training_set(tiny_t5, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    (tmp_path / "val.csv").write_text("text,label\nmeh,neutral\n")
    proc = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(tmp_path / "c"), "--task", "local",
                   "--data", f"train={tmp_path / 'train.csv'}", "--data", f"validation={tmp_path / 'val.csv'}",
                   "--text-fields", "text", check=False)
    assert_one_line_error(proc, "label 'neutral'", "never uses")


def test_unwritable_output_folder(tiny_t5):
    proc = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", "/sys/lst-cache-test", "--limit", "4", check=False)
    assert_one_line_error(proc, "choose a folder you can write to")


def test_full_disk_loses_nothing_and_resumes(tiny_t5, t5_cache, tmp_path, monkeypatch, capsys):
    """Simulate ENOSPC in zarr's file writes after a few shards; the rerun ends with the same arrays."""
    import zarr.storage._local as local

    from backbone_cache.extract import main

    real_put, calls = local._put, {"n": 0}

    def put(path, value, exclusive=False):
        if "/hidden/c/" in str(path):
            calls["n"] += 1
            if calls["n"] > 4:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    out = tmp_path / "c"
    args = ["--model", str(tiny_t5), "--out", str(out), *T5_EXTRACT_ARGS]
    monkeypatch.setattr(local, "_put", put)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the disk is full") and "resume" in err[0]
    done = read_manifest(out)["splits"]["train"]["stacks"]["encoder"]["shards_done"]
    assert done >= 1 and not read_manifest(out)["complete"]
    monkeypatch.setattr(local, "_put", real_put)
    assert main(args) == 0
    for split in ("train", "validation"):
        for stack in ("encoder", "decoder"):
            a = zarr.open_array(str(out / split / stack / "hidden"), mode="r")[:]
            b = zarr.open_array(str(t5_cache / split / stack / "hidden"), mode="r")[:]
            np.testing.assert_array_equal(a, b)


# --- faults ---------------------------------------------------------------------------------------


def _kill_when(cmd: list[str], ready, timeout: float = 120) -> None:
    proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.003)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _shards_done(out: Path) -> int:
    try:
        m = json.loads((out / "manifest.json").read_text())
        return sum(s["shards_done"] for sp in m["splits"].values() for s in sp["stacks"].values())
    except (OSError, ValueError, KeyError):
        return 0


def test_extraction_killed_at_random_points_ends_identical(tiny_t5, tmp_path):
    """SIGKILL at several random points, rerun each time; the final cache equals an uninterrupted one."""
    args = ["--model", str(tiny_t5), *T5_EXTRACT_ARGS, "--batch-size", "2", "--init", "random"]
    reference = tmp_path / "reference"
    run_cli("backbone_cache.extract", "--out", str(reference), *args)
    total = sum(s["num_shards"] for sp in read_manifest(reference)["splits"].values() for s in sp["stacks"].values())
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        target = _shards_done(out) + rng.randint(1, max(1, total // 4))
        _kill_when(["backbone_cache.extract", "--out", str(out), *args], lambda t=target: _shards_done(out) >= t)
        kills += not read_manifest(out)["complete"]
    assert kills >= 2, "the kills landed after the run had finished"
    run_cli("backbone_cache.extract", "--out", str(out), *args)
    m = read_manifest(out)
    assert m["complete"]
    for split, split_meta in m["splits"].items():
        for stack in split_meta["stacks"]:
            group_a = zarr.open_group(str(out / split / stack), mode="r")
            group_b = zarr.open_group(str(reference / split / stack), mode="r")
            for name in group_b.array_keys():
                np.testing.assert_array_equal(group_a[name][:], group_b[name][:], err_msg=f"{split}/{stack}/{name}")


def test_training_killed_and_resumed_ends_identical(t5_cache, tmp_path):
    common = ["--cache", str(t5_cache), "--epochs", "3", "--batch-size", "8", "--warmup-steps", "2", "--save-every", "2", "--quiet"]
    run_cli("side_train.run", *common, "--out", str(tmp_path / "whole"))
    out = tmp_path / "killed"

    def progressed() -> bool:
        try:
            return json.loads((out / "checkpoint" / "state.json").read_text())["progress"]["step"] >= 6
        except (OSError, ValueError, KeyError):
            return False

    _kill_when(["side_train.run", *common, "--out", str(out)], progressed)
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    # the checkpoint keeps the largest step's memory account so far, and the resumed run reports it:
    # inflated here, so that only the stored account can be the largest
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    stored = state["progress"]["training_memory"]
    stored["saved_bytes"] += 10**9
    stored["total_bytes"] += 10**9
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    run_cli("side_train.run", *common, "--out", str(out))
    a, b = load_file(str(tmp_path / "whole" / "side_model" / "model.safetensors")), load_file(str(out / "side_model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    metrics = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (tmp_path / "whole", out)]
    assert [m.get("loss") for m in metrics[0]] == [m.get("loss") for m in metrics[1]]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "whole", out))
    assert sa["test_last"] == sb["test_last"] and sa["validation_best"] == sb["validation_best"]
    assert sb["training_memory"] == stored and sb["training_memory_bytes"] == stored["total_bytes"]
    assert sa["training_memory_bytes"] < stored["total_bytes"] - 10**9 // 2


# --- security -------------------------------------------------------------------------------------


def test_remote_code_is_off_unless_asked(tiny_t5, monkeypatch):
    import transformers

    from shared.backbones import load_backbone

    seen = []
    real = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    import torch

    load_backbone(str(tiny_t5), torch.device("cpu"))
    default = list(seen)
    seen.clear()
    load_backbone(str(tiny_t5), torch.device("cpu"), trust_remote_code=True)
    assert default and all(flag is False for flag in default)
    assert seen and all(flag is True for flag in seen)


def test_pickled_weights_are_refused(tiny_t5, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_t5, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    proc = run_cli("backbone_cache.extract", "--model", str(folder), "--out", str(tmp_path / "c"), check=False)
    assert_one_line_error(proc, "no *.safetensors weights")


def test_no_code_path_unpickles():
    """No pickle-based loader anywhere in the package (torch.load, pickle, numpy allow_pickle)."""
    offenders = []
    for path in REPO.glob("*/**/*.py"):
        if path.parts[len(REPO.parts)] not in ("shared", "backbone_cache", "side_train"):
            continue
        text = path.read_text()
        for needle in ("torch.load(", "pickle.load", "allow_pickle=True", "import pickle", "joblib"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert not offenders, offenders
