"""Phase 1: the cache holds exactly the frozen model's states, unpadded, and is safe to rerun."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from conftest import REPO, T5_EXTRACT_ARGS, assert_one_line_error, needs_minilm, run_cli

from shared.backbones import default_model_dir
from shared.cache_format import FORMAT_VERSION, read_manifest


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """One bfloat16 rounding step (ulp) at the magnitude of x."""
    x = x.abs().float().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(x)) - 7)


def assert_bf16_close(stored_bits: np.ndarray, reference: torch.Tensor) -> None:
    """Stored bf16 equals the float32 reference to within one bf16 rounding step.

    Padding and batch shape change float32 sums by about 2^-23 of the token vector's scale,
    so near-zero elements get a floor of 2^-16 of the vector's largest magnitude.
    """
    stored = torch.from_numpy(stored_bits.view(np.int16)).view(torch.bfloat16).float()
    ref = reference.float()
    assert stored.shape == ref.shape
    floor = ref.abs().amax(-1, keepdim=True) * 2.0**-16
    excess = (stored - ref).abs() - torch.maximum(bf16_step(ref), floor)
    assert torch.all(excess <= 0), float(excess.max())


def assert_bf16_bitwise(stored_bits: np.ndarray, reference: torch.Tensor) -> None:
    """Stored bits are exactly the reference rounded to bfloat16."""
    want = reference.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(stored_bits, want)


def plain_read(cache: Path, split: str, stack: str, index: int) -> np.ndarray:
    """Read one sequence's states the way docs/cache-format.md tells a third party to."""
    group = zarr.open_group(str(cache / split / stack), mode="r")
    offsets = group["offsets"][:]
    return group["hidden"][offsets[index] : offsets[index + 1]]


def stack_states(model_stack, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """[L, layers, d]: transformers' own hidden_states, except the last, taken before the final norm."""
    captured = []
    hook = model_stack.block[-1].register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    try:
        out = model_stack(input_ids=input_ids, output_hidden_states=True, **kwargs)
    finally:
        hook.remove()
    return torch.stack([*out.hidden_states[:-1], captured[0]], dim=2)[0], out.last_hidden_state


@torch.no_grad()
def test_t5_states_equal_the_model_alone(t5_cache, tiny_t5):
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    manifest = read_manifest(t5_cache)
    candidates = manifest["candidates"]
    tokenizer_ids = {c: ids for c, ids in zip(candidates, _tokenize(tiny_t5, candidates))}
    for split in ("train", "validation"):
        group = zarr.open_group(str(t5_cache / split), mode="r")
        enc_offsets = group["encoder/offsets"][:]
        dec_offsets = group["decoder/offsets"][:]
        for index in (0, 7, len(enc_offsets) - 2):  # longest, middle, shortest
            ids = torch.tensor(group["encoder/input_ids"][enc_offsets[index] : enc_offsets[index + 1]])[None].long()
            enc_states, final = stack_states(model.encoder, ids)
            assert_bf16_close(plain_read(t5_cache, split, "encoder", index), enc_states)
            dec_ids = torch.tensor(group["decoder/input_ids"][dec_offsets[index] : dec_offsets[index + 1]])[None].long()
            dec_states, _ = stack_states(model.decoder, dec_ids, encoder_hidden_states=final)
            assert_bf16_close(plain_read(t5_cache, split, "decoder", index), dec_states)
            if split == "validation":  # candidate stacks: every label, teacher-forced
                for k, cand in enumerate(candidates):
                    labels = torch.tensor([tokenizer_ids[cand]])
                    cand_states, _ = stack_states(model.decoder, model._shift_right(labels), encoder_hidden_states=final)
                    assert_bf16_close(plain_read(t5_cache, split, "candidates", index * len(candidates) + k), cand_states)
    assert "candidates" not in zarr.open_group(str(t5_cache / "train"), mode="r")


@torch.no_grad()
def test_t5_batch_of_one_is_bit_identical(tiny_t5, tmp_path):
    """With one example per batch the computation is the model's own: the bits must match exactly."""
    from transformers import T5ForConditionalGeneration

    out = tmp_path / "c"
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(out), "--limit", "5", "--splits", "validation",
            "--batch-size", "1", "--init", "random", "--quiet")
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    group = zarr.open_group(str(out / "validation"), mode="r")
    offsets, dec_offsets = group["encoder/offsets"][:], group["decoder/offsets"][:]
    for index in range(5):
        ids = torch.tensor(group["encoder/input_ids"][offsets[index] : offsets[index + 1]])[None].long()
        enc_states, final = stack_states(model.encoder, ids, attention_mask=torch.ones_like(ids))
        assert_bf16_bitwise(plain_read(out, "validation", "encoder", index), enc_states)
        dec_ids = torch.tensor(group["decoder/input_ids"][dec_offsets[index] : dec_offsets[index + 1]])[None].long()
        dec_states, _ = stack_states(model.decoder, dec_ids, attention_mask=torch.ones_like(dec_ids),
                                     encoder_hidden_states=final, encoder_attention_mask=torch.ones_like(ids))
        assert_bf16_bitwise(plain_read(out, "validation", "decoder", index), dec_states)


def _tokenize(model_dir, texts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(texts)["input_ids"]


@needs_minilm
@torch.no_grad()
def test_minilm_states_equal_the_model_alone(minilm_cache):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(default_model_dir()).eval()
    group = zarr.open_group(str(minilm_cache / "test" / "encoder"), mode="r")
    offsets = group["offsets"][:]
    for index in range(0, len(offsets) - 1, 9):
        ids = torch.tensor(group["input_ids"][offsets[index] : offsets[index + 1]])[None].long()
        types = torch.tensor(group["token_type_ids"][offsets[index] : offsets[index + 1]])[None].long()
        hidden = model(input_ids=ids, token_type_ids=types, output_hidden_states=True).hidden_states
        assert_bf16_close(plain_read(minilm_cache, "test", "encoder", index), torch.stack(hidden, dim=2)[0])


@needs_minilm
def test_no_padding_is_stored(minilm_cache):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    examples = pq.read_table(minilm_cache / "train" / "examples.parquet").to_pylist()
    group = zarr.open_group(str(minilm_cache / "train" / "encoder"), mode="r")
    lengths = np.diff(group["offsets"][:])
    alone = [len(tokenizer(ex["texts"][0], truncation=True, max_length=128)["input_ids"]) for ex in examples]
    assert lengths.tolist() == alone  # each example's own length, no padding
    assert group["hidden"].shape[0] == sum(alone) == group["input_ids"].shape[0]
    assert (group["input_ids"][:] != tokenizer.pad_token_id).all()
    assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)  # stored longest first


def test_manifest_records_what_the_cache_holds(t5_cache, tiny_t5):
    m = read_manifest(t5_cache)
    assert m["format_version"] == FORMAT_VERSION and m["complete"] is True
    assert m["model"]["name"] == str(tiny_t5) and m["model"]["family"] == "t5"
    assert len(m["model"]["config_fingerprint"]) == 64 and len(m["model"]["tokenizer_fingerprint"]) == 64
    assert m["task"]["name"] == "rotten_tomatoes" and m["max_length"] == 128
    assert m["storage"] == {"logical_dtype": "bfloat16", "zarr_dtype": "uint16", "codec": m["storage"]["codec"],
                            "precision": "bf16", "outlier_channels": 0}
    assert m["candidates"] == ["0", "1"]
    for split in ("train", "validation", "test"):
        info = m["splits"][split]
        assert info["complete"] and info["num_examples"] == 40
        enc = info["stacks"]["encoder"]
        assert enc["layers"] == [0, 1, 2, 3]
        assert enc["num_shards"] > 1 and enc["shards_done"] == enc["num_shards"]
        hidden = zarr.open_array(str(t5_cache / split / "encoder" / "hidden"), mode="r")
        assert hidden.shape == (enc["num_tokens"], 4, 64) and hidden.dtype == np.uint16
        assert hidden.attrs["logical_dtype"] == "bfloat16"
    assert m["importance"]["kind"] == "fisher"


def test_importance_is_stored_per_row(t5_cache):
    from safetensors import safe_open

    with safe_open(str(t5_cache / "importance.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("shared.columns").shape == (64,)
        assert f.get_tensor("encoder.block.0.layer.0.SelfAttention.qkv").shape == (64,)
        assert f.get_tensor("encoder.block.2.layer.1.DenseReluDense.wi.rows").shape == (128,)
        assert f.get_tensor("decoder.block.1.layer.1.EncDecAttention.qkv").shape == (64,)
        total = sum(f.get_tensor(k).numel() for k in keys)
    assert total < 10_000  # rows, not a copy of the model


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "validation", "test"):
        for stack in ("encoder", "decoder", "candidates"):
            path = folder / split / stack
            if path.exists():
                group = zarr.open_group(str(path), mode="r")
                for name in group.array_keys():
                    out[f"{split}/{stack}/{name}"] = group[name][:]
        out[f"{split}/examples"] = pq.read_table(folder / split / "examples.parquet")
    return out


def test_resume_after_kill_gives_an_identical_cache(tiny_t5, t5_cache, tmp_path):
    out = tmp_path / "killed"
    args = ["--model", str(tiny_t5), "--out", str(out), *T5_EXTRACT_ARGS, "--batch-size", "2"]
    # the reference run (fixture) used --batch-size 8; this one differs, so make its own reference too
    reference = tmp_path / "reference"
    run_cli("backbone_cache.extract", *[a if a != str(out) else str(reference) for a in args])
    proc = subprocess.Popen([sys.executable, "-m", "backbone_cache.extract", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            m = json.loads((out / "manifest.json").read_text())
            if m["splits"]["train"]["stacks"]["encoder"]["shards_done"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not read_manifest(out)["complete"], "the run finished before it could be killed"
    run_cli("backbone_cache.extract", *args)
    got, want = _arrays(out), _arrays(reference)
    assert got.keys() == want.keys()
    for key in want:
        if key.endswith("examples"):
            assert got[key].equals(want[key]), key
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_complete_cache_is_never_overwritten_silently(tiny_t5, t5_cache):
    before = _tree_digest(t5_cache)
    same = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(t5_cache), *T5_EXTRACT_ARGS)
    assert "already complete" in same.stderr
    other = run_cli("backbone_cache.extract", "--out", str(t5_cache), "--limit", "5", "--quiet", check=False)
    assert_one_line_error(other, "already holds a cache", "its model differs", "--overwrite")
    shorter = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(t5_cache), *T5_EXTRACT_ARGS,
                      "--max-length", "64", check=False)
    assert_one_line_error(shorter, "its --max-length differs")
    # without --chunk-mib / --shard-mib the cache's own geometry is the default: a cache made
    # under another default (2 MiB chunks before 2026-11-27) is still this command's cache
    flags = [a for a in T5_EXTRACT_ARGS if a not in ("--chunk-mib", "0.01", "--shard-mib", "0.04")]
    default_geometry = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(t5_cache), *flags)
    assert "already complete" in default_geometry.stderr
    other_geometry = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(t5_cache), *flags,
                             "--chunk-mib", "0.02", check=False)
    assert_one_line_error(other_geometry, "already holds a cache", "its --chunk-mib/--shard-mib differs", "--overwrite")
    assert _tree_digest(t5_cache) == before


def test_overwrite_replaces_a_cache(tiny_t5, tmp_path):
    out = tmp_path / "c"
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(out), "--limit", "6", "--splits", "train",
            "--init", "random", "--quiet")
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(out), "--limit", "9", "--splits", "train",
            "--init", "random", "--quiet", "--overwrite")
    m = read_manifest(out)
    assert m["complete"] and m["splits"]["train"]["num_examples"] == 9
    assert not list(tmp_path.glob("c.*")), "staging folders are cleaned up"


def test_local_data_files(tiny_t5, tmp_path):
    import pyarrow as pa

    rows = [{"premise": f"a cat number {i}", "hypothesis": f"a dog {i % 3}", "gold": ["yes", "no"][i % 2]} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows[:5]), tmp_path / "val.parquet")
    (tmp_path / "test.csv").write_text("premise,hypothesis,gold\n" + "".join(f"{r['premise']},{r['hypothesis']},{r['gold']}\n" for r in rows[:4]))
    out = tmp_path / "cache"
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(out), "--task", "local",
            "--data", f"train={tmp_path / 'train.jsonl'}", "--data", f"validation={tmp_path / 'val.parquet'}",
            "--data", f"test={tmp_path / 'test.csv'}", "--text-fields", "premise,hypothesis", "--label-field", "gold",
            "--init", "random", "--quiet")
    m = read_manifest(out)
    assert m["task"]["label_names"] == ["no", "yes"] and m["task"]["name"] == "local"
    assert [m["splits"][s]["num_examples"] for s in ("train", "validation", "test")] == [12, 5, 4]
    table = pq.read_table(out / "train" / "examples.parquet").to_pylist()
    first = next(r for r in table if r["example_id"] == "train-0")
    assert first["texts"] == ["a cat number 0", "a dog 0"] and first["label"] == 1.0 and first["target_text"] == "1"
    ids = plain_read(out, "train", "encoder", table.index(first))
    assert ids.shape[1:] == (4, 64)
    bad = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(tmp_path / "bad"), "--task", "local",
                  "--data", f"train={tmp_path / 'train.jsonl'}", "--text-fields", "premise,missing", "--label-field", "gold",
                  check=False)
    assert_one_line_error(bad, "no column 'missing'")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--task", "nosuchtask"], "unknown task"),
        (["--max-length", "0"], "--max-length must be positive"),
        (["--batch-size", "-1"], "--batch-size must be positive"),
        (["--splits", "train,dev"], "split 'dev' is not in the data"),
        (["--layers", "0,99"], "out of range"),
        (["--layers", "0,3-x"], "must be indices and ranges"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_t5, args, needle):
    proc = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(tmp_path / "c"), "--limit", "4", *args, check=False)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "c").exists()


def test_model_folder_without_weights(tmp_path, tiny_t5):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_t5 / "config.json").read_text())
    proc = run_cli("backbone_cache.extract", "--model", str(folder), "--out", str(tmp_path / "c"), check=False)
    assert_one_line_error(proc, "no *.safetensors weights")


def extract_here(capsys, *argv: str) -> tuple[int, str]:
    """backbone_cache.extract's main in this process (no interpreter start): (exit code, stderr)."""
    from backbone_cache.extract import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_fisher_scores_are_added_to_a_complete_cache(tmp_path, tiny_t5, capsys):
    """Importance sits beside the states (not part of the cache's identity): asking for Fisher
    on a complete cache without it adds the scores and leaves every state file as it was."""
    from side_train.run import main as run_main

    out = tmp_path / "c"
    extract = ("--model", str(tiny_t5), "--out", str(out), *T5_EXTRACT_ARGS, "--limit", "12")
    assert extract_here(capsys, *extract, "--init", "random")[0] == 0
    states = {p: p.stat().st_mtime_ns for p in out.rglob("c/*/*/*") if p.is_file()}
    assert states and read_manifest(out)["importance"] is None
    code, err = extract_here(capsys, *extract, "--init", "fisher")
    assert code == 0 and "added Fisher importance scores over 8 training examples" in err
    assert read_manifest(out)["importance"] == {"kind": "fisher", "file": "importance.safetensors", "samples": 8}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("c/*/*/*") if p.is_file()} == states
    assert "already complete" in extract_here(capsys, *extract, "--init", "fisher")[1]
    assert run_main(["--cache", str(out), "--out", str(tmp_path / "run"), "--max-steps", "1", "--init", "fisher", "--quiet"]) == 0


def test_default_codec_and_a_cache_made_under_the_old_one(tmp_path, tiny_t5, t5_cache, capsys):
    """blosc-lz4 is the default; without --codec, a cache already at --out keeps its own codec
    (zstd1 was the default before), so the same command still finds it complete."""
    assert read_manifest(t5_cache)["storage"]["codec"] == "blosc-lz4"
    out = tmp_path / "old"
    extract = ("--model", str(tiny_t5), "--out", str(out), *T5_EXTRACT_ARGS, "--init", "random", "--limit", "12")
    assert extract_here(capsys, *extract, "--codec", "zstd1")[0] == 0
    assert "already complete" in extract_here(capsys, *extract)[1]
    code, err = extract_here(capsys, *extract, "--codec", "blosc-lz4")
    assert code == 2 and "its --codec differs" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert read_manifest(out)["storage"]["codec"] == "zstd1"


def test_resuming_a_t5_cache_without_test_split_and_an_interrupted_overwrite(tmp_path, tiny_t5, capsys):
    """(1) A T5 cache whose first split (train) has no candidates stack, made with other chunk
    sizes: the same command without --chunk-mib still finds it. (2) An --overwrite whose first
    run went straight into a new folder and was interrupted: the same command resumes it."""
    flags = [a for a in T5_EXTRACT_ARGS if a not in ("--chunk-mib", "0.01", "--shard-mib", "0.04")]
    base = ("--model", str(tiny_t5), *flags, "--init", "random", "--limit", "12", "--splits", "train,validation")
    out = tmp_path / "c"
    assert extract_here(capsys, *base, "--out", str(out), "--chunk-mib", "0.02")[0] == 0
    assert "already complete" in extract_here(capsys, *base, "--out", str(out))[1]
    fresh = tmp_path / "fresh"
    assert extract_here(capsys, *base, "--out", str(fresh), "--overwrite")[0] == 0
    manifest = read_manifest(fresh)
    manifest["complete"] = manifest["splits"]["validation"]["complete"] = False  # as if killed before its last split
    (fresh / "manifest.json").write_text(json.dumps(manifest))
    train_files = {p: p.stat().st_mtime_ns for p in (fresh / "train").rglob("*") if p.is_file()}
    assert extract_here(capsys, *base, "--out", str(fresh), "--overwrite")[0] == 0
    assert read_manifest(fresh)["complete"] and not (tmp_path / "fresh.overwrite").exists()
    assert {p: p.stat().st_mtime_ns for p in (fresh / "train").rglob("*") if p.is_file()} == train_files  # resumed, not redone


def test_fisher_scores_of_an_encoder_do_not_depend_on_the_global_rng(tmp_path):
    """Encoders get their label loss from a fitted linear probe; its start must not be random,
    or the scores (and every pruned init from them) differ between runs of the same command."""
    import torch
    from make_tiny_t5 import make_random_encoder

    from backbone_cache.extract import parse_args
    from backbone_cache.extraction import Extraction
    from backbone_cache.importance import fisher_scores

    model = make_random_encoder(tmp_path / "bert", d_model=32, layers=2, heads=2, d_ff=64)
    extraction = Extraction(parse_args(["--model", str(model), "--out", str(tmp_path / "cache"), "--limit", "16",
                                        "--splits", "train", "--quiet"]))
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(fisher_scores(extraction.backbone, extraction.spec, extraction.plans["train"], 8, quiet=True))
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(v.abs().sum() > 0 for v in runs[0].values())


def test_dry_run_sizes_the_cache_and_writes_nothing(tmp_path, tiny_t5, t5_cache, capsys):
    """--dry-run: the bf16 size it prints is the stored states' raw size of the same extraction."""
    from backbone_cache.extract import main
    from backbone_cache.extraction import format_bytes

    out = tmp_path / "never"
    assert main(["--model", str(tiny_t5), "--out", str(out), *T5_EXTRACT_ARGS, "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert not out.exists()
    manifest = read_manifest(t5_cache)  # the same flags, extracted for real
    raw = sum(m["num_tokens"] * len(m["layers"]) * manifest["model"]["d_model"] * 2
              for split in manifest["splits"].values() for m in split["stacks"].values())
    assert f"| bf16 (chosen) | {format_bytes(raw)} |" in report
    assert "| validation | candidates | 80 |" in report and "time: about" in report
