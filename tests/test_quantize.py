"""Compact storage precisions: fp8 with per-token scales, int8 with outlier channels in bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from conftest import T5_EXTRACT_ARGS, assert_one_line_error, needs_minilm, run_cli

from shared.cache_format import StackReader, read_manifest, shard_path
from shared.quantize import choose_outliers, decode_fp8, decode_int8, encode_fp8, encode_int8, relative_error


def bits_of(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_outlier_channels_break_plain_int8_but_not_int8_with_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, 256, generator=g)
    x[:, :, [7, 100]] *= 300.0  # two systematic outlier channels, as in LLM.int8
    bits = bits_of(x)
    index = choose_outliers(bits, 2)
    assert index.tolist() == [[7, 100], [7, 100]]
    with_outliers = encode_int8(bits, index)
    good = decode_int8(with_outliers["hidden"], with_outliers["scale"], with_outliers["outliers"], index)
    assert relative_error(bits, good, exclude=index) < 0.02
    one = choose_outliers(bits, 1)  # keep only one outlier out: the other sets every scale
    plain = encode_int8(bits, one)
    bad = decode_int8(plain["hidden"], plain["scale"], plain["outliers"], one)
    assert relative_error(bits, bad, exclude=index) > 0.3
    fp8 = encode_fp8(bits)
    assert relative_error(bits, decode_fp8(fp8["hidden"], fp8["scale"]), exclude=index) < 0.06


@needs_minilm
def test_reconstruction_error_on_real_minilm_states(minilm_cache):
    bits = zarr.open_array(str(minilm_cache / "train" / "encoder" / "hidden"), mode="r")[:]
    index = choose_outliers(bits, 4)
    fp8 = encode_fp8(bits)
    int8 = encode_int8(bits, index)
    fp8_error = relative_error(bits, decode_fp8(fp8["hidden"], fp8["scale"]), exclude=index)
    int8_error = relative_error(bits, decode_int8(int8["hidden"], int8["scale"], int8["outliers"], index), exclude=index)
    assert fp8_error < 0.04 and int8_error < 0.02 and int8_error < fp8_error


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_cache_reads_back_as_the_quantized_bf16_states(t5_cache, tiny_t5, tmp_path, precision):
    out = tmp_path / precision
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(out), *T5_EXTRACT_ARGS, "--storage", precision,
            "--init", "random")
    manifest, reference = read_manifest(out), read_manifest(t5_cache)
    assert manifest["storage"]["precision"] == precision
    for stack in ("encoder", "decoder"):
        meta = manifest["splits"]["train"]["stacks"][stack]
        assert meta["shard_tokens"] == reference["splits"]["train"]["stacks"][stack]["shard_tokens"]
        ours = StackReader(out, "train", stack, meta)
        theirs = StackReader(t5_cache, "train", stack, reference["splits"]["train"]["stacks"][stack])
        total = meta["num_tokens"]
        np.testing.assert_array_equal(ours.read_tokens(0, total), ours.requantize(0, theirs.read_tokens(0, total)))
        assert ours.hidden.dtype == {"fp8": np.uint8, "int8": np.int8}[precision]
    run_cli("backbone_cache.verify", str(out), "--sample", "2", "--quiet")
    run_cli("side_train.run", "--cache", str(out), "--out", str(tmp_path / "run"), "--max-steps", "2", "--init", "magnitude", "--quiet")
    if precision != "int8":
        return
    # a lost file of the scales or outlier channels is damage, caught at open like a lost `hidden`
    # shard (zarr would read zeros); rerunning the extraction with --overwrite rebuilds the cache
    for name in ("scale", "outliers", "outlier_index"):
        path = shard_path(out, "train", "encoder", 1, name)
        kept = path.read_bytes()
        path.unlink()
        assert_one_line_error(run_cli("backbone_cache.verify", str(out), "--quiet", check=False),
                              f"missing shard 1 of train/encoder/{name}", "--overwrite")
        path.write_bytes(kept)
    shard_path(out, "train", "encoder", 1, "scale").unlink()
    again = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(out), *T5_EXTRACT_ARGS,
                    "--storage", precision, "--init", "random", "--overwrite")
    assert "already complete" not in again.stdout + again.stderr
    run_cli("backbone_cache.verify", str(out), "--quiet")
