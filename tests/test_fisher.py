"""The batched Fisher engine equals the batch-1 loop (importance.fisher_importance's recipe) to float rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from backbone_cache.fisher import ScoreTargets, default_targets, fisher_scores, length_batches


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and a busy shared machine does not stall it in thread barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch1_reference(model: torch.nn.Module, examples: list[dict], loss_of, targets: ScoreTargets) -> dict[str, torch.Tensor]:
    """The batch-1 loop of backbone_cache.importance: one example at a time, the sum of p.grad ** 2 over
    every 2-D weight (a tied weight's grad sums all its uses), then the per-row reductions of the targets."""
    params = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    fisher = {name: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for name, p in params.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(p.dim() == 2)
    try:
        for example in examples:
            model.zero_grad(set_to_none=True)
            loss_of(model, example).backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.to(fisher[name].dtype) ** 2
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    by_weight = {id(p): fisher[name] for name, p in params.items()}

    def full(name: str, parent: str | None = None) -> torch.Tensor:
        modules = dict(model.named_modules())
        return by_weight[id(modules.get(f"{parent}.{name}", modules.get(name)).weight)]

    scores = {f"{n}.rows": full(n).abs().sum(1) for n in targets.rows}
    scores.update({f"{n}.columns": full(n).abs().sum(0) for n in targets.columns})
    for attention, q, k, v in targets.qkv:
        scores[f"{attention}.qkv"] = (full(q, attention) * full(k, attention) * full(v, attention)).abs().sum(1)
    return scores


def pad(sequences: list[list[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


def encoder_probe_losses(head: torch.nn.Linear):
    """Each example's cross-entropy of a fixed head on the mask-weighted mean of the last hidden state."""
    def losses(model, batch):
        kwargs = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).last_hidden_state
        mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.cross_entropy(head(pooled), batch["labels"], reduction="none")

    return losses


def t5_example_losses(model, batch):
    """Each example's mean token cross-entropy (labels padded with -100), as model(ids, labels).loss alone."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    keep = (labels != -100).to(token.dtype)
    return (token * keep).sum(1) / keep.sum(1)


def assert_scores_match(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], keys: set[str]) -> None:
    assert set(ours) == keys
    for key in keys:
        assert key in reference, key
        a, b = ours[key], reference[key]
        assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == b.shape, key
        scale = b.abs().max().clamp_min(1e-30)
        assert b.abs().max() > 0 or key.endswith("pooler.dense.rows"), f"{key}: reference is all zeros"
        assert torch.allclose(a / scale, b / scale, rtol=1e-4, atol=1e-5), (key, (a - b).abs().max() / scale)


def expected_keys(targets: ScoreTargets) -> set[str]:
    return {n + ".rows" for n in targets.rows} | {n + ".columns" for n in targets.columns} | {a + ".qkv" for a, *_ in targets.qkv}


def random_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, type_vocab_size=2)
    return BertModel(config).eval()


def tiny_t5(tied: bool, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=53, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                      feed_forward_proj="relu" if tied else "gated-gelu", tie_word_embeddings=tied,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    if not tied:  # transformers 5 always ties T5's LM head; v1.1 checkpoints have their own
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return model.eval()


def bert_examples(n: int, seed: int, token_types: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in random_lengths(n, 3, 17, seed):
        ids = torch.randint(1, 97, (length,), generator=gen)  # 0 is [PAD] (padding_idx); see test_bert_pad_token
        example = {"input_ids": ids, "labels": torch.randint(0, 3, (), generator=gen)}
        if token_types:
            example["token_type_ids"] = (torch.arange(length) >= length // 2).long()
        out.append(example)
    return out


def bert_batches(examples: list[dict], indices: list[list[int]]) -> list[dict]:
    batches = []
    for rows in indices:
        ids, mask = pad([examples[i]["input_ids"].tolist() for i in rows])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([examples[i]["labels"] for i in rows])}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = pad([examples[i]["token_type_ids"].tolist() for i in rows])[0]
        batches.append(batch)
    return batches


def bert_loss_batch1(head: torch.nn.Linear):
    def loss_of(model, example):
        kwargs = {"token_type_ids": example["token_type_ids"][None]} if "token_type_ids" in example else {}
        pooled = model(input_ids=example["input_ids"][None], **kwargs).last_hidden_state.mean(1)
        return torch.nn.functional.cross_entropy(head(pooled), example["labels"][None])

    return loss_of


@pytest.mark.parametrize("token_types", [False, True])
def test_bert_matches_batch1(token_types):
    model = tiny_bert()
    torch.manual_seed(1)
    head = torch.nn.Linear(32, 3).requires_grad_(False)
    examples = bert_examples(19, seed=2, token_types=token_types)
    targets = default_targets(model)
    reference = batch1_reference(model, examples, bert_loss_batch1(head), targets)
    assert "embeddings.word_embeddings" in targets.columns and len(targets.qkv) == 2
    batches = bert_batches(examples, length_batches([len(e["input_ids"]) for e in examples], max_tokens=64, max_examples=5))
    assert any(len(set(b["attention_mask"].sum(1).tolist())) > 1 for b in batches)  # padding is exercised
    model.embeddings.LayerNorm.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    ours = fisher_scores(model, batches, encoder_probe_losses(head), targets, quiet=True, total=len(examples))
    keys = expected_keys(targets)
    assert {"embeddings.word_embeddings.columns", "encoder.layer.0.attention.self.qkv", "encoder.layer.1.output.dense.rows",
            "encoder.layer.0.attention.self.query.rows", "pooler.dense.rows"} <= keys
    assert_scores_match(ours, reference, keys)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())


def test_bert_long_examples_take_the_full_path():
    """Examples longer than out*in/(out+in) take the G_n path for rows."""
    model = tiny_bert(seed=3)
    head = torch.nn.Linear(32, 3).requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    examples = [{"input_ids": torch.randint(1, 97, (n,), generator=gen), "labels": torch.tensor(i % 3)} for i, n in enumerate([40, 9, 33, 5])]
    targets = ScoreTargets(rows=["encoder.layer.0.intermediate.dense", "encoder.layer.1.attention.output.dense"],
                           qkv=[("encoder.layer.1.attention.self", "query", "key", "value")],
                           columns=["embeddings.word_embeddings"])
    reference = batch1_reference(model, examples, bert_loss_batch1(head), targets)
    batches = bert_batches(examples, [[0, 2], [1, 3]])  # T = 40 (G_n path) and T = 9 (Gram path) for the same weight
    ours = fisher_scores(model, batches, encoder_probe_losses(head), targets, quiet=True)
    assert_scores_match(ours, reference, expected_keys(targets))


def test_bert_pad_token_inside_an_example():
    """The [PAD] id (nn.Embedding padding_idx) gets no gradient in either loop, also where it is a real token."""
    model = tiny_bert(seed=5)
    head = torch.nn.Linear(32, 3).requires_grad_(False)
    examples = [{"input_ids": torch.tensor([5, 0, 7, 0, 9]), "labels": torch.tensor(1)},
                {"input_ids": torch.tensor([0, 3]), "labels": torch.tensor(2)}]
    targets = ScoreTargets(columns=["embeddings.word_embeddings"])
    reference = batch1_reference(model, examples, bert_loss_batch1(head), targets)
    ours = fisher_scores(model, bert_batches(examples, [[0, 1]]), encoder_probe_losses(head), targets, quiet=True)
    assert_scores_match(ours, reference, {"embeddings.word_embeddings.columns"})


def t5_examples(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    sources, targets = random_lengths(n, 2, 13, seed), random_lengths(n, 1, 4, seed + 1)
    return [{"input_ids": torch.randint(2, 53, (s,), generator=gen), "labels": torch.randint(1, 53, (t,), generator=gen)}
            for s, t in zip(sources, targets)]


def t5_batches(examples: list[dict], indices: list[list[int]]) -> list[dict]:
    batches = []
    for rows in indices:
        ids, mask = pad([examples[i]["input_ids"].tolist() for i in rows])
        labels = pad([examples[i]["labels"].tolist() for i in rows], value=-100)[0]
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def t5_loss_batch1(model, example):
    return model(input_ids=example["input_ids"][None], labels=example["labels"][None]).loss


@pytest.mark.parametrize("tied", [True, False], ids=["v1.0-tied", "v1.1-untied"])
def test_t5_matches_batch1(tied):
    model = tiny_t5(tied)
    assert (model.lm_head.weight is model.shared.weight) == tied
    examples = t5_examples(17, seed=6)
    targets = default_targets(model)
    reference = batch1_reference(model, examples, t5_loss_batch1, targets)
    assert targets.columns == ["shared"] and ("lm_head" in targets.rows) == (not tied)
    batches = t5_batches(examples, length_batches([len(e["input_ids"]) for e in examples], max_tokens=40, max_examples=6))
    ours = fisher_scores(model, batches, t5_example_losses, targets, quiet=True)
    keys = expected_keys(targets)
    assert {"shared.columns", "encoder.block.0.layer.0.SelfAttention.qkv", "decoder.block.1.layer.1.EncDecAttention.qkv",
            "encoder.block.1.layer.0.SelfAttention.o.rows", "decoder.block.0.layer.2.DenseReluDense.wo.rows"} <= keys
    assert ("decoder.block.0.layer.2.DenseReluDense.wi_1.rows" in keys) == (not tied)
    assert_scores_match(ours, reference, keys)


def test_t5_tied_columns_need_the_combined_gradient():
    """shared.columns squares the sum of the encoder, decoder and LM-head gradients, not each use apart."""
    model = tiny_t5(tied=True, seed=7)
    examples = t5_examples(6, seed=8)
    batches = t5_batches(examples, [[0, 1, 2], [3, 4, 5]])
    targets = ScoreTargets(columns=["shared"])
    combined = fisher_scores(model, batches, t5_example_losses, targets, quiet=True)
    reference = batch1_reference(model, examples, t5_loss_batch1, targets)
    assert_scores_match(combined, reference, {"shared.columns"})
    # the same numbers with the LM head untied: the embedding's and the head's Fisher apart do not add up to the tied one
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    apart = fisher_scores(untied, batches, t5_example_losses, ScoreTargets(columns=["shared", "lm_head"]), quiet=True)
    reference_apart = batch1_reference(untied, examples, t5_loss_batch1, ScoreTargets(columns=["shared", "lm_head"]))
    assert_scores_match(apart, reference_apart, {"shared.columns", "lm_head.columns"})
    assert not torch.allclose(apart["shared.columns"] + apart["lm_head.columns"], combined["shared.columns"], rtol=1e-2)
    # an alias of the same weight is the same weight: the same scores, under the name given
    alias = fisher_scores(model, batches, t5_example_losses, ScoreTargets(columns=["decoder.embed_tokens"]), quiet=True)
    assert torch.allclose(alias["decoder.embed_tokens.columns"], combined["shared.columns"], rtol=1e-6)


def test_float64_models_match_to_float64_rounding():
    """In float64 the only float32 step left is the returned scores (and T5's softmax): the algebra is exact.

    (In float32 a batched forward can flip a ReLU whose input is within rounding of 0, which moves
    a score by ~1e-4 relative; float64 makes such flips vanishingly rare.)"""
    bert = tiny_bert(seed=9).double()
    head = torch.nn.Linear(32, 3).double().requires_grad_(False)
    examples = bert_examples(11, seed=10, token_types=True)
    targets = default_targets(bert)
    reference = batch1_reference(bert, examples, bert_loss_batch1(head), targets)
    batches = bert_batches(examples, length_batches([len(e["input_ids"]) for e in examples], max_tokens=48, max_examples=4))
    ours = fisher_scores(bert, batches, encoder_probe_losses(head), targets, quiet=True)
    t5 = tiny_t5(tied=True, seed=11).double()
    t5_ex = t5_examples(9, seed=12)
    t5_targets = default_targets(t5)
    t5_reference = batch1_reference(t5, t5_ex, t5_loss_batch1, t5_targets)
    t5_ours = fisher_scores(t5, t5_batches(t5_ex, [[0, 1, 2, 3], [4, 5, 6, 7, 8]]), t5_example_losses, t5_targets, quiet=True)
    for got, want in ((ours, reference), (t5_ours, t5_reference)):
        for key, value in want.items():
            assert got[key].dtype == torch.float32
            assert torch.allclose(got[key].double(), value, rtol=1e-6, atol=1e-9 * float(value.abs().max())), key


def test_bad_targets_raise_clear_errors():
    model = tiny_bert()
    head = torch.nn.Linear(32, 3).requires_grad_(False)
    batches = bert_batches(bert_examples(2, seed=0, token_types=False), [[0, 1]])
    losses = encoder_probe_losses(head)
    with pytest.raises(ValueError, match="no module named 'encoder.layer.7.output.dense'"):
        fisher_scores(model, batches, losses, ScoreTargets(rows=["encoder.layer.7.output.dense"]), quiet=True)
    with pytest.raises(ValueError, match="no module named 'query_proj'"):
        fisher_scores(model, batches, losses, ScoreTargets(qkv=[("encoder.layer.0.attention.self", "query_proj", "key", "value")]),
                      quiet=True)
    with pytest.raises(ValueError, match="is a BertLayer, not Linear"):
        fisher_scores(model, batches, losses, ScoreTargets(rows=["encoder.layer.0"]), quiet=True)
    with pytest.raises(ValueError, match="not to each of the batch's 2 examples"):  # position ids are shared by the batch
        fisher_scores(model, batches, losses, ScoreTargets(columns=["embeddings.position_embeddings"]), quiet=True)
    with pytest.raises(ValueError, match="eval mode"):
        fisher_scores(model.train(), batches, losses, ScoreTargets(rows=["pooler.dense"]), quiet=True)
    t5 = tiny_t5(tied=True)
    with pytest.raises(ValueError, match="tied weight"):
        fisher_scores(t5, [], t5_example_losses, ScoreTargets(rows=["lm_head"]), quiet=True)
    assert not any(m._forward_hooks for m in model.modules()), "hooks are removed after an error"


def test_length_batches_bound_tokens():
    lengths = [5, 30, 7, 12, 12, 3, 30, 1]
    batches = length_batches(lengths, max_tokens=36, max_examples=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 36 for b in batches)


def _close(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        scale = value.abs().max()
        assert scale > 0, key
        torch.testing.assert_close(ours[key] / scale, value / scale, rtol=1e-4, atol=1e-5, msg=key)


def test_extraction_scores_t5_batched_as_the_batch1_loop(tiny_t5, tmp_path, capsys):
    """backbone_cache.importance on a T5 cache's plan: the batched engine (the default) equals the batch-1 loop."""
    from backbone_cache.extract import parse_args
    from backbone_cache.extraction import Extraction
    from backbone_cache.importance import fisher_scores as importance_fisher

    extraction = Extraction(parse_args(["--model", str(tiny_t5), "--out", str(tmp_path / "c"), "--limit", "24",
                                        "--splits", "train", "--quiet"]))
    plan = extraction.plans["train"]
    assert len(set(plan.lengths.tolist())) > 3  # padding inside the batched forwards
    batched = importance_fisher(extraction.backbone, extraction.spec, plan, 20, quiet=False)
    assert "one example at a time" not in capsys.readouterr().err  # no fallback
    _close(batched, importance_fisher(extraction.backbone, extraction.spec, plan, 20, quiet=True, batched=False))


def test_a_use_shared_by_the_batch_falls_back_to_the_exact_loop(tmp_path, capsys):
    """A scored weight applied to a batch-wide tensor (here: a linear on the position embeddings) cannot be read
    per example from one backward: importance.fisher_scores says so and scores one example at a time."""
    from make_tiny_t5 import make_random_encoder

    from backbone_cache.extract import parse_args
    from backbone_cache.extraction import Extraction
    from backbone_cache.importance import fisher_scores as importance_fisher
    from shared.families import ScoreTargets as Targets

    extraction = Extraction(parse_args(["--model", str(make_random_encoder(tmp_path / "bert", d_model=32, layers=2, heads=2, d_ff=64)),
                                        "--out", str(tmp_path / "c"), "--limit", "16", "--splits", "train", "--quiet"]))
    backbone = extraction.backbone
    targets = Targets(rows=["encoder.layer.0.output.dense"], columns=["embeddings.position_embeddings"])
    backbone.score_targets = lambda: targets
    plan = extraction.plans["train"]
    scores = importance_fisher(backbone, extraction.spec, plan, 8, quiet=False)
    assert "scoring one example at a time instead" in capsys.readouterr().err
    _close(scores, importance_fisher(backbone, extraction.spec, plan, 8, quiet=True, batched=False))
