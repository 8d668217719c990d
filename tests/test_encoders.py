"""Encoders by structure: each architecture's states, importance scores and pruned init, and a
clear refusal (with --init random still training) where the layer map does not know the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_one_line_error, needs_minilm, run_cli
from make_tiny_t5 import copy_tokenizer

from shared.errors import UserError

pytestmark = needs_minilm  # the tiny models use the embedded MiniLM WordPiece tokenizer (vocab 30522)

D, D_FF, HEADS, R = 64, 128, 4, 4
COMMON = dict(vocab_size=30522, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=D_FF,
              max_position_embeddings=160)


def _configs() -> dict:
    import transformers as T

    return {
        "bert": T.BertConfig(**COMMON),
        "roberta": T.RobertaConfig(**COMMON, pad_token_id=0),
        "xlm-roberta": T.XLMRobertaConfig(**COMMON, pad_token_id=0),
        "electra": T.ElectraConfig(**COMMON, embedding_size=32),
        "distilbert": T.DistilBertConfig(vocab_size=30522, dim=D, hidden_dim=D_FF, n_layers=2, n_heads=HEADS, activation="gelu",
                                         max_position_embeddings=160),
        "deberta-v2": T.DebertaV2Config(**COMMON, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
                                        position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True),
        "albert": T.AlbertConfig(**COMMON, embedding_size=32),
        "modernbert": T.ModernBertConfig(**COMMON, pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101,
                                         sep_token_id=102),
        # pre-norm with BERT-like names but no attention.output.LayerNorm: no layout fits it
        "megatron-bert": T.MegatronBertConfig(**COMMON),
    }


LAYOUT = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "electra", "distilbert": "distilbert",
          "deberta-v2": "deberta-v2", "albert": "albert", "modernbert": "modernbert"}
UNKNOWN = "megatron-bert"

# the modules each side block copies, literally as each model names them (layer {i}; {next} = i + 1)
BERT_NAMES = dict(q="encoder.layer.{i}.attention.self.query", k="encoder.layer.{i}.attention.self.key",
                  v="encoder.layer.{i}.attention.self.value", o="encoder.layer.{i}.attention.output.dense",
                  attn_norm="encoder.layer.{i}.attention.output.LayerNorm", wi="encoder.layer.{i}.intermediate.dense",
                  wo="encoder.layer.{i}.output.dense", ff_norm="encoder.layer.{i}.output.LayerNorm")
ALBERT = "encoder.albert_layer_groups.0.albert_layers.0."
NAMES = {
    "bert": BERT_NAMES, "roberta": BERT_NAMES, "xlm-roberta": BERT_NAMES, "electra": BERT_NAMES,
    "distilbert": dict(q="transformer.layer.{i}.attention.q_lin", k="transformer.layer.{i}.attention.k_lin",
                       v="transformer.layer.{i}.attention.v_lin", o="transformer.layer.{i}.attention.out_lin",
                       attn_norm="transformer.layer.{i}.sa_layer_norm", wi="transformer.layer.{i}.ffn.lin1",
                       wo="transformer.layer.{i}.ffn.lin2", ff_norm="transformer.layer.{i}.output_layer_norm"),
    "deberta-v2": {**BERT_NAMES, "q": "encoder.layer.{i}.attention.self.query_proj", "k": "encoder.layer.{i}.attention.self.key_proj",
                   "v": "encoder.layer.{i}.attention.self.value_proj"},
    "albert": dict(q=ALBERT + "attention.query", k=ALBERT + "attention.key", v=ALBERT + "attention.value", o=ALBERT + "attention.dense",
                   attn_norm=ALBERT + "attention.LayerNorm", wi=ALBERT + "ffn", wo=ALBERT + "ffn_output",
                   ff_norm=ALBERT + "full_layer_layer_norm"),
    # pre-norm: attn_norm <- the feed-forward's input norm, ff_norm <- the next layer's input norm (final_norm after the last)
    "modernbert": dict(qkv="layers.{i}.attn.Wqkv", o="layers.{i}.attn.Wo", attn_norm="layers.{i}.mlp_norm", wi="layers.{i}.mlp.Wi",
                       wo="layers.{i}.mlp.Wo", ff_norm="layers.{next}.attn_norm"),
}
# what ranks the first kept dims: (tensor, reduced dim) -- the embedding columns, or the projection's output rows
FIRST_DIMS = {"electra": ("embeddings_project.weight", 1), "albert": ("encoder.embedding_hidden_mapping_in.weight", 1),
              "modernbert": ("embeddings.tok_embeddings.weight", 0), "default": ("embeddings.word_embeddings.weight", 0)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and a busy shared machine does not stall it in thread barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random model folder per architecture (2 layers, hidden 64, 4 heads), with the MiniLM tokenizer."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    root, folders = tmp_path_factory.mktemp("encoders"), {}
    for seed, (name, config) in enumerate(_configs().items()):
        torch.manual_seed(seed)
        folders[name] = root / name
        transformers.AutoModel.from_config(config).save_pretrained(folders[name])
        copy_tokenizer(folders[name])
    return folders


@pytest.fixture(scope="module")
def extractions(models, tmp_path_factory) -> dict:
    """Each model's cache (8 examples per split, batches of one, 24 tokens at most) and its Extraction."""
    from backbone_cache.extract import parse_args
    from backbone_cache.extraction import Extraction

    root, done = tmp_path_factory.mktemp("encoder_caches"), {}
    for name, folder in models.items():
        extraction = Extraction(parse_args(["--model", str(folder), "--out", str(root / name), "--limit", "8", "--batch-size", "1",
                                            "--max-length", "24", "--init", "random", "--device", "cpu", "--quiet"]))
        extraction.run()
        done[name] = (root / name, extraction)
    return done


def plain_read(cache: Path, split: str, index: int, array: str = "hidden") -> np.ndarray:
    group = zarr.open_group(str(cache / split / "encoder"), mode="r")
    offsets = group["offsets"][:]
    return group[array][offsets[index] : offsets[index + 1]]


@pytest.mark.parametrize("arch", list(_configs()))
@torch.no_grad()
def test_states_are_the_models_own_hidden_states(arch, models, extractions):
    """Batches of one: the stored bf16 states are the model's own hidden_states rounded, bit for bit."""
    import transformers

    cache, _ = extractions[arch]
    model = transformers.AutoModel.from_pretrained(models[arch]).eval()
    group = zarr.open_group(str(cache / "validation" / "encoder"), mode="r")
    count = group["offsets"].shape[0] - 1
    assert ("token_type_ids" in group) == (arch not in ("distilbert", "modernbert"))  # only where the model takes them
    for index in range(count):
        ids = torch.tensor(plain_read(cache, "validation", index, "input_ids"))[None].long()
        kwargs = {"token_type_ids": torch.tensor(plain_read(cache, "validation", index, "token_type_ids"))[None].long()} \
            if "token_type_ids" in group else {}
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **kwargs).hidden_states
        assert len(hidden) == 3 and hidden[0].shape[-1] == D  # ELECTRA, ALBERT: the embeddings after their projection
        want = torch.stack(hidden, dim=2)[0].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(plain_read(cache, "validation", index), want)


def _side(backbone, spec, scores, side_layers=(0, 1)):
    from side_train.families.encoder import EncoderSideNetwork
    from side_train.model import SideOptions

    cfg = EncoderSideNetwork.config_for(backbone, spec, SideOptions(reduction=R, side_layers=list(side_layers)))
    side = EncoderSideNetwork(cfg)
    state = {k: v.detach().float() for k, v in backbone.model.state_dict().items()}
    return side, state, side.init_from_backbone(state, scores)


def _top(values: torch.Tensor, keep: int) -> set[int]:
    return set(torch.topk(values, keep).indices.tolist())


@pytest.mark.parametrize("arch", list(LAYOUT))
def test_pruned_init_equals_slices_of_the_backbone(arch, extractions):
    from backbone_cache.importance import fisher_scores, magnitude_scores
    from shared.families.encoder import layout_of

    _, extraction = extractions[arch]
    backbone, spec = extraction.backbone, extraction.spec
    assert layout_of(backbone.model) == LAYOUT[arch]
    scores = magnitude_scores(backbone)
    side, state, kept = _side(backbone, spec, scores)
    d, d_ff, names = D // R, D_FF // R, NAMES[arch]
    tensor, dim = FIRST_DIMS.get(arch, FIRST_DIMS["default"])
    assert set(kept["encoder.0"]["in"].tolist()) == _top(state[tensor].abs().sum(dim), d)  # the first kept dims' rule

    def exact(param, name: str, i: int, kind: str = "weight", rows=None, cols=None, part: slice | None = None) -> None:
        key = f"{name.format(i=i, next=i + 1)}.{kind}"
        if arch == "modernbert" and name.endswith("attn_norm") and i == 1:
            key = f"final_norm.{kind}"  # after the last layer
        if key not in state:  # ModernBERT has no biases: the side's are zero
            assert kind == "bias" and torch.count_nonzero(param) == 0, key
            return
        want = state[key] if part is None else state[key][part]
        want = want if rows is None else want[rows]
        torch.testing.assert_close(param, want if cols is None else want[:, cols], rtol=0, atol=0)

    for i, block in enumerate(side.encoder.blocks):
        k = kept[f"encoder.{i}"]
        K, K_att, K_new, K_ff, K_out = k["in"], k["att"], k["mid"], k["ff"], k["out"]
        assert [len(x) for x in (K, K_att, K_new, K_ff, K_out)] == [d, d, d, d_ff, d] and torch.all(K_ff[1:] > K_ff[:-1])
        attn = block.self_attn
        for j, ours in enumerate("qkv"):
            name, part = (names["qkv"], slice(j * D, (j + 1) * D)) if "qkv" in names else (names[ours], None)
            exact(getattr(attn, ours).weight, name, i, rows=K_att, cols=K, part=part)
            exact(getattr(attn, ours).bias, name, i, "bias", rows=K_att, part=part)
        exact(attn.o.weight, names["o"], i, rows=K_new, cols=K_att)
        exact(attn.o.bias, names["o"], i, "bias", rows=K_new)
        for norm, ours in (("attn_norm", block.attn_norm), ("ff_norm", block.ff_norm)):
            exact(ours.weight, names[norm], i, rows=K_out if norm == "ff_norm" else K_new)
            exact(ours.bias, names[norm], i, "bias", rows=K_out if norm == "ff_norm" else K_new)
        gated = slice(0, D_FF) if arch == "modernbert" else None  # GeGLU: the activated half of Wi
        exact(block.wi.weight, names["wi"], i, rows=K_ff, cols=K_new, part=gated)
        exact(block.wi.bias, names["wi"], i, "bias", rows=K_ff, part=gated)
        exact(block.wo.weight, names["wo"], i, rows=K_out, cols=K_ff)
        exact(block.wo.bias, names["wo"], i, "bias", rows=K_out)
        # magnitude ranking: the kept rows are the top-L1 rows
        wo = state[f"{names['wo'].format(i=i)}.weight"]
        assert set(K_out.tolist()) == _top(wo.abs().sum(1), d)
        wi = state[f"{names['wi'].format(i=i)}.weight"][:D_FF]
        assert set(K_ff.tolist()) == _top(wi.abs().sum(1), d_ff)
    assert torch.equal(kept["encoder.1"]["in"], kept["encoder.0"]["out"])  # the chain
    if arch == "modernbert":  # a fused qkv is scored as its three thirds would be
        q, k, v = state["layers.0.attn.Wqkv.weight"].abs().chunk(3, 0)
        torch.testing.assert_close(scores["layers.0.attn.qkv"], (q * k * v).sum(1))
    if arch == "albert":  # one shared layer: both side layers are the same slices (the first's q/k/v columns aside)
        a, b = side.encoder.blocks
        assert torch.equal(kept["encoder.0"]["att"], kept["encoder.1"]["att"])
        assert all(torch.equal(x.weight, y.weight) for x, y in ((a.self_attn.o, b.self_attn.o), (a.wi, b.wi), (a.wo, b.wo)))
    fisher = fisher_scores(backbone, spec, extraction.plans["train"], 6, quiet=True)
    assert fisher.keys() == scores.keys() and all(torch.isfinite(s).all() for s in fisher.values())
    assert all(s.abs().sum() > 0 for s in fisher.values())
    # the batched engine (where the architecture allows it: DeBERTa's relative positions go through
    # its q/k projections once per batch, so it falls back) equals the batch-1 loop to float rounding
    batch1 = fisher_scores(backbone, spec, extraction.plans["train"], 6, quiet=True, batched=False)
    for key, value in batch1.items():
        scale = value.abs().max()
        torch.testing.assert_close(fisher[key] / scale, value / scale, rtol=1e-4, atol=1e-5, msg=key)
    _side(backbone, spec, fisher, side_layers=(1,))  # the Fisher scores drive the init as well


@pytest.mark.parametrize("arch", list(_configs()))
def test_random_init_trains_on_any_encoder(arch, extractions):
    """--init random needs only the sizes, read through each config's own names (DistilBERT: dim, hidden_dim, activation)."""
    from side_train.data import Batch
    from side_train.families.encoder import EncoderSideNetwork
    from side_train.model import SideOptions
    from side_train.recipe import build_side_network

    _, extraction = extractions[arch]
    backbone, spec = extraction.backbone, extraction.spec
    cfg = EncoderSideNetwork.config_for(backbone, spec, SideOptions(reduction=R))
    assert (cfg.backbone_d, cfg.backbone_d_ff, cfg.num_heads, cfg.num_backbone_layers) == (D, D_FF, HEADS, 2)
    assert cfg.activation == {"albert": "gelu_new", "megatron-bert": "gelu"}.get(arch, "gelu")
    model = build_side_network(cfg, backbone, "random", None, seed=0)
    tokens = extraction.plans["train"].token_batch(range(4), torch.device("cpu"))
    states = backbone.states(tokens)["encoder"].to(torch.bfloat16)
    mask = tokens["encoder"]["attention_mask"].bool()
    batch = Batch(torch.arange(4), torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64), {"encoder": states}, {"encoder": mask})
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_unknown_layout_is_one_line_and_random_init_trains(models, extractions, tmp_path, monkeypatch):
    from backbone_cache.extract import parse_args as extract_args
    from backbone_cache.extraction import Extraction
    from backbone_cache.importance import magnitude_scores
    from side_train.run import parse_args, run

    cache, extraction = extractions[UNKNOWN]
    with pytest.raises(UserError, match=f"architecture {UNKNOWN!r}; train it with --init random"):
        magnitude_scores(extraction.backbone)
    with pytest.raises(UserError, match=f"architecture {UNKNOWN!r}; train it with --init random"):  # extraction's default: fisher
        Extraction(extract_args(["--model", str(models[UNKNOWN]), "--out", str(tmp_path / "fisher"), "--limit", "4",
                                 "--splits", "train", "--max-length", "16", "--device", "cpu", "--quiet"])).run()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model on a busy machine
    proc = run_cli("side_train.run", "--cache", str(cache), "--out", str(tmp_path / "m"), "--max-steps", "2", "--init", "magnitude",
                   "--quiet", check=False)
    assert_one_line_error(proc, repr(UNKNOWN), "--init random")
    assert not (tmp_path / "m" / "side_model").exists()
    # the same command with --init random (in process: the CLI is only flags around run)
    run(parse_args(["--cache", str(cache), "--out", str(tmp_path / "r"), "--max-steps", "2", "--init", "random", "--quiet"]))
    assert (tmp_path / "r" / "summary.json").is_file() and (tmp_path / "r" / "side_model" / "model.safetensors").is_file()


def test_an_empty_layout_map_refuses_the_pruned_init(extractions, monkeypatch):
    """With no layout the map knows, BERT itself is refused by scores and by the init alike."""
    import shared.families.encoder as encoder
    from side_train.families.encoder import EncoderSideNetwork
    from side_train.model import SideOptions

    monkeypatch.setattr(encoder, "ENCODER_LAYOUTS", {})
    monkeypatch.setattr("side_train.families.encoder.ENCODER_LAYOUTS", {})
    backbone, spec = extractions["bert"][1].backbone, extractions["bert"][1].spec
    with pytest.raises(UserError, match="architecture 'bert'; train it with --init random"):
        backbone.score_targets()
    cfg = EncoderSideNetwork.config_for(backbone, spec, SideOptions(reduction=R))
    assert cfg.layout is None
    with pytest.raises(UserError, match="architecture 'bert'; train it with --init random"):
        EncoderSideNetwork(cfg).init_from_backbone({}, {})


def test_the_real_minilm_still_maps():
    """all-MiniLM-L6-v2 (model type bert) takes the BERT layout: its scores keep their names (a cache's stored Fisher
    scores have the same keys) and the init finds its parts. Loaded directly: the session's cache would cost more."""
    from backbone_cache.importance import magnitude_scores
    from shared.backbones import load_backbone
    from shared.families.encoder import layout_of
    from shared.tasks import TaskSpec

    backbone = load_backbone(None, torch.device("cpu"), dtype=torch.float32)
    assert backbone.config.model_type == "bert" and layout_of(backbone.model) == "bert"
    scores = magnitude_scores(backbone)
    assert scores.keys() == {*(f"encoder.layer.{i}.{m}.rows" for i in range(6)
                               for m in ("attention.output.dense", "intermediate.dense", "output.dense")),
                             *(f"encoder.layer.{i}.attention.self.qkv" for i in range(6)), "embeddings.word_embeddings.columns"}
    side, state, kept = _side(backbone, TaskSpec("rt", ["text"], "class", ["neg", "pos"]), scores, side_layers=(3,))
    k = kept["encoder.3"]
    torch.testing.assert_close(side.encoder.blocks[0].self_attn.q.weight,
                               state["encoder.layer.3.attention.self.query.weight"][k["att"]][:, k["in"]], rtol=0, atol=0)
    torch.testing.assert_close(side.encoder.blocks[0].ff_norm.bias, state["encoder.layer.3.output.LayerNorm.bias"][k["out"]],
                               rtol=0, atol=0)
