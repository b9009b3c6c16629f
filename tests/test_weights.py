"""Weights I/O: our safetensors format, the MiniLM backbone, the reference checkpoint converter."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from muxtiny import TINY_VOCAB, random_batch, tiny_model, write_wordlevel_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file

from muxserve.model.muxbert import MuxBertModel
from muxserve.model.weights import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    backbone_config,
    convert_reference_checkpoint,
    convert_reference_directory,
    load_backbone,
    load_model,
    minilm_dir,
    save_model,
)

torch.set_num_threads(1)

VARIANTS = ("gaussian_hadamard", "gaussian_attention_v2")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(model: MuxBertModel, texts: int = 6, seed: int = 0) -> torch.Tensor:
    ids, mask = random_batch(texts, 10, gen(seed))
    with torch.no_grad():
        return model(ids, mask)


# --------------------------------------------------------------------------- our format


def _scramble_keys(model: MuxBertModel) -> None:
    """Replace the fixed instance keys by values no seed would draw: a reload must keep them."""
    with torch.no_grad():
        model.instance_embedding.copy_(torch.randn(model.instance_embedding.shape, generator=gen(99)))


@pytest.mark.parametrize("n", [1, 2, 5])
def test_save_load_fp32_round_trip(tmp_path, n: int) -> None:
    model = tiny_model(num_instances=n, muxing_variant="gaussian_attention_v2" if n == 5 else "gaussian_hadamard")
    if n > 1:
        _scramble_keys(model)
    tok = write_wordlevel_tokenizer(tmp_path / "tok.json")
    save_model(model, tmp_path / "m", torch.float32, tok)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE}
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(theirs) == list(ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    if n > 1:
        # the stored keys, not the ones the config's seed would draw
        assert torch.equal(loaded.instance_embedding, model.instance_embedding)
        assert not torch.allclose(loaded.instance_embedding, MuxBertModel(model.config).instance_embedding)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_save_load_fp16_round_trip(tmp_path) -> None:
    model = tiny_model(num_instances=2)
    _scramble_keys(model)
    save_model(model, tmp_path / "fp32", torch.float32)
    save_model(model, tmp_path / "fp16")  # the default: fp16 on disk
    with safe_open(str(tmp_path / "fp16" / WEIGHTS_FILE), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}
    loaded = load_model(tmp_path / "fp16")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(theirs) == list(ours)
    for key in ours:
        assert theirs[key].dtype == torch.float32
        assert torch.equal(theirs[key], ours[key].half().float()), key
    torch.testing.assert_close(logits(loaded), logits(model), atol=2e-2, rtol=0)
    ratio = (tmp_path / "fp16" / WEIGHTS_FILE).stat().st_size / (tmp_path / "fp32" / WEIGHTS_FILE).stat().st_size
    assert 0.45 < ratio < 0.55, ratio


def test_load_is_strict(tmp_path) -> None:
    model = tiny_model(num_instances=2)
    save_model(model, tmp_path / "m", torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "demux_module.dense_1.bias"}
    save_file(state, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(RuntimeError, match="dense_1.bias"):
        load_model(tmp_path / "m")
    state = {**{k: v.contiguous() for k, v in model.state_dict().items()}, "extra.weight": torch.zeros(2)}
    save_file(state, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(RuntimeError, match="extra.weight"):
        load_model(tmp_path / "m")


def test_load_to_dtype(tmp_path) -> None:
    model = tiny_model(num_instances=2)
    save_model(model, tmp_path / "m", torch.float32)
    half = load_model(tmp_path / "m", dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


# --------------------------------------------------------------------------- backbone


def test_load_backbone_loads_every_key() -> None:
    from safetensors.torch import load_file

    cfg = backbone_config(num_instances=2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (384, 6, 30522)
    model = MuxBertModel(cfg)
    keys = load_backbone(model)
    assert keys == sorted(model.bert.state_dict())
    raw = load_file(str(minilm_dir() / "model.safetensors"))
    bert = model.bert.state_dict()
    for key in keys:
        source = raw.get(key, raw.get(f"bert.{key}"))
        assert source is not None, key
        assert torch.equal(bert[key], source.float()), key


@pytest.mark.slow
def test_backbone_encoder_matches_huggingface() -> None:
    """Our N=1 encoder with the MiniLM weights gives the Hugging Face BertModel's hidden states."""
    from muxserve.model.tokenizer import TextTokenizer

    model = MuxBertModel(backbone_config(num_instances=1)).eval()
    load_backbone(model)
    tok = TextTokenizer(minilm_dir() / TOKENIZER_FILE, 64)
    ids, mask = tok(["a gripping, beautifully acted film", "dull.", "the plot goes nowhere and the jokes fall flat"])
    hf = transformers.BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model.encode(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- reference converter
#
# The reference checkpoints are built independently of our model: the encoder is Hugging Face's
# BertModel (its own parameter names and its own forward), the multiplexing parts are tensors named
# as princeton-nlp's datamux-pretraining names them (MuxedBertForSequenceClassification,
# IndexPosDemuxModule, IndexPosDemultiplexerTokenLevel, RetrievalHeadIndexPosDemultiplexingBERT),
# and the expected logits are that reference's forward, written out from its description.

REF_CLS = 101  # the reference writes id 101 ([CLS]) at position 0 of every text


def hf_bert_config(**overrides: object) -> transformers.BertConfig:
    base = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertConfig(**{**base, **overrides})


def _randomised(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """Every parameter drawn at random (HF initialises LayerNorms to 1/0, which would hide a swap)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def reference_checkpoint(n: int, variant: str = "gaussian_hadamard", demux_layers: int = 3, architecture: str = "MuxedBertForSequenceClassification", seed: int = 0) -> tuple[dict, dict[str, torch.Tensor], transformers.BertModel]:
    """(config.json, state dict, the HF encoder) of a reference checkpoint with random weights."""
    g = gen(seed)
    hf_cfg = hf_bert_config()
    bert = _randomised(transformers.BertModel(hf_cfg, add_pooling_layer=False), g)
    d, vocab = hf_cfg.hidden_size, hf_cfg.vocab_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    state = {f"bert.{k}": v.clone() for k, v in bert.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(hf_cfg.max_position_embeddings)[None]  # older checkpoints carry the buffer
    state["bert.pooler.dense.weight"], state["bert.pooler.dense.bias"] = rand(d, d), rand(d)  # and a pooler
    state["instance_embedding"] = rand(n, d)
    state["demux_module.demux_instance_embedding"] = rand(n, d)
    for i in range(1, demux_layers + 1):
        state[f"demux_module.dense_{i}.weight"], state[f"demux_module.dense_{i}.bias"] = rand(d, 2 * d if i == 1 else d), rand(d)
        state[f"demux_module.layer_norm_{i}.weight"], state[f"demux_module.layer_norm_{i}.bias"] = rand(d), rand(d)
    for head in ("demultiplexer", "retrieval_head"):
        state[f"{head}.pre_decoder.weight"], state[f"{head}.pre_decoder.bias"] = rand(d, d), rand(d)
        state[f"{head}.pre_decoder_layer_norm.weight"], state[f"{head}.pre_decoder_layer_norm.bias"] = rand(d), rand(d)
    state["retrieval_head.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()  # tied
    state["retrieval_head.decoder.bias"] = rand(vocab)
    state["classifier.weight"], state["classifier.bias"] = rand(2, d), rand(2)
    if variant == "gaussian_attention_v2":
        from transformers.models.electra.modeling_electra import ElectraConfig, ElectraLayer

        electra_cfg = ElectraConfig(**{k: v for k, v in hf_cfg.to_dict().items() if k in ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps")})
        for name in ("muxing_attention", "muxing_attention_2"):
            state.update({f"{name}.{k}": v.clone() for k, v in _randomised(ElectraLayer(electra_cfg), g).state_dict().items()})
    config = {
        **hf_cfg.to_dict(), "architectures": [architecture], "model_type": "bert",
        "num_instances": n, "muxing_variant": variant, "demuxing_variant": "index_pos",
        "gaussian_hadamard_norm": 1.0, "learn_muxing": 0, "num_hidden_demux_layers": demux_layers,
        "retrieval_loss_coeff": 0.1, "task_loss_coeff": 0.9, "id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1},
    }
    return config, state, bert


def reference_logits(state: dict[str, torch.Tensor], bert: transformers.BertModel, ids: torch.Tensor, n: int, demux_layers: int) -> torch.Tensor:
    """The reference's forward for full groups (gaussian_hadamard, index_pos): [CLS] forced at
    position 0, embeddings keyed and averaged per group, the mixture through BertModel as
    inputs_embeds with no attention mask, then the classification demux on position 0."""
    ids = ids.clone()
    ids[:, 0] = REF_CLS
    with torch.no_grad():
        emb = bert.embeddings(input_ids=ids)
        t, length, d = emb.shape
        mixed = (emb.view(t // n, n, length, d) * state["instance_embedding"][None, :, None, :]).mean(dim=1)
        cls_hidden = bert(inputs_embeds=mixed).last_hidden_state[:, 0]
        return reference_classification_logits(state, cls_hidden, n, demux_layers, bert.config.layer_norm_eps)


def reference_classification_logits(state: dict[str, torch.Tensor], cls_hidden: torch.Tensor, n: int, demux_layers: int, eps: float) -> torch.Tensor:
    """The reference's sequence-classification demux (IndexPosDemultiplexerTokenLevel), written
    from its description: for slot i, z = [k_i, h]; x = gelu(dense_1 z); for j in 2..K-1:
    x = gelu(dense_j x) + x; out = LayerNorm(gelu(pre_decoder x)) + x; classifier(out)."""

    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    b, d = cls_hidden.shape
    keys = state["demux_module.demux_instance_embedding"]
    z = torch.cat([keys[None].expand(b, n, d), cls_hidden[:, None].expand(b, n, d)], dim=-1).reshape(b * n, 2 * d)
    x = F.gelu(lin("demux_module.dense_1", z))
    for j in range(2, demux_layers):
        x = F.gelu(lin(f"demux_module.dense_{j}", x)) + x
    ln_w, ln_b = state["demultiplexer.pre_decoder_layer_norm.weight"], state["demultiplexer.pre_decoder_layer_norm.bias"]
    x = F.layer_norm(F.gelu(lin("demultiplexer.pre_decoder", x)), (d,), ln_w, ln_b, eps) + x
    return lin("classifier", x)


def full_groups(n: int, groups: int, seed: int) -> torch.Tensor:
    ids, _ = random_batch(n * groups, 10, gen(seed), cls=REF_CLS)
    return ids


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("demux_layers", [3, 2])
def test_converted_reference_checkpoint_gives_the_references_logits(n: int, demux_layers: int) -> None:
    config, state, bert = reference_checkpoint(n, demux_layers=demux_layers)
    converted = convert_reference_checkpoint(config, state)
    assert converted.config.labels == ["neg", "pos"] and converted.config.num_instances == n
    assert converted.config.task == "sequence_classification" and not converted.instance_embedding.requires_grad
    ids = full_groups(n, 3, seed=n)
    with torch.no_grad():
        # padding is part of the input the reference reads (no attention mask): pass all-ones
        out = converted(ids, torch.ones_like(ids))
    torch.testing.assert_close(out, reference_logits(state, bert, ids, n, demux_layers), atol=1e-5, rtol=0)


def _kept(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a reference state the classifier uses, under our names."""
    drop = ("bert.embeddings.position_ids", "bert.pooler.", "demux_module.layer_norm_", "demux_module.dense_3.", "retrieval_head.decoder.weight")
    return {("retrieval_head.bias" if k == "retrieval_head.decoder.bias" else k): v for k, v in state.items() if not k.startswith(drop)}


@pytest.mark.parametrize("architecture", ["MuxedBertForSequenceClassification", "MuxedBertForTokenClassification"])
def test_converter_takes_every_tensor_of_the_attention_variant(architecture: str) -> None:
    """gaussian_attention_v2's two muxing layers are HF ElectraLayers: every tensor of the
    checkpoint lands in the model unchanged (loading is strict: a name we do not know fails)."""
    config, state, _ = reference_checkpoint(2, variant="gaussian_attention_v2", architecture=architecture)
    converted = convert_reference_checkpoint(config, state)
    assert converted.config.muxing_variant == "gaussian_attention_v2"
    assert converted.config.task == ("token_classification" if "Token" in architecture else "sequence_classification")
    ours = converted.state_dict()
    for key, value in _kept(state).items():
        assert torch.equal(ours[key], value.float()), key
    ids = full_groups(2, 2, seed=7)
    with torch.no_grad():
        assert torch.isfinite(converted(ids, torch.ones_like(ids))).all()


def test_convert_reference_rejects_mismatches() -> None:
    config, state, _ = reference_checkpoint(2)
    missing = {k: v for k, v in state.items() if k != "demux_module.dense_1.weight"}
    with pytest.raises(ValueError, match="missing.*dense_1.weight"):
        convert_reference_checkpoint(config, missing)
    with pytest.raises(ValueError, match="unexpected.*something_else"):
        convert_reference_checkpoint(config, {**state, "something_else.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="num_hidden_demux_layers"):
        convert_reference_checkpoint({**config, "num_hidden_demux_layers": 4}, state)
    with pytest.raises(ValueError):
        convert_reference_checkpoint({**config, "muxing_variant": "random_ortho"}, state)
    # a plain HF BertForSequenceClassification (pooler, no mux keys) cannot become our pooler-less N=1 model
    plain = transformers.BertForSequenceClassification(hf_bert_config(num_labels=2))
    plain_config = {**plain.config.to_dict(), "architectures": ["BertForSequenceClassification"]}
    with pytest.raises(ValueError, match="pooler"):
        convert_reference_checkpoint(plain_config, plain.state_dict())


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_convert_reference_directory(tmp_path, fmt: str) -> None:
    config, state, bert = reference_checkpoint(2)
    src = tmp_path / "ref"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(src / "model.safetensors"))
    else:
        torch.save(state, src / "pytorch_model.bin")
    write_wordlevel_tokenizer(src / TOKENIZER_FILE)
    out = convert_reference_directory(src, tmp_path / "ours")
    assert (out / TOKENIZER_FILE).read_text() == (src / TOKENIZER_FILE).read_text()
    loaded = load_model(out)
    assert loaded.config.labels == ["neg", "pos"]
    ids = full_groups(2, 3, seed=5)
    with torch.no_grad():
        out_logits = loaded(ids, torch.ones_like(ids))
    torch.testing.assert_close(out_logits, reference_logits(state, bert, ids, 2, 3), atol=5e-2, rtol=0)  # fp16 on disk


def test_int8_word_embeddings_roundtrip_is_close_and_smaller(tmp_path):
    """The repository format: word embeddings per-row int8, the rest fp16."""
    import os

    import torch

    from muxserve.model.muxbert import MuxBertConfig, MuxBertModel
    from muxserve.model.weights import WEIGHTS_FILE, load_model, save_model

    torch.manual_seed(0)
    model = MuxBertModel(MuxBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_instances=2)).eval()
    save_model(model, tmp_path / "fp16")
    save_model(model, tmp_path / "int8", int8_embeddings=True)
    assert os.path.getsize(tmp_path / "int8" / WEIGHTS_FILE) < 0.6 * os.path.getsize(tmp_path / "fp16" / WEIGHTS_FILE)
    loaded = load_model(tmp_path / "int8")
    w, w8 = model.bert.embeddings.word_embeddings.weight, loaded.bert.embeddings.word_embeddings.weight
    row_max = w.abs().amax(1, keepdim=True)
    assert ((w - w8).abs() <= row_max / 127 * 0.51 + 1e-3 * row_max).all()  # half a quantization step (+ fp16 scale)
    ids = torch.randint(5, 30000, (4, 12))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(loaded(ids, mask), model(ids, mask), atol=2e-2, rtol=0)


def test_package_sets_labels_and_short_group_policy(tmp_path) -> None:
    """`muxserve package --labels --short-group-policy --mask-group-padding`: the packaged config
    carries them, the weights are the same, and a policy the model does not know (or a padding
    mask on the baseline) is refused."""
    from muxserve.model.muxbert import MuxBertConfig
    from muxserve.model.packaging import package_model

    torch.manual_seed(0)
    model = MuxBertModel(MuxBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_instances=2)).eval()
    save_model(model, tmp_path / "run")
    assert model.config.short_group_policy == "copy"
    target = package_model(tmp_path / "run", tmp_path / "repo", "m", labels=["neg", "pos"], short_group_policy="pad")
    packaged = load_model(target)
    assert packaged.config.short_group_policy == "pad" and packaged.config.labels == ["neg", "pos"]
    torch.testing.assert_close(packaged.classifier.state_dict(), {k: v.half().float() for k, v in model.classifier.state_dict().items()})
    assert (tmp_path / "repo" / "m" / "config.pbtxt").exists()
    with pytest.raises(ValueError, match="short_group_policy"):
        package_model(tmp_path / "run", tmp_path / "repo", "m2", short_group_policy="repeat")
    assert not packaged.config.mask_group_padding  # left as the model has it
    masked = load_model(package_model(tmp_path / "run", tmp_path / "repo", "m3", mask_group_padding=True))
    assert masked.config.mask_group_padding and masked.config.short_group_policy == "copy"
    baseline = MuxBertModel(MuxBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
    save_model(baseline, tmp_path / "base")
    with pytest.raises(ValueError, match="mask_group_padding is for mux models"):
        package_model(tmp_path / "base", tmp_path / "repo", "m4", mask_group_padding=True)
