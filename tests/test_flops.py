"""muxserve.bench.flops: FLOPs per text against a hand count and against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from torch.utils.flop_counter import FlopCounterMode

from muxserve.bench.flops import flops_per_text, layer_flops, mean_flops_per_text, measure_matmul_rate, padded_lengths
from muxserve.model.muxbert import MuxBertConfig, MuxBertModel

torch.set_num_threads(1)


def hand_config(n: int, **kw: object) -> MuxBertConfig:
    # d=4, 2 heads, I=8, 1 layer, 2 labels
    return MuxBertConfig(vocab_size=50, hidden_size=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, max_position_embeddings=16, max_seq_length=16, num_instances=n, **kw)


def test_layer_by_hand() -> None:
    # L=3, d=4, I=8: Q,K,V,O 4*(2*3*4*4)=384; QK^T and AV 2*(2*3*3*4)=144; FFN 2*(2*3*4*8)=384
    layer = layer_flops(3, 4, 8)
    assert layer.linear == 384 + 384
    assert layer.attention == 144
    assert layer.total == 912


def test_baseline_by_hand() -> None:
    f = flops_per_text(hand_config(1), 3)
    assert (f.embeddings, f.mux, f.demux) == (0, 0, 0)
    assert f.encoder == 912
    assert f.classifier == 2 * 4 * 2
    assert f.total == 928
    assert f.attention == 144


def test_mux_by_hand() -> None:
    f = flops_per_text(hand_config(2), 3)
    assert f.encoder == 912 / 2  # one encoder pass per group of 2 texts
    # demux at [CLS]: dense_1 2*(8*4)=64, dense_2 2*(4*4)=32, pre_decoder 32
    assert f.demux == 128
    assert f.classifier == 16
    assert f.total == 456 + 128 + 16


def test_attention_mux_by_hand() -> None:
    f = flops_per_text(hand_config(2, muxing_variant="gaussian_attention_v2"), 3)
    # one layer per text at L=3 (912) + per group 3 positions x one layer at length N=2 / 2 texts
    across = 8 * 2 * 16 + 4 * 2 * 2 * 4 + 4 * 2 * 4 * 8  # 256 + 64 + 256 = 576
    assert f.mux == 912 + 3 * across / 2
    assert f.attention == 144 / 2 + 144 + 3 * 64 / 2


def test_token_classification_demuxes_every_position() -> None:
    f = flops_per_text(hand_config(2, task="token_classification"), 3)
    assert f.demux == 3 * 128 and f.classifier == 3 * 16


@pytest.mark.parametrize("n,variant", [(1, "gaussian_hadamard"), (2, "gaussian_hadamard"), (5, "gaussian_hadamard"), (2, "gaussian_attention_v2")])
def test_matches_torch_flop_counter(n: int, variant: str) -> None:
    """torch counts every Linear (addmm/mm) but not CPU SDPA: compare all but attention."""
    cfg = tiny_config(n, muxing_variant=variant)
    model = MuxBertModel(cfg).eval()
    texts, length = 4 * n, 16
    ids = torch.randint(5, cfg.vocab_size, (texts, length))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, torch.ones_like(ids))
    f = flops_per_text(cfg, length)
    assert counter.get_total_flops() == pytest.approx((f.total - f.attention) * texts)


def test_padded_lengths_follow_buckets() -> None:
    assert padded_lengths([5, 9, 3, 3], chunk=2, max_length=64) == [16, 16, 8, 8]
    assert padded_lengths([5, 9, 3], chunk=2, max_length=64, bucketed=False) == [9, 9, 3]
    assert padded_lengths([100], chunk=1, max_length=64) == [64]
    m = mean_flops_per_text(hand_config(1), [3, 3], chunk=2, bucketed=False)
    assert m["flops_per_text"] == 928 and m["mean_padded_length"] == 3


def test_matmul_rate_is_positive() -> None:
    r = measure_matmul_rate(32, 16, 64, threads=1, min_seconds=0.0, warmup=1, min_runs=3, rounds=2)
    assert r["flops_per_s"] > 0 and r["runs"] >= 6 and r["threads"] == 1
    assert r["flops_per_s"] == max(r["rounds_flops_per_s"]) and len(r["rounds_flops_per_s"]) == 2


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="torch built without FBGEMM")
def test_matmul_rate_at_int8_runs_fbgemms_matmul(monkeypatch) -> None:
    """At int8 the rate is of the dynamic int8 matmul the engine runs, not of an fp32 mm."""
    calls = []
    real = torch.ops.quantized.linear_dynamic
    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic", lambda *args: calls.append(1) or real(*args))
    r = measure_matmul_rate(32, 16, 64, threads=1, min_seconds=0.0, warmup=1, min_runs=3, rounds=2, dtype="int8")
    assert r["dtype"] == "int8" and r["flops_per_s"] > 0 and len(calls) == 1 + r["runs"]
