"""Decoder generation and --merge-final: KV-cached generation equals full recomputation, the side
decoder's cached steps equal its full-sequence forward, QST's gated output, `predict --generate`.

Tiny random Llama, Qwen2 and Gemma 3 models (2 layers; Gemma 3 with a sliding window of 6 on its
first layer) share the byte-level tokenizer of tests/test_decoder.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from test_decoder import make_tiny_decoder, rt_examples, tokenizer_dir  # noqa: F401  (tokenizer_dir: a fixture)

from backbone_cache.importance import magnitude_scores
from shared.backbones import load_backbone
from shared.errors import UserError
from shared.tasks import load_default, load_instruct
from side_train.families.decoder import DecoderSideNetwork, SideKVCache
from side_train.model import GenerationConfig, SideOptions, from_pretrained
from side_train.run import parse_args, run

CPU = torch.device("cpu")
KINDS = ("llama", "qwen2", "gemma3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("generate")
    return {kind: make_tiny_decoder(kind, root / kind, tokenizer_dir) for kind in KINDS}


@pytest.fixture(scope="module")
def backbones(tiny):
    return {kind: load_backbone(str(folder), CPU) for kind, folder in tiny.items()}


def side_for(bb, merge_final: bool = False, seed: int = 0) -> DecoderSideNetwork:
    """A pruned side network (r = 2) with spread projections, so its output is far from the backbone's."""
    spec = load_default()[0]
    cfg = DecoderSideNetwork.config_for(bb, spec, SideOptions(reduction=2, dropout=0.0, merge_final=merge_final))
    torch.manual_seed(seed)
    side = DecoderSideNetwork(cfg, bb.lm_head()[0].detach().float())
    side.init_projections(std=0.2)
    side.init_from_backbone({k: v.float() for k, v in bb.model.state_dict().items()}, magnitude_scores(bb))
    return side.eval()


PROMPT = "a long, slow and rather boring film"  # 18 tokens with <bos> and the template: longer than the window


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_full_recomputation(backbones, kind):
    """Greedy and sampled (fixed seed): the same tokens with the backbone's and the side's KV caches as
    with the whole sequence recomputed every step, and each step's full-vocabulary logits within float rounding."""
    bb = backbones[kind]
    side = side_for(bb)
    prompt = bb.generation_prompt_ids([PROMPT], load_default()[0], 128)
    assert len(prompt) > 6
    for settings in (GenerationConfig(max_new_tokens=8),
                     GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=100, top_p=0.9, seed=3)):
        cached, cached_logits = side.generate_ids(bb, prompt, settings, use_cache=True, keep_logits=True)
        full, full_logits = side.generate_ids(bb, prompt, settings, use_cache=False, keep_logits=True)
        assert cached == full and len(cached_logits) == len(full_logits) >= 5
        for a, b in zip(cached_logits, full_logits):
            assert a.shape == (bb.config.vocab_size,)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    greedy, _ = side.generate_ids(bb, prompt, GenerationConfig(max_new_tokens=8))
    sampled, _ = side.generate_ids(bb, prompt, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3))
    again, _ = side.generate_ids(bb, prompt, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3))
    assert sampled == again and sampled != greedy


@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_equals_each_prompt_alone(backbones, kind):
    """Prompts of different lengths generated together (left-padded, both KV caches) give each prompt's
    tokens from full recomputation alone, and its logits within float rounding; greedy and sampled, with
    --merge-final, and with the prompts longer than Gemma 3's sliding window."""
    bb = backbones[kind]
    spec = load_default()[0]
    texts = [PROMPT, "dull", "a gorgeous, witty, seductive movie that never lets go of you", "just fine"]
    prompts = [bb.generation_prompt_ids([t], spec, 128) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    for merge_final in (False, True):
        side = side_for(bb, merge_final=merge_final)
        for settings in (GenerationConfig(max_new_tokens=6),
                         GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=50, seed=5)):
            together = side.generate_batch(bb, prompts, settings, keep_logits=True)
            for prompt, (ids, logits) in zip(prompts, together):
                alone, alone_logits = side.generate_ids(bb, prompt, settings, use_cache=False, keep_logits=True)
                assert ids == alone and len(logits) == len(alone_logits) >= 1
                for a, b in zip(logits, alone_logits):
                    # float32 rounding differs with the padding and the mask: judged against the logits' scale
                    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
            many = side.generate_many(bb, prompts, GenerationConfig(**{**settings.__dict__, "batch_size": 3}))
            assert many == [ids for ids, _ in together]


def test_an_empty_prompt_without_a_start_token_is_refused(backbones, monkeypatch, tmp_path):
    bb = backbones["qwen2"]
    monkeypatch.setattr(bb, "_prefix", [])  # a tokenizer that adds no start token
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "", "response": "x"}) + "\n")
    with pytest.raises(UserError, match="start token"):
        bb.generation_prompt_ids([""], load_instruct({"train": tmp_path / "t.jsonl"})[0], 128)
    with pytest.raises(UserError, match="start token"):
        side_for(bb).generate_ids(bb, [], GenerationConfig(max_new_tokens=2))


def test_generate_texts_builds_the_full_head_once(backbones, monkeypatch):
    bb = backbones["llama"]
    side = side_for(bb)
    calls = []
    full_head = side.full_head
    monkeypatch.setattr(side, "full_head", lambda backbone: calls.append(1) or full_head(backbone))
    texts = side.generate_texts(bb, [[PROMPT], ["witty"], ["dull"]], load_default()[0], 128, GenerationConfig(max_new_tokens=2))
    assert len(texts) == 3 and len(calls) == 1


def test_side_cache_steps_equal_the_full_forward_and_keep_only_the_window(backbones):
    """The side decoder fed a sequence in pieces (5 positions, then one at a time) with its KV cache gives
    the full-sequence forward's states; the sliding layer's cache holds no more than its window reaches."""
    bb = backbones["gemma3"]
    side = side_for(bb)
    torch.manual_seed(1)
    states = (torch.randn(1, 15, len(side.cfg.decoder_layers) + 1, bb.d_model) * 3).bfloat16()
    with torch.no_grad():
        full = side.decoder(states, torch.ones(1, 15, dtype=torch.bool))
        cache = SideKVCache()
        pieces = [side.decoder.step(states[:, :5], cache)] + [side.decoder.step(states[:, i : i + 1], cache) for i in range(5, 15)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 15
    windows = [block.attn.window for block in side.decoder.blocks]
    assert windows == [6, None]
    assert cache.layers[0].k.shape[2] == 5 and cache.layers[1].k.shape[2] == 15
    assert cache.layers[0].positions.tolist() == [list(range(10, 15))]


def test_backbone_step_states_equal_the_whole_sequence(backbones):
    bb = backbones["gemma3"]
    ids = torch.tensor([bb.generation_prompt_ids([PROMPT], load_default()[0], 128)])
    whole = bb.run_blocks(ids, None)
    first, past = bb.step_states(ids[:, :9])
    rest = [bb.step_states(ids[:, i : i + 1], past)[0] for i in range(9, ids.shape[1])]
    torch.testing.assert_close(torch.cat([first, *rest], 1), whole, rtol=1e-4, atol=1e-4)


def test_sampling_keeps_only_the_top_k_and_the_nucleus():
    from side_train.families.decoder import next_token

    logits = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert next_token(logits, GenerationConfig(), generator) == 1
    drawn = {next_token(logits, GenerationConfig(temperature=5.0, top_k=2), generator) for _ in range(200)}
    assert drawn == {1, 2}
    # probabilities at T=1: 0.64, 0.24, 0.09, ...: top_p 0.7 keeps the first two (0.64 < 0.7)
    drawn = {next_token(logits, GenerationConfig(temperature=1.0, top_p=0.7), generator) for _ in range(200)}
    assert drawn == {1, 2}
    assert {next_token(logits, GenerationConfig(temperature=1.0, top_p=0.5), generator) for _ in range(50)} == {1}
    for bad in (GenerationConfig(top_p=0.0), GenerationConfig(temperature=-1.0), GenerationConfig(max_new_tokens=0)):
        with pytest.raises(UserError):
            bad.check()


# --- --merge-final ------------------------------------------------------------------------------


def test_merge_final_closed_is_the_plain_output_and_open_is_the_backbones_final_state(backbones):
    """σ(z) = 0: exactly the plain side output; σ(z) = 1: the backbone's own final normed state
    (its final norm applied to the last block's output, Gemma's 1 + w form included)."""
    for kind in ("llama", "gemma3"):
        bb = backbones[kind]
        merged, plain = side_for(bb, merge_final=True), side_for(bb)
        assert merged.cfg.merge_final and merged.merge_gate.shape == (bb.d_model,)
        assert float(torch.sigmoid(merged.merge_gate.detach()[0])) == pytest.approx(0.731, abs=1e-3)  # QST's init z = 1
        missing = merged.load_state_dict(plain.state_dict(), strict=False)
        assert missing.missing_keys == ["merge_gate"] and not missing.unexpected_keys
        ids = torch.tensor([bb.generation_prompt_ids([PROMPT], load_default()[0], 128)])
        states = merged.ladder_inputs(bb.run_blocks(ids, None))
        with torch.no_grad():
            s = merged.decoder(states, torch.ones(ids.shape, dtype=torch.bool))
            merged.merge_gate.fill_(-1e4)
            assert torch.equal(merged.output(s, states[:, :, -1]), plain.output(s))
            merged.merge_gate.fill_(1e4)
            with torch.inference_mode():
                own = bb.text_model.norm(states[:, :, -1].float())
            torch.testing.assert_close(merged.output(s, states[:, :, -1]), own, rtol=1e-5, atol=1e-5)


def test_merge_final_fully_open_generates_what_the_backbone_generates(backbones):
    """σ(z) = 1: the side network's cached generation is the backbone's own greedy `generate`."""
    bb = backbones["llama"]
    side = side_for(bb, merge_final=True)
    with torch.no_grad():
        side.merge_gate.fill_(1e4)
    stops = bb.stop_token_ids()
    for text in (PROMPT, "witty", "the best film of the year, by far"):
        prompt = bb.generation_prompt_ids([text], load_default()[0], 128)
        mine, _ = side.generate_ids(bb, prompt, GenerationConfig(max_new_tokens=10))
        with torch.no_grad():
            own = bb.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=stops)[0, len(prompt):]
        own = own.tolist()
        assert mine == own[: next((i for i, t in enumerate(own) if t in stops), len(own))]
        assert len(set(mine)) > 2  # a varied continuation, not one token repeated


def test_merge_final_trains_saves_and_loads(tiny, tmp_path):
    out = tmp_path / "merge"
    config = parse_args(["--quiet", "--model", str(tiny["gemma3"]), "--out", str(out), "--limit", "24", "--max-steps", "4",
                         "--warmup-steps", "1", "--batch-size", "8", "--eval-batch-size", "16", "--init", "magnitude",
                         "--merge-final"])
    assert config.side.merge_final
    summary = run(config)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    from side_train.predict import Predictor

    spec, test = load_default()[0], load_default()[1]["test"][:24]
    names = Predictor.from_run(out, "cpu").predict_texts([ex.texts for ex in test])  # the saved network, reloaded
    right = [name == spec.label_names[ex.label] for name, ex in zip(names, test)]
    assert summary["test_last"]["accuracy"] == pytest.approx(100 * sum(right) / len(right))
    side = from_pretrained(out / "side_model")
    assert side.cfg.merge_final and not torch.allclose(side.merge_gate, torch.ones_like(side.merge_gate))
    assert len(side.cfg.final_norm_weight) == 64


def test_merge_final_needs_the_last_block(backbones):
    with pytest.raises(UserError, match="--merge-final"):
        DecoderSideNetwork.config_for(backbones["llama"], load_default()[0], SideOptions(side_layers=[0], merge_final=True))


def test_merge_final_is_refused_by_t5_and_encoders(tiny_t5):
    from side_train.families.encoder import EncoderSideNetwork
    from side_train.families.t5 import T5SideNetwork

    spec, options = load_default()[0], SideOptions(merge_final=True)
    with pytest.raises(UserError, match="drop --merge-final"):
        T5SideNetwork.config_for(load_backbone(str(tiny_t5), CPU), spec, options)
    with pytest.raises(UserError, match="drop --merge-final"):
        EncoderSideNetwork.config_for(None, spec, options)  # refused before the backbone is read


# --- predict --generate -------------------------------------------------------------------------


def instruct_files(folder: Path, n: int = 16) -> list[str]:
    rows = [{"prompt": f"Say: {ex.texts[0][:20]}\n", "response": ex.texts[0][20:50]} for ex in rt_examples(n)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--task", "instruct", "--data", f"train={folder / 'train.jsonl'}", "--data", f"test={folder / 'test.jsonl'}"]


def test_predict_generate_from_an_instruction_run(tiny, tmp_path, capsys):
    from side_train.predict import Predictor

    out = tmp_path / "sft"
    run(parse_args(["--quiet", "--model", str(tiny["qwen2"]), "--out", str(out), *instruct_files(tmp_path), "--max-steps", "2",
                    "--warmup-steps", "1", "--batch-size", "8", "--init", "magnitude"]))
    predictor = Predictor.from_run(out, "cpu")
    settings = GenerationConfig(max_new_tokens=6)
    texts = predictor.generate_texts(["Say: a gorgeous film\n", "Say: dull\n"], settings)
    bb = predictor.backbone
    for text, prompt in zip(texts, ["Say: a gorgeous film\n", "Say: dull\n"]):
        ids, _ = predictor.model.generate_ids(bb, bb.generation_prompt_ids([prompt], predictor.spec, 128), settings, use_cache=False)
        assert text == bb.tokenizer.decode(ids, skip_special_tokens=True)
    from side_train.predict import main

    assert main(["--run", str(out), "--generate", "--text", "Say: dull\n", "--max-new-tokens", "6", "--device", "cpu",
                 "--out", str(tmp_path / "g.csv")]) == 0
    with open(tmp_path / "g.csv", newline="", encoding="utf-8") as handle:
        assert list(csv.DictReader(handle)) == [{"text": "Say: dull\n", "generation": texts[1]}]
    capsys.readouterr()
    for flags, needle in ((["--generate", "--text", "x", "--top-p", "2"], "--top-p"), (["--text", "x"], "--generate"),
                          (["--generate", "--text", "x", "--batch-size", "0"], "--batch-size"),
                          (["--generate", "--cache", str(tmp_path)], "--text")):
        assert main(["--run", str(out), "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert main(["--run", str(tmp_path / "no_run"), "--generate", "--device", "cpu"]) == 2  # refused before any loading
    assert "--text" in capsys.readouterr().err


def test_eval_generate_reads_the_generated_label_words(tiny, backbones, tmp_path):
    """--eval generate on a live decoder run: each example's value is the label whose word the greedy
    continuation starts with (-1 for none), as generate_ids gives it."""
    from backbone_cache.plan import plan_split
    from side_train.data import LiveSplit

    out = tmp_path / "gen"
    summary = run(parse_args(["--quiet", "--model", str(tiny["llama"]), "--out", str(out), "--limit", "8", "--epochs", "1",
                              "--warmup-steps", "1", "--batch-size", "4", "--init", "magnitude", "--eval", "generate"]))
    from side_train.predict import Predictor

    bb, spec = backbones["llama"], load_default()[0]
    trained = Predictor.from_run(out, "cpu")
    test = plan_split("test", load_default()[1]["test"][:8], spec, bb, trained.max_length, trained.max_target_length, 8,
                      with_candidates=True)
    generated = trained.model.generate_values(LiveSplit(bb, test, {"decoder": trained.model.cfg.decoder_layers}),
                                              range(8), CPU, spec)
    right = generated == [ex.label for ex in test.examples]
    assert summary["test_last"]["accuracy"] == pytest.approx(100 * right.mean())  # the run's score is generation's
    side = side_for(bb)
    plan = plan_split("t", rt_examples(4), spec, bb, 128, 16, 4, with_candidates=True)
    values = side.generate_values(LiveSplit(bb, plan, {"decoder": side.cfg.decoder_layers}), [0, 1, 2, 3], CPU, spec)
    words = side.cfg.candidate_tokens
    for row, value in enumerate(values):
        new, _ = side.generate_ids(bb, plan.inputs["decoder"]["input_ids"][row], GenerationConfig(max_new_tokens=1))
        assert value == next((float(i) for i, w in enumerate(words) if new[:1] == w), -1.0)
