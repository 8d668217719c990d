"""Sweeps: each network trained in a sweep equals the same configuration trained alone.

A tiny random BERT (3 layers, d=64) with the embedded MiniLM tokenizer keeps this fast; its
cache holds 40 examples per split. Members differ in layers read (drop_layers) and seed,
so the test covers layer slicing from a union batch and one batch stream per seed.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_minilm
from safetensors.torch import load_file

from shared.errors import UserError
from side_train import run as solo
from side_train import sweep as sweep_mod
from side_train import sweep_plan
from side_train.runs import Member, RunConfig
from side_train.train import TrainState

pytestmark = needs_minilm  # the tiny BERT borrows the embedded MiniLM's tokenizer files

SHARED = ["--init", "magnitude", "--epochs", "2", "--batch-size", "16", "--warmup-steps", "3", "--lr", "1e-2"]
GRID = ["drop_layers=0,1", "seed=0,1"]
NAMES = ["drop_layers=0_seed=0", "drop_layers=0_seed=1", "drop_layers=1_seed=0", "drop_layers=1_seed=1"]


def make_tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    from shared.backbones import default_model_dir

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (default_model_dir() / name).exists():
            shutil.copy(default_model_dir() / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is faster and steadier on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_thread) -> Path:
    from backbone_cache.extract import main as extract

    root = tmp_path_factory.mktemp("sweep")
    model = make_tiny_bert(root / "bert")
    out = root / "cache"
    assert extract(["--model", str(model), "--out", str(out), "--limit", "40", "--max-length", "24",
                    "--init", "magnitude", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def finished_sweep(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep_out") / "s"
    assert sweep_mod.main(["--cache", str(cache), "--out", str(out), "--grid", *GRID, "--quiet", *SHARED]) == 0
    return out


def records(path: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"} for line in path.read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("name, flags", [("drop_layers=1_seed=1", ["--drop-layers", "1", "--seed", "1"]),
                                         ("drop_layers=0_seed=0", ["--drop-layers", "0", "--seed", "0"])])
def test_sweep_member_matches_run_alone(cache, finished_sweep, tmp_path, name, flags):
    alone = tmp_path / "alone"
    assert solo.main(["--cache", str(cache), "--out", str(alone), *SHARED, *flags]) == 0
    member = finished_sweep / "runs" / name
    losses = [r["loss"] for r in records(alone / "metrics.jsonl") if r["type"] == "train"]
    assert len(losses) == 6 and len(set(losses)) > 1
    assert records(member / "metrics.jsonl") == records(alone / "metrics.jsonl")  # every loss, lr and eval metric
    s_member, s_alone = (json.loads((d / "summary.json").read_text()) for d in (member, alone))
    for key in ("steps", "epochs", "best_epoch", "validation_best", "test_at_best_validation", "test_last",
                "trainable_parameters", "trainable_share"):
        assert s_member[key] == s_alone[key], key
    c_member, c_alone = (json.loads((d / "config.json").read_text()) for d in (member, alone))
    assert c_member["identity"] == c_alone["identity"]
    for folder in ("side_model", "best_side_model", "checkpoint"):
        assert same_weights(member / folder, alone / folder), folder


def test_a_sweep_of_one_is_a_run(cache, tmp_path):
    """side_train.sweep with one configuration and side_train.run with the same flags: the same
    losses, metrics and weights, bit for bit (both go through side_train.runs.train_pass)."""
    flags = ["--drop-layers", "1", "--seed", "1"]
    assert solo.main(["--cache", str(cache), "--out", str(tmp_path / "alone"), *SHARED, *flags]) == 0
    assert sweep_mod.main(["--cache", str(cache), "--out", str(tmp_path / "s"), "--grid", "seed=1", "--quiet",
                           *SHARED, "--drop-layers", "1"]) == 0
    member, alone = tmp_path / "s" / "runs" / "seed=1", tmp_path / "alone"
    assert records(member / "metrics.jsonl") == records(alone / "metrics.jsonl")
    for folder in ("side_model", "best_side_model", "checkpoint"):
        assert same_weights(member / folder, alone / folder), folder


def test_standardized_members_match_their_runs_alone(cache, tmp_path, monkeypatch):
    """--standardize-ladders in a sweep: a member reading a subset of the pass's layers takes the statistics of
    its own layers, as a run alone computes them (bit for bit), and the statistics are read once per set of layers."""
    import side_train.recipe as recipe

    calls = []
    real = recipe.ladder_input_statistics

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    flags = ["--standardize-ladders", "--seed", "1"]
    assert solo.main(["--cache", str(cache), "--out", str(tmp_path / "alone"), *SHARED, *flags, "--drop-layers", "1"]) == 0
    monkeypatch.setattr(recipe, "ladder_input_statistics", counted)
    assert sweep_mod.main(["--cache", str(cache), "--out", str(tmp_path / "s"), "--grid", "drop_layers=0,1", "lr=1e-2,3e-3",
                           "--quiet", *[f for f in SHARED if f not in ("--lr", "1e-2")], *flags]) == 0
    assert len(calls) == 2  # four members, two sets of layers
    member, alone = tmp_path / "s" / "runs" / "drop_layers=1_lr=1e-2", tmp_path / "alone"
    weights = load_file(str(member / "side_model" / "model.safetensors"))
    assert weights["encoder.input_factor"].shape[0] == 3 and float(weights["encoder.input_factor"].std()) > 0
    assert records(member / "metrics.jsonl") == records(alone / "metrics.jsonl")
    for folder in ("side_model", "best_side_model", "checkpoint"):
        assert same_weights(member / folder, alone / folder), folder


def test_sweep_results_tables_and_plots(finished_sweep):
    with open(finished_sweep / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    with open(finished_sweep / "results.csv") as f:
        configs = list(csv.DictReader(f))
    assert sorted(r["name"] for r in runs) == NAMES
    assert [c["config"] for c in configs] == ["drop_layers=0", "drop_layers=1"] and all(c["seeds"] == "2" for c in configs)
    for c in configs:
        tests = [float(r["test_accuracy"]) for r in runs if r["config"] == c["config"]]
        assert float(c["test_accuracy_mean"]) == pytest.approx(np.mean(tests))
        assert float(c["test_accuracy_std"]) == pytest.approx(np.std(tests, ddof=1))
        summary = json.loads((finished_sweep / "runs" / f"{c['config']}_seed=0" / "summary.json").read_text())
        assert int(c["trainable_parameters"]) == summary["trainable_parameters"]
        assert float(c["trainable_share_pct"]) == pytest.approx(100 * summary["trainable_share"])
        account = summary["training_memory"]
        assert account["gradient_bytes"] == 4 * summary["trainable_parameters"] and account["saved_bytes"] > 0
        assert summary["training_memory_bytes"] == account["total_bytes"] > 4 * 3 * summary["trainable_parameters"]
    small, large = sorted(configs, key=lambda c: int(c["trainable_parameters"]))
    assert small["config"] == "drop_layers=1"  # one fewer side layer
    table = (finished_sweep / "results.md").read_text()
    assert "| drop_layers=0 | 2 |" in table and "±" in table
    for png in ("metric_vs_parameters.png", "metric_vs_memory.png"):
        assert (finished_sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads((finished_sweep / "sweep.json").read_text())
    assert [(p["seed"], len(p["members"])) for p in plan["passes"]] == [(0, 2), (1, 2)]  # one pass per seed


def test_killed_sweep_resumes_and_keeps_finished_runs(cache, finished_sweep, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"  # streamed from disk this time: the same batches as the finished sweep's RAM tier
    argv = ["--cache", str(cache), "--out", str(out), "--grid", *GRID, "--quiet", "--max-parallel", "1", "--tier", "disk",
            "--reader", "thread", *SHARED]
    real_step, calls = TrainState.step, {"n": 0}

    def dies_on_step_11(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:  # passes of one network, 6 steps each: the second one, mid epoch 1
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(TrainState, "step", dies_on_step_11)
    assert sweep_mod.main(argv) == 130
    assert "running them in 2 passes of at most 1" in capsys.readouterr().err
    first, killed = out / "runs" / "drop_layers=0_seed=0", out / "runs" / "drop_layers=1_seed=0"
    assert (first / "summary.json").is_file() and not (killed / "summary.json").exists()
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["progress"]["epoch"] == 1
    first = first / "summary.json"
    first_written = first.stat().st_mtime_ns
    monkeypatch.setattr(TrainState, "step", real_step)
    assert sweep_mod.main(argv) == 0
    assert first.stat().st_mtime_ns == first_written  # kept, not retrained
    for name in NAMES:
        assert records(out / "runs" / name / "metrics.jsonl") == records(finished_sweep / "runs" / name / "metrics.jsonl"), name
        assert same_weights(out / "runs" / name / "side_model", finished_sweep / "runs" / name / "side_model")
    assert sweep_mod.main(argv) == 0  # all finished: nothing to train, tables rewritten
    assert "| drop_layers=1 | 2 |" in (out / "results.md").read_text()


def test_configs_file_and_errors(cache, tmp_path, capsys):
    path = tmp_path / "configs.yaml"
    path.write_text("grid:\n  lr: [1e-2, 3e-3]\nconfigs:\n  - {name: top, side_layers: [1, 2]}\n  - {reduction: 8}\n")
    grid, entries = sweep_plan.load_config_file(path)
    assert grid == {"lr": ["1e-2", "3e-3"]} and entries == [{"name": "top", "side_layers": "1,2"}, {"reduction": "8"}]
    configurations = sweep_plan.expand(entries, grid)
    assert len(configurations) == 4 and configurations[0] == {"lr": "1e-2", "name": "top_lr=1e-2", "side_layers": "1,2"}
    # a named entry crossed with the grid: each point its own folder; a key the entry sets is not repeated
    assert [sweep_plan.member_name(c) for c in configurations] == ["top_lr=1e-2", "top_lr=3e-3", "lr=1e-2_reduction=8",
                                                                    "lr=3e-3_reduction=8"]
    assert [c["name"] for c in sweep_plan.expand([{"name": "fast", "lr": "1e-2"}], {"lr": ["1e-3"], "seed": ["0", "1"]})] == [
        "fast_seed=0", "fast_seed=1"]
    assert sweep_plan.expand([{"name": "only"}], {}) == [{"name": "only"}]
    assert sweep_plan.parse_grid(["reduction=4,8", "lr=1e-3"]) == {"reduction": ["4", "8"], "lr": ["1e-3"]}
    path.write_text('[{"merge_final": true, "recompute": false}]')
    assert sweep_plan.load_config_file(path) == ({}, [{"merge_final": "true", "recompute": "false"}])
    varied = sweep_plan.with_options(RunConfig(), {"merge_final": "yes", "pooling": "last", "lr": "1e-3"}, "test")
    assert (varied.side.merge_final, varied.side.pooling, varied.train.lr) == (True, "last", 1e-3)
    with pytest.raises(UserError, match="merge_final='maybe' is not a valid bool"):
        sweep_plan.with_options(RunConfig(), {"merge_final": "maybe"}, "test")
    assert sweep_plan.parse_bytes("1.5GiB") == 3 * 2**29 and sweep_plan.parse_bytes("500MB") == 500 * 2**20
    for bad in (["lr"], ["lr="], ["lr=1", "lr=2"]):
        with pytest.raises(UserError, match="--grid"):
            sweep_plan.parse_grid(bad)
    with pytest.raises(UserError, match="memory-budget"):
        sweep_plan.parse_bytes("lots")
    base = ["--cache", str(cache), "--out", str(tmp_path / "bad"), "--quiet"]
    for grid_item, message in (("width=1,2", "not a setting a sweep can vary"), ("limit=5,6", "fixed for the whole sweep"),
                               ("reader=inline,thread", "fixed for the whole sweep"),
                               ("reduction=5,8", "does not divide"), ("reduction=8,abc", "reduction='abc' is not a valid int")):
        assert sweep_mod.main([*base, "--grid", grid_item]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err  # one line, no usage text
    assert sweep_mod.main([*base, "--grid", "reduction=8,16", "--reduction", "4"]) == 2
    assert "both in the grid and a shared flag (--reduction)" in capsys.readouterr().err
    assert sweep_mod.main([*base, "--grid", "reduction=8,16", "--reduc", "4"]) == 2  # no abbreviations
    assert "unrecognized arguments: --reduc 4" in capsys.readouterr().err
    assert sweep_mod.main([*base, "--grid", "reduction=8", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    # --out: never into a cache, a run folder or a file; a sweep refused for lack of Fisher scores writes no run folder
    for target, message in ((cache, "is a cache"), (tmp_path / "afile", "is a file")):
        (tmp_path / "afile").write_text("x")
        assert sweep_mod.main(["--cache", str(cache), "--out", str(target), "--quiet", "--grid", "reduction=8"]) == 2
        assert message in capsys.readouterr().err
    assert not (cache / "runs").exists()
    no_fisher = tmp_path / "no_fisher"  # the cache has magnitude scores only; the default --init is fisher
    assert sweep_mod.main(["--cache", str(cache), "--out", str(no_fisher), "--quiet", "--grid", "reduction=8"]) == 2
    assert "Fisher" in capsys.readouterr().err and not (no_fisher / "runs").exists()


def test_plan_passes_respects_budget_and_count():
    def member(name: str, resident: int, step: int) -> Member:
        m = Member(name, None, None, None, Path(name), {})
        m.resident_bytes, m.step_bytes = resident, step
        return m

    members = [member(str(i), r, 10) for i, r in enumerate([30, 20, 20, 40, 5])]  # alone: 40, 30, 30, 50, 15
    resident = lambda passes: [[m.resident_bytes for m in p] for p in passes]  # noqa: E731
    assert sweep_plan.pass_bytes(members) == 125  # steps run one at a time: one step's memory on top
    assert resident(sweep_plan.plan_passes(members, None, 0)) == [[30, 20, 20, 40, 5]]
    assert resident(sweep_plan.plan_passes(members, 80, 0)) == [[30, 20, 20], [40, 5]]
    assert resident(sweep_plan.plan_passes(members, 80, 2)) == [[30, 20], [20, 40], [5]]
    assert resident(sweep_plan.plan_passes(members, 20, 0)) == [[30], [20], [20], [40], [5]]  # too big alone: still runs
