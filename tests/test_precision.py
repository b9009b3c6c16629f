"""Serving precision: detection from the CPU's flags, resolution per device, and a bf16 engine
that answers as the fp32 one does on a bundled model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, SST2_DEV

from muxserve.model.precision import cpu_flags, cpu_has_fast_bf16, cpu_has_fast_int8, resolve_precision
from muxserve.model.tokenizer import TextTokenizer
from muxserve.serving.engine import Engine, EngineOptions
from muxserve.serving.repository import resolve_model_dir
from muxserve.training.data import read_tsv_sentences

AMX = {"fpu", "avx512f", "amx_tile", "amx_bf16"}
AVX512_BF16 = {"fpu", "avx512f", "avx512_bf16"}
PLAIN = {"fpu", "sse4_2", "avx2", "avx512f"}
NO_AVX2 = {"fpu", "sse4_2"}
FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("flags", [AMX, AVX512_BF16])
def test_auto_is_bf16_on_cpus_with_bf16_units(flags: set[str]) -> None:
    assert cpu_has_fast_bf16(flags)
    assert resolve_precision("auto", "cpu", flags) == "bf16"
    assert resolve_precision(None, "cpu", flags) == "bf16"


@pytest.mark.skipif(not FBGEMM, reason="torch built without FBGEMM (not an x86 wheel)")
def test_auto_is_int8_on_avx2_cpus_without_bf16_units() -> None:
    assert not cpu_has_fast_bf16(PLAIN) and cpu_has_fast_int8(PLAIN)
    assert resolve_precision("auto", "cpu", PLAIN) == "int8"
    assert resolve_precision("int8", "cpu", AMX) == "int8"  # asked for: served, though bf16 is faster there
    # int8 is the eager engine's: a compiled or TorchScript engine serves fp32 there
    assert resolve_precision("auto", "cpu", PLAIN, engine="compiled") == "fp32"
    assert resolve_precision("auto", "cpu", PLAIN, engine="torchscript") == "fp32"
    with pytest.raises(ValueError, match="int8 is served by the eager engine"):
        resolve_precision("int8", "cpu", PLAIN, engine="compiled")


def test_auto_is_fp32_on_other_cpus_and_fp16_on_cuda() -> None:
    assert not cpu_has_fast_int8(NO_AVX2)
    assert resolve_precision("auto", "cpu", NO_AVX2) == "fp32"
    assert resolve_precision("", "cpu", set()) == "fp32"
    assert resolve_precision("auto", "cuda", PLAIN) == "fp16"
    assert resolve_precision("auto", "cuda:1", AMX) == "fp16"


def test_explicit_precisions_are_checked_against_the_device() -> None:
    assert resolve_precision("fp32", "cpu", AMX) == "fp32"
    assert resolve_precision("BF16", "cpu", PLAIN) == "bf16"  # slower without bf16 units, still correct
    assert resolve_precision("bf16", "cuda", PLAIN) == "bf16"
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        resolve_precision("fp16", "cpu", AMX)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int4", "cpu", AMX)
    with pytest.raises(ValueError, match="int8 is for x86 CPUs"):
        resolve_precision("int8", "cuda", PLAIN)


BUNDLED = ROOT / "model_repository"


def served_logits(model: str, precisions: tuple[str, ...], count: int, batch: int) -> tuple[list[Engine], list[np.ndarray]]:
    """The first ``count`` SST-2 dev sentences through a bundled model's engine at each precision
    (one thread, ``batch`` texts a pass): the engines (closed) and their logits."""
    directory = resolve_model_dir(BUNDLED, model)
    texts = read_tsv_sentences(SST2_DEV)[:count]
    engines = [Engine.load(directory, EngineOptions(precision=p, threads=1)) for p in precisions]
    try:
        assert [e.options.precision for e in engines] == list(precisions)
        rows = TextTokenizer(directory / "tokenizer.json", engines[0].config.max_seq_length).encode(texts).ids
        return engines, [np.concatenate([e.infer(rows[i : i + batch]) for i in range(0, len(rows), batch)]) for e in engines]
    finally:
        for e in engines:
            e.close()


@pytest.mark.skipif(not (BUNDLED / "sst2-mux2").exists() or not SST2_DEV.exists(), reason="needs the bundled sst2-mux2 and SST-2 dev")
def test_bf16_engine_answers_as_fp32_on_a_bundled_model() -> None:
    _, (ref, got) = served_logits("sst2-mux2", ("fp32", "bf16"), 256, 64)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.25  # bf16 keeps 8 bits of mantissa; logits span about +-5
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98


@pytest.mark.skipif(not FBGEMM, reason="torch built without FBGEMM (not an x86 wheel)")
@pytest.mark.skipif(not (BUNDLED / "sst2-mux5").exists() or not SST2_DEV.exists(), reason="needs the bundled sst2-mux5 and SST-2 dev")
def test_int8_engine_answers_as_fp32_on_a_bundled_model() -> None:
    """The int8 engine (dynamic int8 projections from the model's ``int8_first_layer`` on: every
    layer of sst2-mux5) runs FBGEMM's matmul and keeps the fp32 engine's labels but for a few
    texts near the boundary."""
    # all of SST-2 dev: on a few hundred texts, one or two flips more or less (the rounding of
    # the activations' range) decide the rate
    (fp32, int8), (ref, got) = served_logits("sst2-mux5", ("fp32", "int8"), 872, 80)
    model = int8.forward_fn.__self__  # type: ignore[attr-defined]
    assert model.config.int8_first_layer == 0 and all(p.int8 is not None for layer in model.serving_layers for p in (layer.qkv, layer.query, layer.key_value, layer.attention_out, layer.ffn_in, layer.ffn_out) if p is not None)
    assert fp32.forward_fn.__self__.serving_layers[0].qkv.int8 is None  # type: ignore[attr-defined]
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert not np.array_equal(got, ref)  # the quantized matmul ran
    # the largest change of a logit: about 0.5 with FBGEMM's AVX512-VNNI kernels, less with its AVX2 ones
    assert np.abs(got - ref).max() < 0.75
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98


@pytest.mark.skipif(not FBGEMM, reason="torch built without FBGEMM (not an x86 wheel)")
@pytest.mark.skipif(not (BUNDLED / "sst2-mux2").exists(), reason="needs the bundled sst2-mux2")
def test_int8_is_for_the_eager_engine() -> None:
    directory = resolve_model_dir(BUNDLED, "sst2-mux2")
    with pytest.raises(ValueError, match="int8 is served by the eager engine"):
        Engine.load(directory, EngineOptions(precision="int8", kind="torchscript"))


@pytest.mark.skipif(not FBGEMM, reason="torch built without FBGEMM (not an x86 wheel)")
def test_int8_starts_at_the_configured_layer() -> None:
    from muxserve.model.muxbert import MuxBertConfig, MuxBertModel

    for first in (0, 1, 2):
        model = MuxBertModel(MuxBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=200, int8_first_layer=first)).eval()
        model.freeze_for_serving(int8=True)
        assert [layer.ffn_in.int8 is not None for layer in model.serving_layers] == [i >= first for i in range(2)]
    with pytest.raises(ValueError, match="int8_first_layer"):
        MuxBertConfig(num_hidden_layers=2, int8_first_layer=3)
