"""Instruction / causal-LM tuning on decoders: jsonl prompts and responses, the response-only loss
through the full-vocabulary head in chunks, cached == live, the response-token loss and perplexity.

Tiny random Gemma 3 and Llama models over the byte-level tokenizer of tests/test_decoder.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_decoder import make_tiny_decoder, rt_examples, tokenizer_dir  # noqa: F401  (tokenizer_dir: a fixture)

from backbone_cache.plan import plan_split
from shared.backbones import load_backbone
from shared.errors import UserError
from shared.families.decoder import chunked_token_nll
from shared.tasks import load_instruct, load_task
from shared.tokens import LABEL_PAD
from side_train.data import LiveSplit
from side_train.families.decoder import DecoderSideNetwork
from side_train.model import SideOptions
from side_train.run import parse_args, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("instruct")
    return {kind: make_tiny_decoder(kind, root / kind, tokenizer_dir) for kind in ("gemma3", "llama")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train / validation / test jsonl: the start of a review as the prompt, more of it as the response."""
    folder = tmp_path_factory.mktemp("instruct_data")
    for split, start in (("train", 0), ("validation", 40), ("test", 60)):
        rows = []
        for ex in rt_examples(16 if split == "train" else 8, start):
            words = ex.texts[0].split()
            rows.append({"prompt": "Continue: " + " ".join(words[:4]) + "\n", "response": " ".join(words[4:10]) or "ok"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def data_flags(folder: Path) -> list[str]:
    return ["--task", "instruct", *(f"--data={s}={folder / s}.jsonl" for s in ("train", "validation", "test"))]


# --- the chunked head ---------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_head_loss_and_gradients_equal_the_unchunked_computation(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.rand(37, dtype=torch.float64)  # a weighted sum: per-token gradients differ
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(logits, targets, reduction="none")
    grads = torch.autograd.grad((reference * upstream).sum(), (hidden, weight))
    for chunk in (1, 8, 37, 100):
        nll = chunked_token_nll(hidden, weight, targets, chunk=chunk, softcap=softcap)
        torch.testing.assert_close(nll.double(), reference, rtol=1e-6, atol=1e-6)  # float32 logsumexp
        mine = torch.autograd.grad((nll * upstream).sum(), (hidden, weight))
        for a, b in zip(mine, grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h = hidden.detach().float().requires_grad_(True)  # a frozen head: the input's gradient alone, still exact
    (chunked_token_nll(h, weight.detach().float(), targets, chunk=8, softcap=softcap) * upstream.float()).sum().backward()
    torch.testing.assert_close(h.grad.double(), grads[0], rtol=1e-5, atol=1e-5)


def test_chunk_size_bounds_the_logits():
    from shared.families.decoder import head_chunk_tokens

    assert head_chunk_tokens(262144) == 64  # Gemma 3's vocabulary: 64 tokens x 262k x 4 bytes = 64 MiB
    assert head_chunk_tokens(10**9) == 1


# --- the task and its tokens ----------------------------------------------------------------------


def test_instruction_jsonl_and_bad_rows(data, tmp_path):
    spec, splits = load_task("instruct", {s: data / f"{s}.jsonl" for s in ("train", "test")})
    assert spec.label_kind == "lm" and spec.text_fields == ["prompt", "response"] and spec.metrics == ["loss", "perplexity"]
    assert len(splits["train"]) == 16 and splits["train"][0].texts[0].startswith("Continue: ")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    with pytest.raises(UserError, match="no text in 'response'"):
        load_instruct({"train": tmp_path / "bad.jsonl"})
    with pytest.raises(UserError, match="training file"):
        load_instruct({"test": data / "test.jsonl"})
    spec, splits = load_instruct({"train": tmp_path / "bad.jsonl"}, ["prompt", "answer"])
    assert splits["train"][0].texts == ["x", "y"]
    for fields in (["prompt"], ["a", "b", "c"]):
        with pytest.raises(UserError, match="two --text-fields"):
            load_task("instruct", {"train": tmp_path / "bad.jsonl"}, fields)


def test_instruction_runs_refuse_flags_they_would_ignore(tiny, data, tmp_path):
    files = {"train": data / "train.jsonl"}
    with pytest.raises(UserError, match="drop --label-kind"):
        load_task("instruct", files, label_kind="class")
    with pytest.raises(UserError, match="drop --label-field"):
        load_task("instruct", files, label_field="answer")
    bb = load_backbone(str(tiny["llama"]), CPU)
    with pytest.raises(UserError, match="--pooling last"):
        DecoderSideNetwork.config_for(bb, load_task("instruct", files)[0], SideOptions(reduction=2, pooling="last"))
    with pytest.raises(UserError, match="drop --eval generate"):
        run(parse_args(["--quiet", "--model", str(tiny["llama"]), "--out", str(tmp_path / "run"), *data_flags(data), "--max-steps", "1",
                        "--eval", "generate"]))


def test_tokens_are_prompt_then_response_with_labels_on_the_response_only(tiny, data):
    bb = load_backbone(str(tiny["gemma3"]), CPU)
    spec, splits = load_task("instruct", {"train": data / "train.jsonl"})
    ex = splits["train"][0]
    prompt, response = ex.texts
    tokens = bb.tokenize([ex], spec, 128, 128)["decoder"]
    ids, labels = tokens["input_ids"][0], tokens["labels"][0]
    head = [2] + bb.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    body = bb.tokenizer(response, add_special_tokens=False)["input_ids"] + [bb.tokenizer.eos_token_id]
    assert ids == head + body and len(labels) == len(ids)
    assert labels == [LABEL_PAD] * (len(head) - 1) + body + [LABEL_PAD]  # labels[t]: the token at t + 1, response only
    short = bb.tokenize([ex], spec, 4, 3)["decoder"]
    assert short["input_ids"][0] == [2] + head[-3:] + body[:3]  # the prompt's end, the response's start, no end token
    assert short["labels"][0][-1] == LABEL_PAD and short["labels"][0][3:6] == body[:3]


def test_backbone_response_loss_is_transformers_own_causal_lm_loss(tiny, data):
    """The family's response losses (Fisher's objective) equal the model's own loss with the prompt masked."""
    bb = load_backbone(str(tiny["llama"]), CPU)
    spec, splits = load_task("instruct", {"train": data / "train.jsonl"})
    plan = plan_split("train", splits["train"][:4], spec, bb, 128, 128, 4, with_candidates=False)
    batch = plan.token_batch(range(4), CPU)
    with torch.no_grad():
        mine = bb.response_losses(batch)
    for row in range(4):
        n = int(batch["decoder"]["attention_mask"][row].sum())
        ids, labels = batch["decoder"]["input_ids"][row : row + 1, :n], batch["decoder"]["labels"][row, :n]
        hf_labels = torch.cat([torch.tensor([LABEL_PAD]), labels[:-1]])[None]  # transformers shifts them itself
        with torch.no_grad():
            own = bb.model(input_ids=ids, labels=hf_labels).loss
        torch.testing.assert_close(mine[row] / int((labels != LABEL_PAD).sum()), own, rtol=1e-5, atol=1e-5)


def test_side_loss_reads_only_the_response_tokens(tiny, data):
    """The side loss is the full-vocabulary cross-entropy (unchunked here) over the response positions
    only: its backward sends no gradient to the side decoder's output at any prompt position, and the full head is kept."""
    bb = load_backbone(str(tiny["gemma3"]), CPU)
    spec, splits = load_task("instruct", {"train": data / "train.jsonl"})
    cfg = DecoderSideNetwork.config_for(bb, spec, SideOptions(reduction=2, dropout=0.0))
    assert cfg.head == "lm" and not cfg.candidate_tokens
    torch.manual_seed(0)
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach().float())
    side.init_projections(std=0.2)
    assert side.lm_head.shape == (1000, 64)
    plan = plan_split("train", splits["train"][:6], spec, bb, 128, 128, 6, with_candidates=False)
    batch = LiveSplit(bb, plan, {"decoder": cfg.decoder_layers}).batch(np.arange(6))
    targets = batch.targets["decoder"]
    assert bool((targets == LABEL_PAD).any()) and bool((targets != LABEL_PAD).any())
    seen = []

    def keep_gradient(_module, _inputs, out):
        out.register_hook(seen.append)

    hook = side.decoder.register_forward_hook(keep_gradient)
    loss = side.loss(batch)
    loss.backward()
    hook.remove()
    grad = seen[0]  # d loss / d side decoder output [B, L, d]
    prompt_positions = (targets == LABEL_PAD)
    assert bool((grad[prompt_positions] == 0).all()) and bool((grad[~prompt_positions] != 0).any(-1).all())
    with torch.no_grad():
        logits = side.output(side.decoder(batch.states["decoder"], batch.masks["decoder"])) @ side.lm_head.t()
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=LABEL_PAD)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    everything = F.cross_entropy(logits.flatten(0, 1)[batch.masks["decoder"].flatten()],
                                 torch.randint(0, 1000, (int(batch.masks["decoder"].sum()),)))
    assert not torch.allclose(everything, reference)


# --- runs ---------------------------------------------------------------------------------------


def test_cached_and_live_instruction_runs_give_the_same_losses(tiny, data, tmp_path):
    """The cache stores the padding-free prompt + response states and the targets; training from it gives
    the live run's losses, and evaluation reports the response tokens' loss and perplexity."""
    from backbone_cache.extract import main as extract
    from shared.cache_format import StackReader

    cache = tmp_path / "cache"
    assert extract(["--model", str(tiny["gemma3"]), "--out", str(cache), *data_flags(data), "--batch-size", "8",
                    "--init", "magnitude", "--quiet"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["task"]["label_kind"] == "lm" and set(manifest["splits"]["train"]["stacks"]) == {"decoder"}
    reader = StackReader(cache, "train", "decoder", manifest["splits"]["train"]["stacks"]["decoder"])
    assert reader.labels is not None and len(reader.labels) == int(reader.offsets[-1])  # one target per stored token
    common = ["--quiet", "--warmup-steps", "2", "--batch-size", "8", "--eval-batch-size", "16", "--epochs", "2",
              "--init", "magnitude"]
    cached = run(parse_args(["--cache", str(cache), "--out", str(tmp_path / "c"), *common]))
    live = run(parse_args(["--cache", str(cache), "--live", "--out", str(tmp_path / "l"), *common]))

    def losses(folder: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["type"] == "train"]

    a, b = losses(tmp_path / "c"), losses(tmp_path / "l")
    assert len(a) == 4 and a[-1] < a[0]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for summary in (cached, live):
        test = summary["test_last"]
        assert test["perplexity"] == pytest.approx(np.exp(test["loss"])) and test["score"] == -test["loss"]
        assert test["tokens"] > 0
    assert cached["test_last"]["loss"] == pytest.approx(live["test_last"]["loss"], rel=1e-5)
    assert cached["validation_best"] is not None
    from side_train.predict import Predictor

    rows = Predictor.from_run(tmp_path / "c", "cpu").predict_cache(cache, "test")
    assert len(rows) == 8 and all(float(r["response_loss"]) > 0 for r in rows)


def test_instruction_tasks_need_a_decoder(tiny_t5, data):
    spec, splits = load_task("instruct", {"train": data / "train.jsonl"})
    bb = load_backbone(str(tiny_t5), CPU)
    with pytest.raises(UserError, match="t5 family trains class, regression tasks, not 'lm' ones; use a backbone of the decoder"):
        plan_split("train", splits["train"], spec, bb, 64, 64, 8, with_candidates=False)


def test_no_response_tokens_give_nan_per_example_and_refuse_an_eval_split(tiny, data):
    """An example whose response is cut away has no loss (NaN, not 0); a split without any response token is refused."""
    from side_train.evaluate import evaluate

    bb = load_backbone(str(tiny["llama"]), CPU)
    spec, splits = load_task("instruct", {"train": data / "train.jsonl"})
    cfg = DecoderSideNetwork.config_for(bb, spec, SideOptions(reduction=2, dropout=0.0))
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach().float())
    plan = plan_split("train", splits["train"][:3], spec, bb, 128, 128, 3, with_candidates=False)
    plan.inputs["decoder"]["labels"][1] = [LABEL_PAD] * len(plan.inputs["decoder"]["labels"][1])
    values = side.predict(LiveSplit(bb, plan, {"decoder": cfg.decoder_layers}).batch(np.arange(3)))
    assert bool(values[1].isnan()) and bool(values[[0, 2]].isfinite().all()) and bool((values[[0, 2]] > 0).all())
    empty = plan_split("validation", splits["train"][:3], spec, bb, 128, 0, 3, with_candidates=False)  # no response kept
    with pytest.raises(UserError, match="no response tokens"):
        evaluate(side, LiveSplit(bb, empty, {"decoder": cfg.decoder_layers}), spec, CPU, 8)


def test_merge_final_with_the_full_head(tiny, data):
    """--merge-final on an instruction run: the gate gets a gradient; closed, the loss is the plain one."""
    bb = load_backbone(str(tiny["llama"]), CPU)
    spec, splits = load_task("instruct", {"train": data / "train.jsonl"})
    plain_cfg = DecoderSideNetwork.config_for(bb, spec, SideOptions(reduction=2, dropout=0.0))
    cfg = DecoderSideNetwork.config_for(bb, spec, SideOptions(reduction=2, dropout=0.0, merge_final=True))
    torch.manual_seed(0)
    plain = DecoderSideNetwork(plain_cfg, bb.lm_head()[0].detach().float())
    merged = DecoderSideNetwork(cfg, bb.lm_head()[0].detach().float())
    merged.load_state_dict(plain.state_dict(), strict=False)
    plan = plan_split("train", splits["train"][:4], spec, bb, 128, 128, 4, with_candidates=False)
    batch = LiveSplit(bb, plan, {"decoder": cfg.decoder_layers}).batch(np.arange(4))
    merged.loss(batch).backward()
    assert merged.merge_gate.grad is not None and bool((merged.merge_gate.grad != 0).any())
    with torch.no_grad():
        merged.merge_gate.fill_(-1e4)
        assert torch.equal(merged.loss(batch), plain.loss(batch))
    assert int(merged.loss_weight(batch)) == int((batch.targets["decoder"] != LABEL_PAD).sum())
