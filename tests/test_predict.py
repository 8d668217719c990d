"""side_train.predict: a trained run labels new texts live, or a cached split, the same way."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
from conftest import T5_EXTRACT_ARGS, run_cli

from side_train.predict import Predictor
from side_train.predict import main as predict_main


@pytest.fixture(scope="module")
def short_run(tiny_t5, tmp_path_factory):
    """A cache cut at 24 tokens (not the default 128) and a short run trained from it."""
    root = tmp_path_factory.mktemp("predict")
    cache, run = root / "cache", root / "run"
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(cache), *T5_EXTRACT_ARGS,
            "--max-length", "24", "--init", "random")
    run_cli("side_train.run", "--cache", str(cache), "--out", str(run), "--max-steps", "3", "--init", "magnitude", "--quiet")
    return cache, run


def test_texts_are_cut_at_the_lengths_the_run_trained_on(short_run):
    cache, run = short_run
    config = json.loads((run / "config.json").read_text())
    assert config["inputs"] == {"max_length": 24, "max_target_length": 128}
    assert Predictor.from_run(run, "cpu").max_length == 24  # not side_train.run's own --max-length default


def test_a_side_model_folder_describes_itself(short_run):
    """side_model/ names its backbone, and loading it reads the frozen LM head from that backbone's
    safetensors alone: the reloaded network equals the trained one, head included."""
    import torch
    from safetensors.torch import load_file

    from side_train.model import from_pretrained

    cache, run = short_run
    side = json.loads((run / "side_model" / "side_config.json").read_text())
    assert side["family"] == "t5" and side["backbone"]["name"].endswith("tiny_t50")
    assert len(side["backbone"]["config_fingerprint"]) == 64
    model = from_pretrained(run / "side_model")
    backbone_weights = load_file(str(next(__import__("pathlib").Path(side["backbone"]["name"]).glob("*.safetensors"))))
    assert torch.equal(model.lm_head, backbone_weights["shared.weight"].float())
    trained = load_file(str(run / "checkpoint" / "model.safetensors"))  # the weights the last step left
    assert trained.keys() == model.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())


def test_live_texts_get_the_labels_of_their_cached_states(short_run, tmp_path):
    cache, run = short_run
    cached = run_cli("side_train.predict", "--run", str(run), "--cache", str(cache), "--split", "validation",
                     "--out", str(tmp_path / "cached.csv"))
    assert "wrote 40 predictions" in cached.stdout
    with open(tmp_path / "cached.csv", encoding="utf-8") as handle:
        by_id = {row["example_id"]: row["prediction"] for row in csv.DictReader(handle)}
    examples = pq.read_table(cache / "validation" / "examples.parquet").to_pylist()[:8]
    live = Predictor.from_run(run, "cpu").predict_texts([row["texts"] for row in examples])
    assert set(live) <= {"rotten", "fresh"} and len(live) == 8
    # the backbone run live gives the cached states to within a bf16 rounding step: the same labels
    # (bar near-ties after 3 training steps: chance agreement would be about 4 of 8)
    agree = sum(label == by_id[row["example_id"]] for label, row in zip(live, examples, strict=True))
    assert agree >= 6, (live, [by_id[row["example_id"]] for row in examples])
    texts = run_cli("side_train.predict", "--run", str(run), "--text", examples[0]["texts"][0])
    assert texts.stdout.strip().split("\t")[-1] == live[0]


def one_line_error(capsys, *argv: str) -> str:
    """side_train.predict's main in this process (no interpreter start per case): exit 2, one error line."""
    assert predict_main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_predict_input_is_one_line(short_run, tmp_path, capsys):
    cache, run = short_run
    assert "not a run folder" in one_line_error(capsys, "--run", str(tmp_path / "nowhere"), "--text", "x")
    assert "nothing to predict" in one_line_error(capsys, "--run", str(run), "--device", "cpu")
    assert "text field" in one_line_error(capsys, "--run", str(run), "--text", "a ||| b", "--device", "cpu")
    # --out: never a folder, never over an existing file unless asked
    for out in (tmp_path, tmp_path / "nowhere" / "p.csv"):
        assert "must be a file" in one_line_error(capsys, "--run", str(run), "--text", "x", "--out", str(out))
    kept = tmp_path / "kept.csv"
    kept.write_text("mine")
    message = one_line_error(capsys, "--run", str(run), "--text", "x", "--out", str(kept))
    assert "exists" in message and "--overwrite" in message and kept.read_text() == "mine"
    assert predict_main(["--run", str(run), "--text", "x", "--out", str(kept), "--overwrite", "--device", "cpu"]) == 0
    assert kept.read_text().startswith("text,prediction")
    # a cache of another task: refused, not relabelled
    manifest = json.loads((cache / "manifest.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for item in cache.iterdir():
        (other / item.name).symlink_to(item)
    (other / "manifest.json").unlink()
    manifest["task"]["label_names"] = ["no", "yes"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    message = one_line_error(capsys, "--run", str(run), "--cache", str(other), "--split", "validation", "--device", "cpu")
    assert "holds task" in message and "the run's task" in message
    assert "no 'candidates' states" in one_line_error(capsys, "--run", str(run), "--cache", str(cache), "--split", "train",
                                                         "--device", "cpu")
