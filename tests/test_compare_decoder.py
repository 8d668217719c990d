"""side_train.compare on a decoder backbone: every arm runs, the baselines score label words as the
side network does (checked against the model's own logits), LoRA trains only LoRA, QLoRA is a
skipped row without a GPU, and on an easy task the trained arms beat chance.

The backbone is a tiny random Llama (or Qwen2) over a small byte-level BPE trained here on the
task's own words, with two-token label words (" awful film", " great film") so that the
multi-token scoring path runs.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from side_train import compare as C
from side_train import compare_run as R
from side_train.baselines import qlora_unavailable

GOOD = ["lovely", "superb", "charming", "brilliant", "moving", "witty"]
BAD = ["dull", "boring", "clumsy", "tedious", "bland", "messy"]
FILLER = ["the", "plot", "cast", "movie", "story", "was", "and", "quite", "really", "scenes"]
LABELS = ("awful film", "great film")
SIZES = {"train": 96, "validation": 32, "test": 32}


def sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
    for _ in range(2):
        words.insert(rng.randint(0, len(words)), rng.choice(GOOD if label else BAD))
    return " ".join(words)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    """An easy sentiment task: two words from the label's own list among neutral ones."""
    root = tmp_path_factory.mktemp("easy_task")
    rng = random.Random(0)
    files = {}
    for split, n in SIZES.items():
        files[split] = root / f"{split}.csv"
        with open(files[split], "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["text", "label"])
            writer.writeheader()
            for i in range(n):
                writer.writerow({"text": sentence(rng, i % 2), "label": LABELS[i % 2]})
    return files


def make_decoder(kind: str, folder: Path) -> Path:
    """A random 2-layer causal LM (hidden 64, 4 query heads over 2 KV heads) with a BPE that adds <bos>."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [" ".join(GOOD + BAD + FILLER), "Text: the movie\nAnswer: awful film", "Answer: great film"] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    common = dict(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = (transformers.LlamaConfig(**common, tie_word_embeddings=False) if kind == "llama"
              else transformers.Qwen2Config(**common, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # weights spread as a trained model's are (transformers' init, std 0.02, makes a pruned side tiny)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 * p.shape[1] ** -0.5 if p.shape[0] != len(fast) else 1.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_decoders")
    return {kind: make_decoder(kind, root / kind) for kind in ("llama", "qwen2")}


def data_flags(files: dict[str, Path]) -> list[str]:
    flags = ["--task", "local", "--text-fields", "text", "--label-field", "label", "--max-length", "32"]
    for split, path in files.items():
        flags += ["--data", f"{split}={path}"]
    return flags


def setup(model: Path, files: dict[str, Path], *extra: str):
    config = C.parse_args(["--model", str(model), *data_flags(files), "--batch-size", "8", *extra])
    reference = R.fresh_backbone(config, torch.device("meta"))
    spec, plans = R.task_plans(config, reference)
    return config, spec, plans


# --- the scoring ----------------------------------------------------------------------------


def slow_word_scores(backbone, example, spec) -> torch.Tensor:
    """Each label word's log-probability from the whole causal LM run on prompt + word alone, its full
    logits restricted to the candidates' first tokens (first token) and to all their tokens (later ones)."""
    from shared.families.decoder import first_token_classes, prompt_template

    template = prompt_template(spec)
    prompt = backbone.prompt_ids(example.texts, template, 32)
    words = backbone.candidate_token_ids(spec)
    firsts, first_class = first_token_classes(words)
    vocab = list(dict.fromkeys(t for w in words for t in w))
    scores = []
    for j, word in enumerate(words):
        ids = torch.tensor([prompt + word])
        with torch.no_grad():
            logits = backbone.model(input_ids=ids).logits[0].float()
        total = logits[len(prompt) - 1, firsts].log_softmax(-1)[first_class[j]]
        for t in range(1, len(word)):
            total += logits[len(prompt) - 1 + t, vocab].log_softmax(-1)[vocab.index(word[t])]
        scores.append(total)
    return torch.stack(scores)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_baseline_word_scores_equal_the_models_own_logits(decoders, task_files, kind):
    config, spec, plans = setup(decoders[kind], task_files)
    prepared = R.prepare("full", config, spec, torch.device("cpu"))
    module = prepared.module.eval()
    assert all(len(w) == 2 for w in module.words) and len({w[0] for w in module.words}) == 2
    plan = plans["test"]
    rows = np.arange(6)
    inputs = R.token_inputs(plan, rows, prepared.network_class.eval_stacks)
    assert inputs.padded  # prompts of different lengths: the packing and masks matter
    fast = module.score_candidates(inputs)
    backbone = R.fresh_backbone(config, torch.device("cpu"))  # the same seed-free weights, from the folder
    for row in rows:
        torch.testing.assert_close(fast[row], slow_word_scores(backbone, plan.examples[row], spec), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(module.predict(inputs).numpy(), fast.argmax(-1).double().numpy())


def test_last_token_head_matches_pooling_last(decoders, task_files):
    config, spec, plans = setup(decoders["llama"], task_files, "--pooling", "last")
    prepared = R.prepare("lora", config, spec, torch.device("cpu"))
    assert prepared.module.kind == "last" and prepared.module.head.out_features == 2
    lst = R.prepare("lst-cached", config, spec, torch.device("cpu"))
    assert lst.module.cfg.head == "last"
    inputs = R.token_inputs(plans["train"], np.arange(8), prepared.network_class.train_stacks)
    loss = prepared.module.loss(inputs)
    assert torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(Exception, match="no \\[CLS\\] token"):
        R.prepare("full", setup(decoders["llama"], task_files, "--pooling", "cls")[0], spec, torch.device("cpu"))


def test_lora_trains_only_lora_parameters(decoders, task_files):
    config, spec, plans = setup(decoders["llama"], task_files)
    prepared = R.prepare("lora", config, spec, torch.device("cpu"))
    module = prepared.module.train()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)
    assert {n.split("lora_")[0].rsplit(".", 2)[-2] for n in trainable} == {"q_proj", "v_proj"}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    inputs = R.token_inputs(plans["train"], np.arange(8), prepared.network_class.train_stacks)
    for _ in range(2):
        R.training_step(module, inputs, optimizer)
    for name, param in module.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name


def test_lst_cached_keeps_only_the_label_words_head_rows(decoders, task_files):
    config, spec, _ = setup(decoders["llama"], task_files)
    cached = R.prepare("lst-cached", config, spec, torch.device("cpu")).module
    live = R.prepare("lst-live", config, spec, torch.device("cpu")).module
    vocab = len({t for w in cached.cfg.candidate_tokens for t in w})
    assert cached.lm_head.shape == (vocab, 64) == live.side.lm_head.shape  # 3 rows: awful, great, film
    backbone = R.fresh_backbone(config, torch.device("cpu"))
    torch.testing.assert_close(live.side.lm_head, backbone.lm_head()[0][cached.vocab_ids])
    assert not any(p.requires_grad for p in live.frozen.parameters())


def test_qlora_without_a_gpu_is_a_skipped_row(decoders, task_files, tmp_path, capsys):
    assert "CUDA GPU" in qlora_unavailable(torch.device("cpu")) and "meta" in qlora_unavailable(torch.device("meta"))
    out = tmp_path / "q"
    assert C.main(["--model", str(decoders["qwen2"]), *data_flags(task_files), "--batch-size", "8", "--methods", "lora,qlora",
                   "--time-steps", "1", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| QLoRA (4-bit NF4 + LoRA) | skipped: needs a CUDA GPU" in table
    rows = {r["method"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    assert rows["qlora"]["skipped"].startswith("needs a CUDA GPU") and rows["qlora"]["total_bytes"] == ""
    assert float(rows["lora"]["total_bytes"]) > 0 and rows["lora"]["skipped"] == ""


@pytest.mark.parametrize("method", ["full", "lora", "lst-live", "lst-cached", "lst-cached-recompute"])
def test_meta_device_counts_the_same_bytes_as_a_cpu_step(decoders, method):
    """Shape studies (--random-init --task synthetic): the meta device counts a decoder step exactly as the CPU
    (lst-live too: its backbone runs on meta without reading a value)."""
    config = C.parse_args(["--model", str(decoders["qwen2"]), "--random-init", "--task", "synthetic", "--batch-size", "3",
                           "--max-length", "12"])
    reference = R.fresh_backbone(config, torch.device("meta"))
    spec, plans = R.synthetic_plans(reference, 12, 3, 0)
    batch = R.token_inputs(plans["train"], np.arange(3), ("decoder",))
    counted = {}
    for device in ("cpu", "meta"):
        prepared = R.prepare(method, config, spec, torch.device(device))
        counted[device], _ = R.measure_memory(prepared, batch.to(torch.device(device)))
    assert counted["cpu"].saved_bytes > 0 and counted["cpu"] == counted["meta"]


# --- every arm: measured, and the main ones trained --------------------------------------------


ARMS = ["full", "adapter", "lora", "bitfit", "prompt", "qlora", "lst-live", "lst-cached", "lst-cached-recompute"]
TRAINED = ["full", "lora", "lst-live", "lst-cached"]


def run_compare(model: Path, files: dict[str, Path], out: Path, methods: list[str], *extra: str) -> dict[str, dict]:
    assert C.main(["--model", str(model), *data_flags(files), "--batch-size", "16", "--methods", ",".join(methods),
                   "--eval-batch-size", "32", "--prompt-tokens", "4", "--adapter-width", "8", "--lora-rank", "4",
                   "--device", "cpu", "--out", str(out), "--quiet", *extra]) == 0
    return {r["method"]: r for r in csv.DictReader(open(out / "compare.csv"))}


def test_every_arm_runs_and_reports_its_columns(decoders, task_files, tmp_path):
    rows = run_compare(decoders["llama"], task_files, tmp_path, ARMS, "--time-steps", "1")
    assert list(rows) == ARMS and rows["qlora"]["skipped"]
    for method, row in rows.items():
        if method != "qlora":
            assert int(row["trainable_parameters"]) > 0 and float(row["total_bytes"]) > 0, row
            assert float(row["seconds_per_step"]) > 0 and not row["skipped"], row
    backbone = int(rows["full"]["trainable_parameters"])
    assert backbone == int(rows["full"]["backbone_parameters"])
    for method in ("adapter", "lora", "bitfit", "prompt", "lst-cached"):
        assert int(rows[method]["trainable_parameters"]) < backbone / 10, method
    assert int(rows["prompt"]["trainable_parameters"]) == 4 * 64
    cached, live = rows["lst-cached"], rows["lst-live"]
    assert float(cached["parameter_bytes"]) < float(live["parameter_bytes"]) / 2  # no backbone on the device
    assert float(cached["total_bytes"]) < float(rows["full"]["total_bytes"]) and float(cached["total_bytes"]) < float(rows["lora"]["total_bytes"])
    assert float(rows["lst-cached-recompute"]["saved_bytes"]) < float(cached["saved_bytes"])


def test_trained_arms_beat_chance_on_the_easy_task(decoders, task_files, tmp_path):
    """Chance is 50% (balanced labels); full fine-tuning, LoRA and LST (live and cached) learn the word
    lists in 40 steps; live and cached LST see the same states, so they end alike."""
    rows = run_compare(decoders["llama"], task_files, tmp_path, TRAINED, "--time-steps", "0", "--train-steps", "40",
                       "--init", "magnitude", "--lr", "full=3e-3", "--lr", "lora=1e-2", "--lr", "lst-live=1e-2",
                       "--lr", "lst-cached=1e-2")
    for method, row in rows.items():
        for split in ("validation", "test"):  # whole counts of examples
            correct = float(row[f"{split}_score"]) * SIZES[split] / 100
            assert correct == pytest.approx(round(correct), abs=0.02), (method, row[f"{split}_score"])
        assert float(row["test_score"]) >= 75.0, (method, row["test_score"])
    cached, live = rows["lst-cached"], rows["lst-live"]
    assert float(live["train_loss_last"]) == pytest.approx(float(cached["train_loss_last"]), rel=2e-2)
    assert abs(float(live["test_score"]) - float(cached["test_score"])) <= 100 / 32 + 1e-6


@pytest.mark.parametrize("method", ["lora", "lst-cached"])
def test_kept_predictions_give_the_reported_scores(decoders, task_files, tmp_path, method):
    """train_and_evaluate(keep_predictions=True): one label value per example, in order, whose
    accuracy is the split's reported score (what benchmarks pair between methods)."""
    config, spec, plans = setup(decoders["llama"], task_files, "--out", str(tmp_path), "--quiet", "--train-steps", "3")
    reference = R.fresh_backbone(config, torch.device("meta"))
    out = R.train_and_evaluate(method, config, spec, plans, torch.device("cpu"), reference, ("random", None),
                               keep_predictions=True)
    for split in ("validation", "test"):
        predictions = np.array(out[split]["predictions"])
        labels = np.array([float(ex.label) for ex in plans[split].examples])
        assert predictions.shape == (SIZES[split],) and set(predictions) <= {0.0, 1.0}
        assert out[split]["accuracy"] == pytest.approx(100 * float((predictions == labels).mean()))
    assert "predictions" not in R.train_and_evaluate(method, config, spec, plans, torch.device("cpu"), reference,
                                                     ("random", None))["test"]


def test_lst_arms_take_the_side_networks_options(decoders, task_files, tmp_path, capsys):
    """--merge-final adds its gate (one weight per backbone channel) to both LST arms; --standardize-ladders
    sets statistics from the states each arm trains on (identity statistics would leave the losses as they
    were), and live and cached LST, reading the same states, still end alike."""
    steps = ["--time-steps", "0", "--train-steps", "12", "--init", "magnitude", "--dropout", "0",
             "--lr", "lst-live=1e-2", "--lr", "lst-cached=1e-2"]
    plain = run_compare(decoders["llama"], task_files, tmp_path / "plain", ["lst-live", "lst-cached"], *steps)
    capsys.readouterr()
    options = run_compare(decoders["llama"], task_files, tmp_path / "options", ["lst-live", "lst-cached"], *steps,
                          "--merge-final", "--standardize-ladders")
    assert "LST side network: r = 8, dropout 0, --merge-final, --standardize-ladders" in capsys.readouterr().out
    for method in ("lst-live", "lst-cached"):
        assert int(options[method]["trainable_parameters"]) == int(plain[method]["trainable_parameters"]) + 64
    assert float(options["lst-live"]["train_loss_last"]) == pytest.approx(float(options["lst-cached"]["train_loss_last"]), rel=2e-2)
    standardized_only = run_compare(decoders["llama"], task_files, tmp_path / "std", ["lst-cached"], *steps, "--standardize-ladders")
    assert float(standardized_only["lst-cached"]["train_loss_last"]) != pytest.approx(float(plain["lst-cached"]["train_loss_last"]),
                                                                                       rel=1e-3)
