"""side_train.compare (and compare_run, compare_report), .baselines and .memory: the accounting,
the method sizes, the baselines' scoring, the CLI and the equal-budget training."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import needs_minilm
from torch import nn

from side_train import compare as C
from side_train import compare_run as R
from side_train.baselines import build_baseline
from side_train.families import side_family
from side_train.memory import SavedTensorCounter, account, parameter_count, storage_bytes

BATCH, LENGTH = 3, 12


def setup(model: str, *extra: str):
    args = C.parse_args(["--model", model, "--task", "synthetic", "--batch-size", str(BATCH), "--max-length", str(LENGTH), *extra])
    reference = R.fresh_backbone(args, torch.device("meta"))
    spec, plans = R.synthetic_plans(reference, LENGTH, BATCH, 0)
    return args, spec, R.token_inputs(plans["train"], np.arange(BATCH), side_family(reference.family).train_stacks)


def measure(method: str, args, spec, batch, device: str, watch: bool = False):
    prepared = R.prepare(method, args, spec, torch.device(device))
    memory, counter = R.measure_memory(prepared, batch.to(torch.device(device)), watch_backbone=watch)
    return prepared, memory, counter


def minilm_path() -> str:
    from shared.backbones import default_model_dir

    return str(default_model_dir())


# --- the counter itself ---------------------------------------------------------------------


def test_counter_counts_each_storage_once_and_skips_parameters_and_inputs():
    linear = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    with SavedTensorCounter() as everything:
        linear(x)
    assert everything.saved_bytes == x.nbytes  # the input, for the weight gradient
    with SavedTensorCounter() as everything:
        linear(x.clone().requires_grad_(True))
    assert everything.saved_bytes == x.nbytes + linear.weight.nbytes  # and the weight, for the input gradient
    with SavedTensorCounter(exclude=[*linear.parameters(), x]) as counter:
        y = linear(x)  # saves x (an input) and the weight (a parameter): neither counted here
        z = (y * y[1:2]).sum()  # saves y and a view of it: one storage
    assert counter.saved_bytes == y.nbytes and len(counter.saved) == 1
    z.backward()
    memory = account(linear, [x], counter)
    assert memory.parameter_bytes == (8 * 4 + 4) * 4
    assert memory.gradient_bytes == memory.parameter_bytes and memory.optimizer_bytes == 2 * memory.parameter_bytes
    assert memory.total_bytes == 4 * memory.parameter_bytes + y.nbytes + x.nbytes


def test_counter_sees_nothing_under_inference_mode():
    linear = nn.Linear(8, 4)
    with SavedTensorCounter() as counter, torch.inference_mode():
        linear(torch.randn(5, 8))
    assert counter.saved_bytes == 0


def test_counting_changes_no_gradient_and_keeps_no_graph_alive(tiny_t5):
    import weakref

    args, spec, batch = setup(str(tiny_t5))
    prepared = R.prepare("lora", args, spec, torch.device("cpu"))
    module = prepared.module.eval()
    module.loss(batch).backward()
    plain = [p.grad.clone() for p in module.parameters() if p.requires_grad]
    module.zero_grad()
    with SavedTensorCounter():
        loss = module.loss(batch)
    loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, [p for p in module.parameters() if p.requires_grad]))
    # measuring runs no backward; the graph (and through it the model) must still be freed
    prepared = R.prepare("full", args, spec, torch.device("cpu"))
    alive = weakref.ref(prepared.module)
    R.measure_memory(prepared, batch)
    del prepared
    assert alive() is None


# --- meta accounting is the real accounting ---------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_t5", pytest.param("minilm", marks=needs_minilm)])
def test_synthetic_batches_are_exactly_max_length_and_unpadded(model, request):
    path = minilm_path() if model == "minilm" else str(request.getfixturevalue("tiny_t5"))
    args, spec, batch = setup(path)
    reference = R.fresh_backbone(args, torch.device("meta"))
    primary = reference.stacks()[0].name
    ids = batch.tokens[primary]["input_ids"]
    assert ids.shape == (BATCH, LENGTH) and not batch.padded
    assert int(ids.min()) >= 1000 and len(set(ids.flatten().tolist())) > LENGTH  # random tokens, not the tokenizer's
    for name, values in batch.tokens[primary].items():
        if name not in ("input_ids", "attention_mask"):
            assert not values.any(), name  # e.g. token_type_ids: zeros
    assert set(batch.tokens) == set(side_family(reference.family).train_stacks)
    assert batch.mask(primary) is None and "attention_mask" not in batch.model_tokens()[primary]


@pytest.mark.parametrize("method", R.METHODS)
@pytest.mark.parametrize("model", ["tiny_t5", pytest.param("minilm", marks=needs_minilm)])
def test_meta_device_counts_the_same_bytes_as_a_cpu_step(model, method, request):
    path = minilm_path() if model == "minilm" else str(request.getfixturevalue("tiny_t5"))
    args, spec, batch = setup(path)
    _, cpu, _ = measure(method, args, spec, batch, "cpu")
    _, meta, _ = measure(method, args, spec, batch, "meta")
    assert cpu.saved_bytes > 0 and cpu.parameter_bytes > 0
    if method == "prompt":
        # peft moves the [1, tokens] prompt index to the device and expands it over the batch:
        # a no-op view on the CPU, a [batch, tokens] int64 copy on any other device.
        assert meta.saved_bytes - cpu.saved_bytes == (BATCH - 1) * args.sizes.prompt_tokens * 8
        meta.saved_bytes = cpu.saved_bytes
    assert cpu == meta


@pytest.mark.parametrize("method", ["lst-cached", "lst-live"])
def test_meta_accounting_covers_the_folded_lm_head(tiny_t5, monkeypatch, method):
    """Large label batches take the folded LM head (side_train.kernels.fold_pays); meta counts it alike."""
    monkeypatch.setattr("side_train.kernels.fold_pays", lambda *args: True)
    args, spec, batch = setup(str(tiny_t5))
    _, cpu, _ = measure(method, args, spec, batch, "cpu")
    _, meta, _ = measure(method, args, spec, batch, "meta")
    assert cpu == meta


# --- what the LST methods hold and save -----------------------------------------------------------


def test_lst_live_saves_no_backbone_activation(tiny_t5):
    args, spec, batch = setup(str(tiny_t5))
    prepared, live, counter = measure("lst-live", args, spec, batch, "cpu", watch=True)
    assert counter.watched_outputs, "the backbone ran under the watch"
    assert counter.saves_inside_watched == 0
    assert not set(counter.saved) & counter.watched_outputs
    # the side network saves the same tensors as from a cache, plus the bf16 ladder states
    # themselves, which live mode makes in the step and a cached step receives as its input
    prepared_cached, cached, _ = measure("lst-cached", args, spec, batch, "cpu")
    inputs = prepared_cached.inputs(batch)
    assert set(inputs.states) == {"encoder", "decoder"}
    assert live.saved_bytes - cached.saved_bytes == sum(s.nbytes for s in inputs.states.values()) > 0
    # the check has teeth: fine-tuning the backbone saves inside it
    _, _, full = measure("full", args, spec, batch, "cpu", watch=True)
    assert full.saves_inside_watched > 0 and set(full.saved) & full.watched_outputs


def test_lst_cached_holds_no_backbone_parameter(tiny_t5):
    args, spec, batch = setup(str(tiny_t5))
    prepared, memory, _ = measure("lst-cached", args, spec, batch, "cpu")
    side = prepared.module
    assert prepared.frozen is None
    from transformers import PreTrainedModel

    assert not any(isinstance(m, PreTrainedModel) for m in side.modules())
    lm_head = side.lm_head
    assert memory.parameter_bytes == sum(p.nbytes for p in side.parameters()) + lm_head.nbytes
    assert memory.gradient_bytes == sum(p.nbytes for p in side.parameters())
    backbone = R.fresh_backbone(args, torch.device("cpu"))
    assert not set(storage_bytes(backbone.model.parameters())) & set(storage_bytes(side.parameters()))
    # LST-live adds the whole backbone, whose LM head the side network then shares instead of copying
    live, live_memory, _ = measure("lst-live", args, spec, batch, "cpu")
    backbone_bytes = sum(p.nbytes for p in backbone.model.parameters()) + sum(b.nbytes for b in backbone.model.buffers())
    assert live_memory.parameter_bytes - memory.parameter_bytes == backbone_bytes - lm_head.nbytes
    assert live_memory.total_bytes > memory.total_bytes


def test_recompute_trades_saved_activations_for_one_block(tiny_t5):
    args, spec, batch = setup(str(tiny_t5))
    _, plain, plain_counter = measure("lst-cached", args, spec, batch, "cpu")
    prepared, recompute, _ = measure("lst-cached-recompute", args, spec, batch, "cpu")
    assert plain.recompute_bytes == 0 and recompute.recompute_bytes > 0
    assert recompute.parameter_bytes == plain.parameter_bytes and recompute.input_bytes == plain.input_bytes
    # what the blocks saved is gone (their inputs stay); one block's saves come back in backward.
    # (This tiny model's saves are mostly its 30,522-word logits, which recomputation keeps.)
    assert plain.saved_bytes - recompute.saved_bytes > 2 * recompute.recompute_bytes
    assert recompute.total_bytes < plain.total_bytes
    assert all(stack.recompute for stack in prepared.module.ladder_stacks()), "the accounting pass restores the setting"


# --- sizes match the paper on a T5-base-shaped model ----------------------------------------------


def t5_base_on_meta():
    from transformers import T5Config, T5ForConditionalGeneration

    from shared.families import T5Backbone

    config = T5Config(vocab_size=30522, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                      decoder_start_token_id=0, pad_token_id=0)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    return T5Backbone(model, None, "t5-base-shape", None, torch.device("meta"), torch.float32)


def binary_spec():
    from shared.tasks import TaskSpec

    return TaskSpec("binary", ["sentence"], "class", ["0", "1"], ["sentence:"], ["accuracy"], 1)


@pytest.mark.parametrize("method, expected", [
    ("adapter", 48 * (2 * 768 * 48 + 48 + 768) + 62 * 768),  # 2 adapters x 24 blocks, plus 62 layer norms
    ("lora", 72 * 32 * (768 + 768)),  # q and v of 12 + 24 attentions, rank 32
    ("bitfit", 12 * (5 * 768 + 3072) + 12 * (9 * 768 + 3072) + 30522 + 62 * 768),  # biases on every linear + layer norms
    ("prompt", 100 * 768),
])
def test_baseline_sizes_match_the_paper_on_t5_base(method, expected):
    backbone = t5_base_on_meta()
    total = parameter_count(backbone.model)
    trainable = parameter_count(build_baseline(method, backbone, binary_spec()), trainable_only=True)
    assert trainable == expected
    paper = {"adapter": 1.63, "lora": 1.71, "bitfit": 0.13, "prompt": 0.03}[method]
    assert abs(100 * trainable / total - paper) < 0.15


def test_adapters_start_as_the_identity(tiny_t5):
    args, spec, batch = setup(str(tiny_t5))
    plain = R.fresh_backbone(args, torch.device("cpu")).model.eval()
    adapted = build_baseline("adapter", R.fresh_backbone(args, torch.device("cpu")), spec).eval()
    kwargs = {"input_ids": batch.tokens["encoder"]["input_ids"], "decoder_input_ids": batch.tokens["decoder"]["input_ids"]}
    torch.testing.assert_close(adapted.model(**kwargs).logits, plain(**kwargs).logits)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) > 0


def test_seq2seq_candidate_scores_are_the_label_log_likelihoods(tiny_t5):
    """A T5 baseline scores each candidate label by its summed log-probability, here against
    transformers' own loss on each (example, candidate) pair, unpadded, one at a time."""
    args = C.parse_args(["--model", str(tiny_t5), "--limit", "6"])
    backbone = R.fresh_backbone(args, torch.device("cpu"))
    spec, plans = R.task_plans(args, backbone)
    module = build_baseline("full", backbone, spec).eval()
    plan = plans["test"]
    network = side_family(backbone.family)
    inputs = R.token_inputs(plan, np.arange(plan.num_examples), network.eval_stacks)
    assert inputs.padded, "the batch mixes lengths, so the masks are used"
    scores = module.score_candidates(inputs)
    candidates = plan.inputs["candidates"]
    k = len(spec.candidates())
    expected = torch.zeros(plan.num_examples, k)
    with torch.no_grad():
        for row in range(plan.num_examples):
            source = torch.tensor([plan.inputs["encoder"]["input_ids"][row]])
            for j in range(k):
                labels = torch.tensor([candidates["labels"][row * k + j]])
                loss = module.model(input_ids=source, labels=labels).loss
                expected[row, j] = -loss * labels.shape[1]
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    values = module.predict(inputs)
    assert values.dtype == torch.float64 and torch.equal(values, expected.argmax(-1).double())


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_writes_table_csv_json_and_plot(tiny_t5, tmp_path, capsys):
    out = tmp_path / "cmp"
    methods = ["full", "prompt", "lst-live", "lst-cached"]
    status = C.main(["--model", str(tiny_t5), "--task", "synthetic", "--batch-size", "2", "--max-length", "8",
                     "--methods", ",".join(methods), "--time-steps", "1", "--out", str(out), "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| Full fine-tuning | 100.000 |" in printed and "LST (from cache)" in printed
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["method"] for r in rows] == methods
    by = {r["method"]: r for r in rows}
    assert float(by["full"]["memory_vs_full"]) == 1.0
    assert int(by["lst-cached"]["total_bytes"]) < int(by["lst-live"]["total_bytes"]) < int(by["full"]["total_bytes"])
    assert all(float(r["seconds_per_step"]) > 0 for r in rows)
    settings = json.loads((out / "compare.json").read_text())["settings"]
    assert settings["source_tokens"] == 8 and settings["batch_size"] == 2
    assert (out / "compare.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "full,dora"], "unknown method 'dora'"),
    (["--task", "synthetic", "--train-steps", "5"], "synthetic"),
    (["--memory-on", "meta"], "--memory-on meta"),
    (["--lr", "lora:1e-3"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lst-init", "magnitude"], "unrecognized arguments: --lst-init"),
    (["--init", "pruned"], "--init"),
    (["--cache", "somewhere"], "--cache"),
    (["--limit", "0"], "--limit"),
])
def test_cli_bad_input_is_one_line(argv, needle, capsys):
    assert C.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_equal_budget_training_live_and_cached_agree(tiny_t5, tmp_path):
    """A short run from the cache and one with the backbone live see the same states and rows."""
    out = tmp_path / "train"
    status = C.main(["--model", str(tiny_t5), "--limit", "16", "--batch-size", "8", "--max-length", "16",
                     "--methods", "lst-live,lst-cached", "--time-steps", "0", "--train-steps", "3", "--init", "magnitude",
                     "--out", str(out), "--quiet"])
    assert status == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    assert any((out / "cache").iterdir()), "LST-cached trained from an extracted cache"
    live, cached = rows["lst-live"], rows["lst-cached"]
    assert int(live["lr"] == cached["lr"]) and float(live["train_loss_last"]) > 0
    # the cache's states come from differently padded batches; bf16 rounding may differ in a few elements
    assert float(live["train_loss_last"]) == pytest.approx(float(cached["train_loss_last"]), rel=1e-2)
    assert float(live["test_score"]) == pytest.approx(float(cached["test_score"]), abs=100 / 16 * 2 + 1e-6)


def test_compare_trains_lst_cached_as_side_train_run_does(tiny_t5, tmp_path):
    """compare's equal budget is side_train.train's loop with compare's settings: the same steps with
    side_train.run on the cache compare extracted end in the same loss and the same test score."""
    import json

    from side_train import run as solo

    out = tmp_path / "cmp"
    assert C.main(["--model", str(tiny_t5), "--limit", "16", "--batch-size", "8", "--max-length", "16", "--methods", "lst-cached",
                   "--time-steps", "0", "--train-steps", "3", "--init", "magnitude", "--out", str(out), "--quiet"]) == 0
    row = next(csv.DictReader(open(out / "compare.csv")))
    run_dir = tmp_path / "run"  # 2 batches per epoch: 3 steps end in the second epoch; 10% warmup is 1 step
    assert solo.main(["--cache", str(out / "cache"), "--out", str(run_dir), "--init", "magnitude", "--batch-size", "8", "--epochs", "2",
                      "--max-steps", "3", "--lr", row["lr"], "--warmup-steps", "1", "--weight-decay", "0", "--clip", "1",
                      "--precision", "fp32", "--seed", "0", "--quiet"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 3 and round(losses[-1], 5) == float(row["train_loss_last"])
    assert records[-1]["type"] == "eval" and records[-1]["test"]["score"] == pytest.approx(float(row["test_score"]))


def test_equal_budget_training_of_a_seq2seq_baseline(tiny_t5, tmp_path):
    """Prompt tuning through peft on T5, scored by the summed log-probability of each label string."""
    out = tmp_path / "train"
    status = C.main(["--model", str(tiny_t5), "--limit", "16", "--batch-size", "8", "--max-length", "16", "--methods", "prompt",
                     "--prompt-tokens", "4", "--time-steps", "0", "--train-steps", "2", "--lr", "prompt=0.1", "--out", str(out), "--quiet"])
    assert status == 0
    row = next(csv.DictReader(open(out / "compare.csv")))
    assert float(row["lr"]) == 0.1 and int(row["trainable_parameters"]) == 4 * 64
    assert float(row["train_loss_last"]) > 0
    for split in ("validation", "test"):  # accuracies over 16 examples (what they score: the test above)
        correct = float(row[f"{split}_score"]) * 16 / 100
        assert 0 <= correct <= 16 and correct == pytest.approx(round(correct), abs=0.01), row


@needs_minilm
def test_equal_budget_training_learns_the_real_task(tmp_path):
    """On the embedded MiniLM and Rotten Tomatoes, full fine-tuning and LST (live, and from the cache
    compare extracts) end well above the majority class after the same 40 steps, and live and
    cached LST, which see the same states up to bf16 rounding, agree."""
    from shared.config import DataConfig

    out = tmp_path / "train"
    status = C.main(["--limit", "200", "--batch-size", "20", "--max-length", "48", "--methods", "full,lst-live,lst-cached",
                     "--time-steps", "0", "--train-steps", "40", "--lr", "full=2e-4", "--init", "magnitude",
                     "--out", str(out), "--quiet"])
    assert status == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    _, splits = DataConfig(limit=200).load()
    for split in ("validation", "test"):
        positive = float(np.mean([ex.label for ex in splits[split]]))
        majority = 100 * max(positive, 1 - positive)  # 57.0 and 53.5 here
        for method, row in rows.items():
            assert float(row[f"{split}_score"]) >= majority + 6, (method, split, row[f"{split}_score"], majority)
    live, cached = rows["lst-live"], rows["lst-cached"]
    assert float(live["train_loss_last"]) == pytest.approx(float(cached["train_loss_last"]), rel=5e-2)
    assert abs(float(live["test_score"]) - float(cached["test_score"])) <= 1.5  # at most 3 of the 200 examples
