"""``muxserve bench model``: throughput of several models in one interleaved run."""

from __future__ import annotations

import json

import pytest
import torch
from muxtiny import make_repository, tiny_model

from muxserve.cli import main
from muxserve.cli.bench import bench_models
from muxserve.training.evaluate import forward_throughput

torch.set_num_threads(1)


@pytest.fixture()
def repo(tmp_path):
    return make_repository(tmp_path / "repo", {"tiny-bert": tiny_model(num_instances=1), "tiny-mux2": tiny_model(num_instances=2)})


def test_bench_models_fields(repo) -> None:
    results = bench_models(str(repo), ["tiny-mux2", "tiny-bert"], seq_len=8, batch_texts=4, seconds=0.01, rounds=2, threads=1)
    assert [r["model"] for r in results] == ["tiny-mux2", "tiny-bert"]
    assert [r["num_instances"] for r in results] == [2, 1]
    for r in results:
        assert r["texts_per_s"] > 0 and len(r["rounds"]) == 2
        assert r["texts_per_s"] == r["texts_per_s_best"] == max(r["rounds"]) or abs(r["texts_per_s"] - max(r["rounds"])) < 0.01
        assert r["seq_len"] == 8 and r["batch_texts"] == 4 and r["threads"] == 1
    mux, bert = results
    assert mux["ratio_to_first"] == 1.0
    assert bert["ratio_to_baseline"] == 1.0
    assert mux["ratio_to_baseline"] == pytest.approx(mux["texts_per_s"] / bert["texts_per_s"])
    assert bert["ratio_to_first"] == pytest.approx(bert["texts_per_s"] / mux["texts_per_s"])


def test_bench_rejects_batch_not_multiple_of_n(repo) -> None:
    with pytest.raises(ValueError, match="multiple of 2"):
        bench_models(str(repo), ["tiny-bert", "tiny-mux2"], seq_len=8, batch_texts=5, seconds=0.01, rounds=1)


def test_bench_model_cli_json(repo, capsys) -> None:
    argv = ["bench", "model", "--model-repository", str(repo), "--models", "tiny-bert,tiny-mux2", "--seq-len", "8", "--batch-texts", "4", "--seconds", "0.01", "--rounds", "1", "--threads", "1", "--json"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["num_instances"]) for r in results] == [("tiny-bert", 1), ("tiny-mux2", 2)]
    assert all({"texts_per_s", "ratio_to_first", "ratio_to_baseline"} <= set(r) for r in results)
    assert results[0]["ratio_to_first"] == 1.0


def test_bench_model_cli_at_several_precisions(repo, capsys) -> None:
    argv = ["bench", "model", "--model-repository", str(repo), "--models", "tiny-bert,tiny-mux2", "--seq-len", "8", "--batch-texts", "4", "--seconds", "0.01", "--rounds", "1", "--threads", "1", "--precision", "fp32,bf16", "--json"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["precision"], r["dtype"]) for r in results] == [("tiny-bert", "fp32", "float32"), ("tiny-mux2", "fp32", "float32"), ("tiny-bert", "bf16", "bfloat16"), ("tiny-mux2", "bf16", "bfloat16")]
    for r in results:  # ratios within each precision; to fp32 per model
        assert r["ratio_to_fp32"] == pytest.approx(r["texts_per_s"] / results[[x["model"] for x in results].index(r["model"])]["texts_per_s"])
    assert results[2]["ratio_to_first"] == results[2]["ratio_to_baseline"] == 1.0
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        bench_models(str(repo), ["tiny-bert"], seq_len=8, batch_texts=4, seconds=0.01, rounds=1, precision="fp16")


def test_forward_throughput_counts_texts() -> None:
    model = tiny_model(num_instances=2)  # vocabulary of 200: the random ids are clamped to it
    result = forward_throughput(model, batch_texts=6, seq_len=8, min_seconds=0.0, warmup=0, min_runs=4)
    assert result.texts == 24 and result.texts_per_s > 0
