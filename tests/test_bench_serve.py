"""``muxserve bench serve`` / ``bench profile`` on tiny models, and the pieces they are built from."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from helpers import SST2_DEV, make_tiny_repository

from muxserve.bench.run import breakdown, counts_delta, failures_except_cancelled, parse_counts, stats_delta
from muxserve.bench.serve import PLOTS, SweepOptions, _offline, summarize_pyspy
from muxserve.cli import main

needs_sst2 = pytest.mark.skipif(not SST2_DEV.exists(), reason="needs ../shared/data/sst2/dev.tsv")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_tiny_repository(tmp_path_factory.mktemp("bench") / "repo", {"tiny-bert": 1, "tiny-mux2": 2})


needs_native = pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("h2load") is None, reason="needs wrk and h2load (apt-get install wrk nghttp2-client)")


@needs_sst2
@needs_native
@pytest.mark.slow
def test_bench_serve_sweep(repo, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    argv = [
        "bench", "serve", "--model-repository", str(repo), "--models", "tiny-bert,tiny-mux2", "--concurrency", "1,4", "--texts-per-request", "2", "--protocol", "binary,grpc",
        "--echo-protocols", "classify,grpc", "--duration", "2", "--warmup", "1", "--out", str(out), "--accuracy-limit", "40", "--forward-seconds", "0.2", "--matmul-seconds", "0.2",
    ]
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    points = report["points"]
    assert [(p["protocol"], p["model"], p["concurrency"]) for p in points] == [(proto, m, c) for proto in ("binary", "grpc") for c in (1, 4) for m in ("tiny-bert", "tiny-mux2")]
    for p in points:
        assert p["error_count"] == 0 and p["requests"] > 0 and p["texts_per_request"] == 2 and p["texts_per_s"] == pytest.approx(2 * p["requests_per_s"], rel=1e-3)
        assert p["tool"] == ("h2load" if p["protocol"] == "grpc" else "wrk")
        # the server's counters over the same run: every request the client finished, and the ones in flight at its stop at most
        assert p["requests"] <= p["server"]["success"] <= p["requests"] + p["concurrency"]
        assert p["server"]["texts"] == 2 * p["server"]["success"] and p["cpu_ms_per_request"] > 0
        prof = p["profile"]
        # engine busy: forward-pass seconds per second, up to one per engine instance (a mux
        # model's free instances share the queue, so its passes run side by side)
        instances = report["models"][p["model"]]["forward"]["instances"]
        assert prof["parts_ms"]["forward"] > 0 and prof["parts_ms"]["tokenize"] > 0 and 0 < prof["engine_busy"] <= 1.05 * instances
        # measured on different clocks, the parts nest: what the data plane times inside a request
        # fits in its request time, and that in the client's latency (HTTP and the client on top).
        # Queue and forward are means per text, the request time a mean per request, each over the
        # requests and passes that ended in a window of a few dozen: they nest within a margin.
        inner = prof["parts_ms"]["tokenize"] + prof["parts_ms"]["queue"] + prof["parts_ms"]["forward"]
        assert inner <= prof["server_ms"] * 1.25 and prof["server_ms"] < prof["client_ms"], prof
        # the forward pass alone at the passes this load formed, beside the full-queue capacity
        assert p["forward_at_served_pass"]["pass_texts"] == round(prof["texts_per_forward"]) and p["forward_at_served_pass"]["forward_texts_per_s"] > 0
    assert [(p["protocol"], p["engine"], p["texts_per_request"]) for p in report["echo"]] == [("classify", "echo", 1), ("grpc", "echo", 1)]
    assert all(p["error_count"] == 0 and p["requests"] > 0 and p["cpu_ms_per_request"] > 0 for p in report["echo"])
    for model, n in (("tiny-bert", 1), ("tiny-mux2", 2)):
        info = report["models"][model]
        assert info["num_instances"] == n
        assert info["accuracy"]["n"] == 40 and 0 <= info["accuracy"]["accuracy"] <= 1
        # the capacity served is held to: the mean of the measurements before and after the served points
        f = info["forward"]
        assert f["before_texts_per_s"] > 0 and f["after_texts_per_s"] > 0 and f["forward_texts_per_s"] == pytest.approx((f["before_texts_per_s"] + f["after_texts_per_s"]) / 2)
        assert info["limit"]["limit_texts_per_s"] > 0 and info["limit"]["flops_per_text_padded"] >= info["limit"]["flops_per_text"]
    rows = {(r["protocol"], r["model"]): r for r in report["summary"]}
    assert len(rows) == 4 and rows[("binary", "tiny-bert")]["ratio_to_baseline"] == 1.0
    # the limit is a matmul's pace on this machine at that moment (under other load a tiny
    # two-thread matmul can measure below what the server reached): the ratio is of the two
    for r in rows.values():
        assert r["served_over_limit"] > 0 and r["served_over_limit"] == pytest.approx(r["peak_texts_per_s"] / report["models"][r["model"]]["limit"]["limit_texts_per_s"])
        assert r["served_over_forward"] > 0 and r["forward_at_served_pass"]["served_over_forward"] > 0
    md = (out / "results.md").read_text()
    assert "| binary | 2 | tiny-mux2 | 2 |" in md and "Physical limit" in md and "Where a request's time goes" in md and "echo engine" in md
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_sst2
def test_accuracy_is_cached_by_weights_and_data(repo, tmp_path) -> None:
    opts = SweepOptions(repository=str(repo), models=["tiny-mux2"], out=str(tmp_path), accuracy_limit=20, forward_seconds=0, matmul_seconds=0)
    first = _offline(opts, ["a text"], {}, lambda _: None)["tiny-mux2"]
    assert "cached" not in first["accuracy"] and "forward" not in first and "limit" not in first
    again = _offline(opts, ["a text"], {"tiny-mux2": first}, lambda _: None)["tiny-mux2"]
    assert again["accuracy"]["cached"] and again["accuracy"]["accuracy"] == first["accuracy"]["accuracy"]
    other = SweepOptions(**{**opts.__dict__, "accuracy_limit": 10})
    assert "cached" not in _offline(other, ["a text"], {"tiny-mux2": first}, lambda _: None)["tiny-mux2"]["accuracy"]


@needs_sst2
@needs_native
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy is not installed (pip install -e '.[bench]')")
def test_bench_profile_with_py_spy(repo, tmp_path) -> None:
    argv = ["bench", "profile", "--model-repository", str(repo), "--models", "tiny-mux2", "--concurrency", "4", "--duration", "1", "--warmup", "1", "--out", str(tmp_path), "--matmul-seconds", "0.2", "--py-spy"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "profile.json").read_text())["results"][0]
    assert result["point"]["error_count"] == 0 and result["served_over_limit"] > 0
    spy = result["py_spy"]
    if "error" in spy:  # no ptrace permission here: the profile still ran
        pytest.skip(f"no ptrace permission on this machine, py-spy could not attach: {spy['error'][:200]}")
    assert spy["samples"] > 0 and sum(spy["by_stage"].values()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- pieces


def _stats(texts: int, execs: int, success: tuple, queue: tuple, tok: tuple, infer: tuple, batch: dict) -> dict:
    d = lambda c, ns: {"count": c, "ns": ns}  # noqa: E731
    return {
        "inference_count": texts, "execution_count": execs,
        "inference_stats": {"success": d(*success), "fail": d(0, 0), "queue": d(*queue), "compute_input": d(*tok), "compute_infer": d(*infer), "compute_output": d(0, 0)},
        "batch_stats": [{"batch_size": s, "compute_input": d(0, 0), "compute_infer": d(*v), "compute_output": d(0, 0)} for s, v in batch.items()],
    }


def test_breakdown_from_stats_delta() -> None:
    before = _stats(10, 2, (10, 10_000_000), (10, 5_000_000), (10, 1_000_000), (2, 4_000_000), {5: (2, 4_000_000)})
    # window: 20 requests (1 text each) in 3 passes: 2 of 8 texts at 4 ms, 1 of 4 texts at 2 ms
    after = _stats(30, 5, (30, 10_000_000 + 20 * 9_000_000), (30, 5_000_000 + 20 * 3_000_000), (30, 1_000_000 + 20 * 500_000), (5, 4_000_000 + 10_000_000), {5: (2, 4_000_000), 8: (2, 8_000_000), 4: (1, 2_000_000)})
    delta = stats_delta(before, after)
    assert delta["batch"] == {8: {"count": 2, "ns": 8_000_000}, 4: {"count": 1, "ns": 2_000_000}}
    b = breakdown(delta, [12.0] * 20, seconds=0.1)
    forward = (8 * 8 + 4 * 2) / (8 * 2 + 4 * 1)  # ms, weighted by texts per pass
    assert b["parts_ms"]["tokenize"] == pytest.approx(0.5)
    assert b["parts_ms"]["queue"] == pytest.approx(3.0)
    assert b["parts_ms"]["forward"] == pytest.approx(forward)
    assert b["parts_ms"]["server_other"] == pytest.approx(9.0 - 0.5 - 3.0 - forward)
    assert b["parts_ms"]["protocol_client"] == pytest.approx(3.0)
    assert b["engine_busy"] == pytest.approx(0.1) and b["texts_per_forward"] == pytest.approx(20 / 3)
    assert math.isnan(breakdown(stats_delta(before, before), [], 1.0)["client_ms"])


def test_parse_counts_from_metrics_text() -> None:
    text = """# TYPE muxserve_requests_total counter
muxserve_requests_total{model="m",version="1",outcome="success",reason=""} 7.0
muxserve_requests_total{model="m",version="1",outcome="failure",reason="queue_full"} 2.0
muxserve_requests_total{model="other",version="1",outcome="success",reason=""} 100.0
# TYPE muxserve_inference_texts_total counter
muxserve_inference_texts_total{model="m",version="1"} 21.0
muxserve_inference_texts_total{model="m",version="2"} 1.0
"""
    c = parse_counts(text, "m")
    assert (c["success"], c["failure"], c["requests"], c["texts"]) == (7, 2, 9, 22)
    assert c["failure:queue_full"] == 2 and failures_except_cancelled(c) == 2
    assert counts_delta(c, {**c, "requests": 12.0})["requests"] == 3


def test_summarize_pyspy() -> None:
    raw = "\n".join([
        "_bootstrap (threading.py:1);infer (muxserve/serving/engine.py:130);forward (muxserve/model/muxbert.py:300) 60",
        "run (asyncio/base_events.py:1);_run (muxserve/serving/dataplane.py:160);encode (muxserve/model/tokenizer.py:30) 10",
        "run (asyncio/base_events.py:1);infer (muxserve/serving/http/app.py:280);parse_infer_request (muxserve/serving/http/app.py:90) 20",
        "run (asyncio/base_events.py:1);select (selectors.py:1) 10",
    ])
    s = summarize_pyspy(raw)
    assert s["samples"] == 100
    assert s["by_stage"] == {"forward (engine)": 0.6, "HTTP codec (body parse/encode)": 0.2, "tokenize": 0.1, "asyncio loop": 0.1}
    assert s["top_leaves"][0] == {"frame": "forward (muxserve/model/muxbert.py:300)", "share": 0.6}
