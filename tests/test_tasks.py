"""Data a new user brings: continuous labels, and backbones of no supported family."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli
from make_tiny_t5 import copy_tokenizer

from shared.errors import UserError
from shared.tasks import infer_label_kind, load_local


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "score"])
        writer.writerows(rows)
    return path


def scores_files(tmp_path: Path) -> dict[str, Path]:
    words = ["good", "fine", "bad", "great", "awful", "okay", "dull", "superb"]
    train = [(f"a {w} film {i}", f"{(i * 0.37) % 5:.9f}") for i, w in enumerate(words * 3)]
    validation = [("a gorgeous film", "2.463917526"), ("a dull film", "0.5")]
    return {"train": write_csv(tmp_path / "train.csv", train), "validation": write_csv(tmp_path / "validation.csv", validation)}


def test_a_csv_of_float_scores_is_regression(tmp_path, capsys):
    spec, splits = load_local(scores_files(tmp_path), ["text"], "score")
    assert spec.label_kind == "regression" and spec.metrics == ["pearson", "spearman"]
    assert "treating the task as regression" in capsys.readouterr().err
    assert splits["validation"][0].label == pytest.approx(2.463917526)


def test_integer_labels_stay_classes_and_class_is_forced_on_request(tmp_path):
    files = {"train": write_csv(tmp_path / "train.csv", [("a", "1"), ("b", "0"), ("c", "2")]),
             "validation": write_csv(tmp_path / "validation.csv", [("d", "2")])}
    spec, _ = load_local(files, ["text"], "score")
    assert spec.label_kind == "class" and spec.label_names == ["0", "1", "2"]
    assert infer_label_kind(["1", "2.5", "x"]) == "class"  # not all numbers: classes
    (tmp_path / "f").mkdir()
    floats = scores_files(tmp_path / "f")
    with pytest.raises(UserError, match="for continuous scores pass --label-kind regression"):
        load_local(floats, ["text"], "score", "class")  # forced classes: validation's 2.46 is no training label


def test_regression_extraction_and_training_report_correlations(tmp_path, tiny_t5):
    files = scores_files(tmp_path)
    cache = tmp_path / "cache"
    proc = run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--task", "local", "--data", f"train={files['train']}",
                   "--data", f"validation={files['validation']}", "--splits", "train,validation", "--text-fields", "text",
                   "--label-field", "score", "--out", str(cache), "--init", "random", "--quiet")
    assert "treating the task as regression" in proc.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["task"]["label_kind"] == "regression"
    run_cli("side_train.run", "--cache", str(cache), "--out", str(tmp_path / "run"), "--max-steps", "2", "--init", "magnitude",
            "--quiet")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"pearson", "spearman"} <= set(summary["validation_last"])


def test_a_model_of_no_supported_family_is_refused(tmp_path):
    """An encoder-decoder that is not T5: one line naming the families that are supported."""
    from transformers import BartConfig, BartModel

    folder = tmp_path / "bart"
    folder.mkdir()
    copy_tokenizer(folder)
    BartModel(BartConfig(vocab_size=30522, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)).save_pretrained(folder)
    proc = run_cli("backbone_cache.extract", "--model", str(folder), "--out", str(tmp_path / "c"), "--limit", "4", check=False)
    assert_one_line_error(proc, "'bart' is an encoder-decoder model of no supported family", "supported: t5", "encoder (BERT")
    assert not (tmp_path / "c").exists()
