"""Caches on object storage: extract to a local S3 server (moto), resume a killed run there, read it back."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import SMALL_EXTRACT_ARGS, cache_files, run_cli

from backbone_cache.extraction import EXIT_AFTER_SHARDS_ENV, PROGRESS
from shared.cache_format import StackReader, open_complete, read_examples, read_manifest, shard_key
from shared.errors import UserError
from shared.stores import CacheLocation, parse_storage_options


def remote_files(loc: CacheLocation) -> dict[str, bytes]:
    """Every object below `loc`, the manifest without its timestamps (as in conftest.cache_files)."""
    files = {key: loc.read_bytes(key) for key in loc.sizes()}
    manifest = json.loads(files.pop("manifest.json"))
    for key in ("created", "extract_seconds"):
        manifest.pop(key, None)
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def test_a_location_round_trips_on_s3_and_in_memory(s3_server):
    _, options = s3_server
    for loc in (CacheLocation("s3://lst-test/unit", options), CacheLocation("memory://lst-unit")):
        loc.remove(recursive=True)
        assert not loc.exists() and loc.sizes() == {}
        loc.write_json("a/m.json", {"b": 1})
        loc.join("a", "x").write_bytes("y", b"123")
        assert loc.read_json("a/m.json") == {"b": 1} and (loc / "a/x").read_bytes("y") == b"123"
        assert loc.sizes() == {"a/m.json": len(b'{\n "b": 1\n}'), "a/x/y": 3}
        assert loc.listdir("a") == ["m.json", "x"] and loc.is_file("a/x/y") and not loc.is_file("a/x")
        again = pickle.loads(pickle.dumps(loc))  # DataLoader workers and other ranks reopen it
        assert again == loc and again.read_bytes("a/x/y") == b"123"
        group = loc.open_group("z", mode="w")
        group.create_array("v", shape=(4,), dtype="int32")[:] = np.arange(4)
        assert list(loc.open_array("z/v")[:]) == [0, 1, 2, 3]
        loc.remove("a", recursive=True)
        assert "a/m.json" not in loc.sizes()


def test_extract_to_s3_killed_resumed_and_read_back_equal_to_local(tiny_t5, small_t5_reference, s3_server):
    endpoint, options = s3_server
    url = "s3://lst-test/caches/small"
    args = ["--model", str(tiny_t5), "--out", url, *SMALL_EXTRACT_ARGS]
    # credentials from the environment, as a user's AWS_* variables give them
    env = {"OMP_NUM_THREADS": "1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    killed = run_cli("backbone_cache.extract", *args, env={**env, EXIT_AFTER_SHARDS_ENV: "0:3"}, check=False)
    assert killed.returncode == 3, killed.stderr[-2000:]
    loc = CacheLocation(url, options)
    manifest = read_manifest(loc)
    assert not manifest["complete"] and len(loc.sizes(PROGRESS)) == 3
    with pytest.raises(UserError, match="incomplete"):
        open_complete(loc)
    # the rerun, in this process (no second start-up), with the credentials as --storage-options instead
    from backbone_cache.extract import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference: CPU sums can depend on the thread count
    try:
        assert main([*args, "--storage-options", json.dumps(options)]) == 0
    finally:
        torch.set_num_threads(threads)
    manifest = open_complete(loc)  # the cheap checks pass over the bucket listing
    assert not loc.sizes(PROGRESS)
    # object for object, the same bytes as a local extraction
    local = cache_files(small_t5_reference)
    remote = remote_files(loc)
    assert sorted(remote) == sorted(local)
    assert [k for k in remote if remote[k] != local[k]] == []
    # and read back through the format's readers
    reference = read_manifest(small_t5_reference)
    for split, split_meta in manifest["splits"].items():
        assert read_examples(loc, split).equals(read_examples(small_t5_reference, split))
        for stack, meta in split_meta["stacks"].items():
            ours = StackReader(loc, split, stack, meta)
            theirs = StackReader(small_t5_reference, split, stack, reference["splits"][split]["stacks"][stack])
            assert ours.fast_hidden is None and theirs.fast_hidden is not None
            np.testing.assert_array_equal(ours.offsets, theirs.offsets)
            np.testing.assert_array_equal(ours.read_tokens(0, meta["num_tokens"]), theirs.read_tokens(0, meta["num_tokens"]))
            np.testing.assert_array_equal(ours.read_tokens(3, 17, slice(1, 3)), theirs.read_tokens(3, 17, slice(1, 3)))
    # backbone_cache.verify reads every value there too
    from backbone_cache.verify import main as verify

    assert verify([url, "--storage-options", json.dumps(options), "--quiet"]) == 0
    # a shard missing on the bucket is caught at open, as on disk
    loc.remove(shard_key("train", "encoder", 1))
    with pytest.raises(UserError, match="missing shard 1 of train/encoder/hidden"):
        open_complete(loc)


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    """backbone_cache.extract's main, in this process: exit status 2 and one `error:` line naming the problem."""
    from backbone_cache.extract import main

    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_storage_problems_are_one_line(tiny_t5, s3_server, tmp_path, monkeypatch, capsys):
    import s3fs

    endpoint, options = s3_server
    base = ["--model", str(tiny_t5), *SMALL_EXTRACT_ARGS]
    _one_line_error(capsys, [*base, "--out", "s3://no-such-bucket/c", "--storage-options", json.dumps(options)],
                    "bucket 'no-such-bucket' does not exist")
    _one_line_error(capsys, [*base, "--out", "s3://lst-test/c", "--storage-options", "{not json"],
                    "--storage-options is not valid JSON")
    CacheLocation("s3://lst-test/not-a-cache", options).write_bytes("notes.txt", b"mine")
    _one_line_error(capsys, [*base, "--out", "s3://lst-test/not-a-cache", "--storage-options", json.dumps(options)],
                    "holds objects but no manifest.json")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem made earlier with credentials
    _one_line_error(capsys, [*base, "--out", "s3://lst-test/c"], "no credentials found", "AWS_ACCESS_KEY_ID", "--storage-options")


def test_unreachable_endpoint_and_bad_options_in_the_api():
    with pytest.raises(UserError, match=r"cannot reach http://127\.0\.0\.1:9"):
        CacheLocation("s3://lst-test/c", {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9",
                                          "config_kwargs": {"retries": {"max_attempts": 1}}}).check_access()
    with pytest.raises(UserError, match="a --storage-options entry is not an option of s3://"):
        CacheLocation("s3://lst-test/c", {"no_such_option": 1}).check_access()
    with pytest.raises(UserError, match="must be a JSON object"):
        parse_storage_options("[1, 2]")
    with pytest.raises(UserError, match="names no bucket"):
        CacheLocation("s3://")
    assert CacheLocation("file:///tmp/x").is_local and CacheLocation("/tmp/x").path.name == "x"
