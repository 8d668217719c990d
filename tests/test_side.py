"""Phase 2: the side network, its init, and the central guarantee (cached == live)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, needs_minilm, run_cli

from side_train.data import Batch
from side_train.families.t5 import T5SideConfig, T5SideNetwork
from side_train.model import from_pretrained, side_layers
from side_train.run import format_summary, parse_args, run


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["type"] == "train"]


def t5_base_side_config(layers: list[int]) -> T5SideConfig:
    return T5SideConfig(backbone_d=768, backbone_d_ff=3072, backbone_d_kv=64, num_heads=12,
                      num_backbone_layers=12, num_backbone_decoder_layers=12, reduction=8,
                      encoder_layers=layers, decoder_layers=layers, vocab_size=32128)


def test_parameter_count_matches_the_reference():
    """T5-base, r = 8, 9 side layers: 3.88M trainable, 1.74% of the 222,882,048-parameter backbone."""
    layers = side_layers(12, drop=3)
    assert layers == [1, 2, 3, 5, 6, 7, 9, 10, 11]
    model = T5SideNetwork(t5_base_side_config(layers), torch.zeros(32128, 768))
    n = model.trainable_parameters()
    # the reference counts 24 gate scalars (one per backbone layer, 6 unused); we keep one per side layer
    assert n == 3_878_712 - 6
    assert round(n / 1e6, 2) == 3.88 and round(100 * n / 222_882_048, 2) == 1.74
    assert model.lm_head.requires_grad is False and "lm_head" not in dict(model.named_parameters())
    all_layers = T5SideNetwork(t5_base_side_config(list(range(12))), torch.zeros(32128, 768))
    assert round(all_layers.trainable_parameters() / 1e6, 2) == 5.10  # notes §1.9: all 12 layers


def test_layer_dropping_matches_the_reference_lists():
    assert side_layers(24, drop=12) == list(range(1, 24, 2))
    assert side_layers(24, drop=23) == [23]
    assert side_layers(12, drop=6) == [1, 3, 5, 7, 9, 11]
    assert side_layers(12, explicit=[11, 3, 7]) == [3, 7, 11]


def _args(*extra: str):
    return parse_args(["--quiet", "--warmup-steps", "2", "--batch-size", "8", "--eval-batch-size", "16", *extra])


def test_cached_and_live_runs_give_the_same_losses(t5_cache, tmp_path):
    cached = run(_args("--cache", str(t5_cache), "--out", str(tmp_path / "cached"), "--epochs", "2", "--init", "fisher"))
    live = run(_args("--cache", str(t5_cache), "--live", "--out", str(tmp_path / "live"), "--epochs", "2", "--init", "fisher"))
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "live")
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert cached["source"] == "cache" and live["source"] == "live"
    assert cached["test_last"]["accuracy"] == pytest.approx(live["test_last"]["accuracy"], abs=5.0)
    # a lone run accounts its largest step (side_train.memory), the same whether its states come from the cache or live
    account = cached["training_memory"]
    assert account["gradient_bytes"] == 4 * cached["trainable_parameters"] and account["saved_bytes"] > 0
    assert cached["training_memory_bytes"] == account["total_bytes"] > 4 * 3 * cached["trainable_parameters"]
    assert json.loads((tmp_path / "cached" / "summary.json").read_text())["training_memory"] == account
    assert live["training_memory"] == account and "live_backbone_bytes" not in cached
    assert live["live_backbone_bytes"] == 4 * cached["backbone_parameters"]  # the float32 backbone beside it
    shown = format_summary(live).splitlines()[2]
    assert shown.startswith(f"training memory, largest step: {account['total_bytes'] / 2**20:,.1f} MiB (parameters ")
    assert shown.endswith(f"the live backbone's weights beside it: {live['live_backbone_bytes'] / 2**20:,.1f} MiB")
    assert "live backbone" not in format_summary(cached)


@needs_minilm
def test_cached_and_live_runs_agree_on_minilm(minilm_cache, tmp_path):
    run(_args("--cache", str(minilm_cache), "--out", str(tmp_path / "cached"), "--max-steps", "6", "--init", "magnitude"))
    run(_args("--cache", str(minilm_cache), "--live", "--out", str(tmp_path / "live"), "--max-steps", "6", "--init", "magnitude"))
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "live"), rtol=1e-4)


def test_no_backbone_parameter_gets_a_gradient_or_changes(tiny_t5, tmp_path, monkeypatch):
    import side_train.recipe as recipe

    seen = {}
    original = recipe.build_side_network

    def spy(cfg, backbone, init, scores, seed):
        seen["backbone"] = backbone
        seen["before"] = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        return original(cfg, backbone, init, scores, seed)

    monkeypatch.setattr("side_train.runs.build_side_network", spy)
    run(_args("--model", str(tiny_t5), "--out", str(tmp_path / "r"), "--limit", "24", "--max-steps", "3", "--init", "magnitude"))
    model = seen["backbone"].model
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)


def tiny_side_and_batch(dropout: float = 0.1):
    torch.manual_seed(0)
    cfg = T5SideConfig(backbone_d=64, backbone_d_ff=128, backbone_d_kv=16, num_heads=4, num_backbone_layers=3,
                     num_backbone_decoder_layers=3, reduction=4, encoder_layers=[0, 1, 2], decoder_layers=[0, 2], vocab_size=100,
                     dropout=dropout)
    side = T5SideNetwork(cfg, torch.randn(100, 64))
    enc_mask = torch.ones(4, 10, dtype=torch.bool)
    enc_mask[0, 7:] = False
    batch = Batch(torch.arange(4), torch.zeros(4, dtype=torch.float64),
                  states={"encoder": torch.randn(4, 10, 4, 64).bfloat16(), "decoder": torch.randn(4, 3, 3, 64).bfloat16()},
                  masks={"encoder": enc_mask, "decoder": torch.ones(4, 3, dtype=torch.bool)},
                  targets={"decoder": torch.randint(0, 100, (4, 3))})
    return side, batch


def loss_and_gradients(side, batch):
    from side_train.memory import SavedTensorCounter, device_tensors

    side.train().zero_grad()
    torch.manual_seed(1)
    with SavedTensorCounter(exclude=[*device_tensors(side), *batch.states.values()]) as counter:
        loss = side.loss(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in side.parameters()], counter.saved_bytes


def test_ladders_save_the_bf16_states_not_a_float_copy(monkeypatch):
    import side_train.model as model_module

    side, batch = tiny_side_and_batch(dropout=0.0)
    loss, grads, saved = loss_and_gradients(side, batch)
    monkeypatch.setattr(model_module, "ladder_projection",
                        lambda linear, states, dropout=None, standardize=None: linear(states.to(linear.weight.dtype)))
    plain_loss, plain_grads, plain_saved = loss_and_gradients(side, batch)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    # nn.Linear saves one float32 copy per projection: encoder 1 + 3 of 4x10x64, decoder 1 + 2 of 4x3x64
    assert plain_saved - saved == 4 * (4 * 4 * 10 * 64 + 3 * 4 * 3 * 64)


def test_ladder_projection_with_dropout_matches_the_float_computation():
    from side_train.kernels import _LadderProjection

    torch.manual_seed(0)
    states = torch.randn(4, 10, 64).bfloat16()
    keep = torch.rand(4, 10, 64) >= 0.1
    weight = torch.randn(16, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    grad_out = torch.randn(4, 10, 16)
    _LadderProjection.apply(states, keep, 1 / 0.9, weight, bias, torch.float32).backward(grad_out)
    ours = (weight.grad.clone(), bias.grad.clone())
    weight.grad = bias.grad = None
    reference = torch.nn.functional.linear(torch.where(keep, states.float() * (1 / 0.9), 0.0), weight, bias)
    reference.backward(grad_out)
    torch.testing.assert_close(ours[0], weight.grad, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours[1], bias.grad, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(_LadderProjection.apply(states, keep, 1 / 0.9, weight, bias, torch.float32), reference, rtol=0, atol=0)


def test_standardized_ladder_projection_matches_the_float_computation():
    """(states - shift) * factor, dropped, then the ladder: forward and every gradient (the states' too) as autograd
    computes them on a float copy; the kernel still saves only the bf16 view."""
    from side_train.kernels import _LadderProjection

    torch.manual_seed(0)
    states = (torch.randn(4, 10, 64) * 30 + 5).bfloat16().requires_grad_()
    keep = torch.rand(4, 10, 64) >= 0.1
    shift, factor = torch.randn(64) * 5, torch.rand(64) + 0.05
    weight = torch.randn(16, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    grad_out = torch.randn(4, 10, 16)
    out = _LadderProjection.apply(states, keep, 1 / 0.9, weight, bias, torch.float32, shift, factor)
    out.backward(grad_out)
    ours = (out.detach(), weight.grad.clone(), bias.grad.clone(), states.grad.float().clone())
    weight.grad = bias.grad = states.grad = None
    x = states.float()
    reference = torch.nn.functional.linear(torch.where(keep, (x - shift) * factor * (1 / 0.9), 0.0), weight, bias)
    reference.backward(grad_out)
    torch.testing.assert_close(ours[0], reference.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ours[1], weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours[2], bias.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours[3], states.grad.float(), rtol=1e-2, atol=1e-2)  # the states' gradient is bf16


def test_standardized_ladders_equal_plain_ladders_with_the_statistics_folded_in():
    """A stack with standardized inputs computes what a plain stack computes with W' = W diag(f) and
    b' = b - W' m; the factors even out the channels (each a layer's median std over its own)."""
    side, batch = tiny_side_and_batch(dropout=0.0)
    cfg = dataclasses.replace(side.cfg, standardize_ladders=True)
    standardized = T5SideNetwork(cfg, side.lm_head.clone())
    standardized.load_state_dict(side.state_dict(), strict=False)
    stack = standardized.encoder
    mean, std = torch.randn(4, 64) * 3, torch.rand(4, 64) * 10 + 0.5
    std[:, 7] = 500.0  # an outlier channel
    stack.set_input_statistics(mean, std)
    torch.testing.assert_close(stack.input_factor * std, std.median(dim=1, keepdim=True).values.expand(4, 64))
    assert float(stack.input_factor[:, 7].max()) < 0.1
    with torch.no_grad():
        for j, linear in enumerate([side.encoder.down_emb, *side.encoder.ladders]):
            linear.weight.mul_(stack.input_factor[j])
            linear.bias.sub_(linear.weight @ stack.input_shift[j])
    side.eval(), standardized.eval()
    mask = batch.masks["encoder"]
    torch.testing.assert_close(standardized.encoder(batch.states["encoder"], mask), side.encoder(batch.states["encoder"], mask),
                               rtol=1e-4, atol=1e-4)
    assert {"encoder.input_shift", "encoder.input_factor"} <= set(standardized.state_dict())
    assert "encoder.input_shift" not in side.state_dict()  # the paper's ladders keep no statistics


def test_ladder_statistics_leave_out_each_sequences_first_position():
    from side_train.recipe import ladder_input_statistics

    torch.manual_seed(0)
    states = torch.randn(10, 6, 3, 8).bfloat16()
    states[:, 0] = 1000.0  # an attention sink at each sequence's first position
    mask = torch.ones(10, 6, dtype=torch.bool)
    mask[::2, 4:] = False  # padding, never counted

    class Source:
        num_examples = 10

        def batch(self, rows):
            rows = torch.as_tensor(rows)
            return Batch(rows, torch.zeros(len(rows), dtype=torch.float64), states={"encoder": states[rows]},
                         masks={"encoder": mask[rows]})

    mean, std = ladder_input_statistics(Source(), ("encoder",), batch_size=3)["encoder"]
    real = mask.clone()
    real[:, 0] = False
    x = states[real].double()
    torch.testing.assert_close(mean, x.mean(0).float())
    torch.testing.assert_close(std, x.std(0, unbiased=False).float())
    assert float(std.max()) < 10  # the sink rows are left out


def test_cpu_dropout_mask_has_the_rate_and_follows_torch_rng():
    from side_train.kernels import keep_mask

    cpu = torch.device("cpu")
    torch.manual_seed(3)
    keep, scale = keep_mask((1000, 1000), cpu, 0.1)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    kept = keep.float().mean().item()
    assert abs(kept - 0.9) < 0.002  # 6 standard deviations of a 10^6-draw mean
    assert scale == 65536 / (65536 - 6554) and abs(kept * scale - 1) < 0.003  # p rounded to 2**-16, scale to match
    flat = keep.flatten().numpy().astype(np.float64)
    for lag in (1, 2, 3, 4):  # the four 16-bit lanes of each 64-bit draw are independent
        assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 0.01
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1000, 1000), cpu, 0.1)[0], keep)  # torch.manual_seed fixes it
    state = torch.get_rng_state()
    first = keep_mask((4000,), cpu, 0.5)[0]
    torch.set_rng_state(state)
    assert torch.equal(keep_mask((4000,), cpu, 0.5)[0], first)  # restoring torch's RNG state replays it
    assert not torch.equal(keep_mask((4000,), cpu, 0.5)[0], first)  # and the next draw differs
    assert abs(first.float().mean().item() - 0.5) < 0.05


def test_cpu_dropout_scales_kept_values_and_their_gradient():
    from side_train.kernels import dropout

    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    out = dropout(x, 0.25)
    kept = out != 0
    scale = 65536 / (65536 - 16384)
    assert torch.equal(out[kept], x[kept] * scale) and 0.70 < kept.float().mean().item() < 0.80
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, kept.float() * scale)
    assert dropout(x, 0.0) is x


@pytest.mark.parametrize("training", [True, False])
def test_folded_lm_head_equals_the_direct_product(monkeypatch, training):
    import side_train.kernels as kernels

    side, _ = tiny_side_and_batch()
    torch.nn.init.normal_(side.upsample.weight)
    torch.nn.init.normal_(side.upsample.bias)
    s = torch.randn(4, 3, side.cfg.d)
    results = []
    for fold in (False, True):
        monkeypatch.setattr(kernels, "fold_pays", lambda *args, fold=fold: fold)
        side.zero_grad()
        with torch.set_grad_enabled(training):
            logits = kernels.vocab_logits(s, side.upsample, side.cfg.lm_scale, side.lm_head, side.frozen_head)
        if training:
            logits.square().sum().backward()
        results.append((logits.detach(), side.upsample.weight.grad, side.upsample.bias.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-4)
    if training:
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-4, atol=1e-3)


def test_lm_head_is_folded_only_where_it_saves_work():
    from side_train.kernels import fold_pays

    # T5-base, r = 8 (d 96 of 768): a training batch of 100 x 2 label tokens folds, 12 tokens do not
    assert fold_pays(200, 96, 768, training=True) and not fold_pays(12, 96, 768, training=True)
    assert fold_pays(120, 96, 768, training=False) and not fold_pays(100, 96, 768, training=False)


def test_recompute_gives_the_same_loss_and_gradients_with_less_saved():
    side, batch = tiny_side_and_batch()
    loss, grads, saved = loss_and_gradients(side, batch)
    side.set_recompute(True)
    again, recomputed, recompute_saved = loss_and_gradients(side, batch)
    assert torch.equal(loss, again)  # same forward, same dropout masks
    for a, b in zip(grads, recomputed):  # summation order of shared inputs' gradients may differ
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert recompute_saved < saved / 2


def test_attention_dropout_is_separate_and_saved(tmp_path):
    from side_train.kernels import Dropout
    from side_train.model import Attention

    side, batch = tiny_side_and_batch()
    side.cfg.attention_dropout = 0.0
    side = T5SideNetwork(side.cfg, side.lm_head)
    assert {m.dropout for m in side.modules() if isinstance(m, Attention)} == {0.0}
    assert {m.p for m in side.modules() if isinstance(m, Dropout)} == {0.1}
    side.save_pretrained(tmp_path)
    assert from_pretrained(tmp_path, side.lm_head).cfg.attention_p == 0.0
    side.train()
    torch.manual_seed(0)
    first = side.loss(batch)
    torch.manual_seed(1)
    assert not torch.equal(first, side.loss(batch))  # the other dropouts are still on


def test_pruned_init_equals_slices_of_the_backbone(tiny_t5):
    from backbone_cache.importance import magnitude_scores
    from shared.backbones import load_backbone

    backbone = load_backbone(str(tiny_t5), torch.device("cpu"))
    state = backbone.model.state_dict()
    cfg = T5SideConfig(backbone_d=64, backbone_d_ff=128, backbone_d_kv=16, num_heads=4, num_backbone_layers=3,
                     num_backbone_decoder_layers=3, reduction=4, encoder_layers=[1, 2], decoder_layers=[0, 2], vocab_size=30522)
    side = T5SideNetwork(cfg, state["lm_head.weight"])
    kept = side.init_from_backbone(state, magnitude_scores(backbone))
    # encoder block 1 -> side block 0
    K, K_att = kept["encoder.1"]["self"]
    block = side.encoder.blocks[0]
    assert len(K) == 16 and len(K_att) == 16 and torch.all(K[1:] > K[:-1])
    torch.testing.assert_close(block.self_attn.q.weight, state["encoder.block.1.layer.0.SelfAttention.q.weight"][K_att][:, K], rtol=0, atol=0)
    torch.testing.assert_close(block.self_norm.weight, state["encoder.block.1.layer.0.layer_norm.weight"][K], rtol=0, atol=0)
    K_in, K_ff, K_out = kept["encoder.1"]["ff"]
    torch.testing.assert_close(block.wi.weight, state["encoder.block.1.layer.1.DenseReluDense.wi.weight"][K_ff][:, K_in], rtol=0, atol=0)
    torch.testing.assert_close(block.wo.weight, state["encoder.block.1.layer.1.DenseReluDense.wo.weight"][K_out][:, K_ff], rtol=0, atol=0)
    # the chain: the rows kept by block 1's wo are block 2's input columns
    assert torch.equal(kept["encoder.2"]["self"][0], K_out)
    # magnitude ranking: kept wo rows are the top-L1 rows
    wo = state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    assert set(K_out.tolist()) == set(torch.topk(wo.abs().sum(1), 16).indices.tolist())
    # decoder block 2 -> side block 1, with cross-attention sliced by the decoder residual
    K_cross, K_catt = kept["decoder.2"]["cross"]
    dec = side.decoder.blocks[1]
    torch.testing.assert_close(dec.cross_attn.k.weight, state["decoder.block.2.layer.1.EncDecAttention.k.weight"][K_catt][:, K_cross], rtol=0, atol=0)
    torch.testing.assert_close(side.encoder.relative_bias.weight, state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])


def test_candidate_scoring_agrees_with_greedy_generation(tiny_t5, tmp_path):
    from side_train.evaluate import predict
    from side_train.recipe import data_sources, open_sources

    config = _args("--model", str(tiny_t5), "--out", str(tmp_path / "r"), "--limit", "48", "--epochs", "6", "--lr", "1e-2",
                   "--init", "magnitude")
    run(config)
    sources = open_sources(config.source, torch.device("cpu"))
    model = from_pretrained(tmp_path / "r" / "side_model")
    test = data_sources(sources, model.cfg)["test"]
    scored = predict(model, test, sources.spec, torch.device("cpu"), 16, "candidates")
    generated = predict(model, test, sources.spec, torch.device("cpu"), 16, "generate")
    valid = generated >= 0
    assert valid.mean() >= 0.9, "greedy outputs should be labels after training"
    assert np.array_equal(scored[valid], generated[valid])


def test_save_and_load_round_trip(t5_cache, tmp_path, monkeypatch):
    """side_model/ reloads to the weights training ended with (captured in memory), frozen head included."""
    import side_train.runs as runs

    trained = {}
    real_finish = runs.finish_member

    def capture(member, *args, **kwargs):
        model = member.trainee.state.model
        trained.update({k: v.detach().clone() for k, v in model.state_dict().items()}, lm_head=model.lm_head.clone())
        return real_finish(member, *args, **kwargs)

    monkeypatch.setattr(runs, "finish_member", capture)
    run(_args("--cache", str(t5_cache), "--out", str(tmp_path / "r"), "--max-steps", "2", "--lr", "1e-2"))
    folder = tmp_path / "r" / "side_model"
    cfg = json.loads((folder / "side_config.json").read_text())
    assert cfg["reduction"] == 8 and cfg["family"] == "t5"
    loaded = from_pretrained(folder)  # the LM head comes from the backbone's safetensors
    assert loaded.state_dict().keys() == trained.keys() - {"lm_head"}
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded.lm_head, trained["lm_head"])
    assert not torch.equal(trained["encoder.gate_alpha"], torch.zeros_like(trained["encoder.gate_alpha"]))  # it trained
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert {"trainable_parameters", "trainable_share", "peak_memory_bytes", "test_last", "test_at_best_validation",
            "validation_best", "train_seconds"} <= summary.keys()


def test_run_folder_is_not_clobbered(t5_cache, tmp_path):
    out = tmp_path / "r"
    run_cli("side_train.run", "--cache", str(t5_cache), "--out", str(out), "--max-steps", "1", "--quiet")
    before = (out / "summary.json").read_text()
    again = run_cli("side_train.run", "--cache", str(t5_cache), "--out", str(out), "--max-steps", "1", "--quiet", check=False)
    assert_one_line_error(again, "already holds this finished run")
    other = run_cli("side_train.run", "--cache", str(t5_cache), "--out", str(out), "--max-steps", "2", "--quiet", check=False)
    assert_one_line_error(other, "holds a different run")
    assert (out / "summary.json").read_text() == before


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--reduction", "3"], "does not divide"),
        (["--model", "bert-base-uncased"], "was built from model"),
        (["--side-layers", "0,7"], "side layers"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--attention-dropout", "1"], "--attention-dropout must be in [0, 1)"),
        (["--clip", "-1"], "--clip must be non-negative, got -1.0"),  # a negative clip would flip the gradients' sign
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
        (["--side-layers", "3,1,1"], "names a layer twice"),
        (["--side-layers", "1,2", "--drop-layers", "1"], "give one of them"),
        (["--out", "README.md/r"], "README.md is a file"),
    ],
)
def test_bad_training_input_is_one_line(t5_cache, tmp_path, extra, needle):
    proc = run_cli("side_train.run", "--cache", str(t5_cache), "--out", str(tmp_path / "r"), "--quiet", *extra, check=False)
    assert_one_line_error(proc, needle)


def test_a_refused_run_leaves_no_run_behind(t5_cache, tmp_path, capsys):
    """A run refused after its folder was named (here: no Fisher scores in the cache) writes no
    config.json, so the corrected command is not refused as 'a different run'."""
    from side_train.run import main as run_main

    cache = tmp_path / "c"  # the shared cache without its Fisher scores
    shutil.copytree(t5_cache, cache, ignore=shutil.ignore_patterns("importance.safetensors"))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["importance"] = None
    (cache / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "r"
    assert run_main(["--cache", str(cache), "--out", str(out), "--quiet"]) == 2
    assert "holds no Fisher importance" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    assert run_main(["--cache", str(cache), "--out", str(out), "--init", "magnitude", "--max-steps", "1", "--quiet",
                     "--clip", "0"]) == 0  # 0: no clipping
    assert (out / "summary.json").is_file()


def test_missing_split_is_reported(tiny_t5, tmp_path):
    cache = tmp_path / "c"
    run_cli("backbone_cache.extract", "--model", str(tiny_t5), "--out", str(cache), "--limit", "6", "--splits", "validation",
            "--init", "random", "--quiet")
    proc = run_cli("side_train.run", "--cache", str(cache), "--out", str(tmp_path / "r"), "--init", "magnitude", check=False)
    assert_one_line_error(proc, "no train split")


needs_cpu_bf16 = pytest.mark.skipif(not __import__("side_train.train", fromlist=["x"]).cpu_has_bf16(),
                                    reason="this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")


@needs_cpu_bf16
def test_bf16_side_step_on_a_cpu_tracks_float32():
    """Under CPU autocast the ladders take the bf16 states as they are (no float32 copy), and
    the loss and gradients follow the float32 step to bf16 accuracy."""
    import side_train.kernels as kernels

    side, batch = tiny_side_and_batch(dropout=0.1)
    torch.nn.init.normal_(side.upsample.weight, std=0.1)
    loss, grads, _ = loss_and_gradients(side, batch)
    seen = []
    original = kernels._dropped
    kernels._dropped = lambda x, keep, scale: seen.append((x.dim(), x.shape[-1], x.dtype)) or original(x, keep, scale)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, low_grads, _ = loss_and_gradients(side, batch)
    finally:
        kernels._dropped = original
    ladder_inputs = {dtype for dim, width, dtype in seen if width == 64}  # backbone width: the embedding ladders
    attention_maps = {dtype for dim, width, dtype in seen if dim == 4}
    assert ladder_inputs == {torch.bfloat16} and attention_maps == {torch.bfloat16}  # no float32 copy of the states
    assert abs(low.item() - loss.item()) < 0.02 * loss.item()
    flat, low_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in low_grads])
    assert torch.nn.functional.cosine_similarity(flat, low_flat, dim=0) > 0.99
    # the frozen LM head's bf16 copy is made once, not every step
    first = side.frozen_head(side.lm_head, torch.bfloat16)
    assert side.frozen_head(side.lm_head, torch.bfloat16) is first and torch.equal(first, side.lm_head.bfloat16())
    side.lm_head.mul_(2)  # changed in place: the copy follows
    assert torch.equal(side.frozen_head(side.lm_head, torch.bfloat16), side.lm_head.bfloat16())
    assert side.frozen_head(side.lm_head, torch.float32) is side.lm_head


def test_rms_norm_rounds_once_to_the_dtype_the_products_take():
    """float32: T5's formula bit for bit; under autocast (any input dtype) the float32 result
    rounded once to bf16, so the q, k and v products do not each cast their input."""
    from side_train.model import RMSNorm

    norm = RMSNorm(16, 1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 16) * 4
    reference = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert norm(x).dtype == torch.float32 and torch.equal(norm(x), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for given in (x, x.bfloat16()):
            out = norm(given)
            assert out.dtype == torch.bfloat16
            x32 = given.float()
            expected = (norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6))).bfloat16()
            assert torch.equal(out, expected)


@needs_cpu_bf16
def test_precision_flag_trains_in_bf16_on_a_cpu(t5_cache, tmp_path):
    from side_train.train import uses_bf16

    cpu = torch.device("cpu")
    assert not uses_bf16("auto", cpu) and not uses_bf16("fp32", cpu) and uses_bf16("bf16", cpu)
    run(_args("--cache", str(t5_cache), "--out", str(tmp_path / "fp32"), "--max-steps", "4", "--init", "magnitude", "--device", "cpu"))
    summary = run(_args("--cache", str(t5_cache), "--out", str(tmp_path / "bf16"), "--max-steps", "4", "--init", "magnitude",
                        "--precision", "bf16", "--device", "cpu"))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["identity"]["train"]["precision"] == "bf16"
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(a) == len(b) == 4 and a != b
    np.testing.assert_allclose(b, a, rtol=0.05)
    assert "accuracy" in summary["test_last"]


def test_bf16_is_refused_on_a_cpu_without_it(t5_cache, tmp_path, monkeypatch):
    import side_train.train as train_module

    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(Exception, match="no bfloat16 instructions") as err:
        run(_args("--cache", str(t5_cache), "--out", str(tmp_path / "r"), "--max-steps", "1", "--precision", "bf16", "--device", "cpu"))
    assert "use --precision fp32" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()  # refused before the run folder was made
    assert train_module.uses_bf16("auto", torch.device("cpu")) is False


def test_a_run_folder_of_another_version_is_a_one_line_error(t5_cache, tmp_path):
    out, flags = tmp_path / "r", ["--cache", str(t5_cache), "--max-steps", "1", "--quiet", "--device", "cpu"]
    run_cli("side_train.run", *flags, "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["run_folder_version"] == 2
    config["run_folder_version"] = 1
    (out / "config.json").write_text(json.dumps(config))
    again = run_cli("side_train.run", *flags, "--out", str(out), check=False)
    assert_one_line_error(again, "holds a run of another version of this tool", "--overwrite")
    other = run_cli("side_train.run", *flags, "--out", str(tmp_path / "r2"), "--limit", "3", check=False)
    assert_one_line_error(other, "--limit sets how a live run cuts its data", "drop --limit")


def test_a_run_is_not_resumed_where_its_step_would_change_dtype(t5_cache, tmp_path, monkeypatch):
    """--precision auto is float32 on a CPU and bf16 on a GPU: the same flags on another device are another run."""
    from shared.errors import UserError
    from side_train import train as train_module

    args = ["--cache", str(t5_cache), "--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / "r")]
    run(_args(*args))
    monkeypatch.setattr(train_module, "uses_bf16", lambda precision, device: precision != "fp32")  # as on a GPU
    with pytest.raises(UserError, match="its train.step_dtype is float32, the flags give bfloat16"):
        run(_args(*args))


def test_losses_read_in_groups_log_the_same_lines(t5_cache, tmp_path, monkeypatch):
    """On a GPU losses are read from the device several steps at a time; the log must not change
    (same lines, same order, every line written before a checkpoint or an epoch's evaluation)."""
    from side_train import train as train_module

    common = ["--cache", str(t5_cache), "--epochs", "2", "--save-every", "3", "--device", "cpu"]
    run(_args(*common, "--out", str(tmp_path / "each")))
    real_init, checkpoints = train_module.TrainState.__init__, []

    def grouped(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.loss_reads_every = 4

    def checked_save(folder, model, optimizer, progress):  # every step up to the checkpoint is already logged
        logged = [json.loads(line) for line in (tmp_path / "grouped" / "metrics.jsonl").read_text().splitlines()]
        checkpoints.append((progress["step"], max(r["step"] for r in logged if r["type"] == "train")))
        return real_save(folder, model, optimizer, progress)

    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module.TrainState, "__init__", grouped)
    monkeypatch.setattr(train_module, "save_checkpoint", checked_save)
    run(_args(*common, "--out", str(tmp_path / "grouped")))
    each, grouped_lines = ([{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
                            for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("each", "grouped"))
    assert each == grouped_lines and len(losses(tmp_path / "each")) == 10
    assert checkpoints and all(step == logged for step, logged in checkpoints)


def test_magnitude_scores_are_float32_on_the_cpu_whatever_the_weights(tiny_t5):
    """A backbone on a GPU runs in bf16: its magnitude scores must rank rows as float32 CPU
    scores do, and live on the CPU where the side network is initialised."""
    from backbone_cache.importance import magnitude_scores
    from shared.backbones import load_backbone

    rounded = load_backbone(str(tiny_t5), torch.device("cpu"), dtype=torch.bfloat16)
    scores = magnitude_scores(rounded)
    rounded.model.float()
    expected = magnitude_scores(rounded)
    assert scores.keys() == expected.keys() and "encoder.block.0.layer.0.SelfAttention.qkv" in scores
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" and torch.equal(s, expected[k]) for k, s in scores.items())
    assert scores["shared.columns"].shape == (rounded.d_model,)


def test_cache_live_refuses_a_device_that_computes_in_another_dtype(t5_cache, tmp_path, monkeypatch):
    """--cache --live must reproduce the cached states: a float32 (CPU) cache is not rerun in bf16, nor the reverse."""
    from shared.errors import UserError

    built = json.loads((t5_cache / "manifest.json").read_text())["compute_dtype"]
    other = "bfloat16" if built == "float32" else "float32"
    monkeypatch.setattr("side_train.recipe.default_dtype", lambda device: getattr(torch, other))  # another kind of device
    with pytest.raises(UserError, match=f"computed in {built}, and this device computes in {other}"):
        run(_args("--cache", str(t5_cache), "--live", "--max-steps", "1", "--out", str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()
