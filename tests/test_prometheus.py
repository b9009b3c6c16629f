"""A real Prometheus, with the project's config and recording rules, scrapes a real muxserve
process under load and reports what an operator would read: texts/s of the baseline and of a
mux model under the same closed-loop load, and the mux/baseline ratio (> 1).

Needs the ``prometheus`` binary (Debian: ``apt-get install -y --no-install-recommends
prometheus``); skipped without it. The models are random but big enough (hidden 256, 4 layers)
that the forward pass dominates the cost of a text, as with real models.
"""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
from helpers import start_server
from observability import COMPUTE_BOUND, closed_loop, dashboard_queries, grafana_to_promql, make_repository, start_prometheus, synthetic_texts

PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install -y --no-install-recommends prometheus)")]

BASELINE, MUX = "bert", "mux5"
LOAD_S = 12.0
CONCURRENCY = 8  # callers per model
TEXTS_PER_REQUEST = 4


def test_prometheus_reads_throughput_and_mux_baseline_ratio(tmp_path):
    repo = make_repository(tmp_path / "repo", {BASELINE: 1, MUX: 5}, configs={MUX: {"baseline": BASELINE}}, **COMPUTE_BOUND)
    server = start_server(repo, tmp_path / "server.log", "--threads", "1", grpc=False)
    prom = None
    try:
        prom = start_prometheus(tmp_path / "prometheus", server.http_url, interval="1s")
        prom.wait_until(lambda: prom.query('up{job="muxserve"} == 1'), "Prometheus never scraped the server")
        prom.wait_until(lambda: set(prom.by_model("model:muxserve_inference_texts:rate1m")) >= {BASELINE, MUX}, "recording rules never evaluated")

        # one bad request, so that the error panels have something to show
        assert httpx.post(f"http://{server.http_url}/v1/classify", json={"model": MUX, "inputs": []}, timeout=30).status_code == 400

        # the same closed loop against both models, at the same time
        texts = synthetic_texts(512)
        done = asyncio.run(closed_loop(server.http_url, [BASELINE, MUX], texts, CONCURRENCY, TEXTS_PER_REQUEST, LOAD_S))
        client_ratio = done[MUX] / done[BASELINE]

        # Prometheus holds the exact totals once it has scraped after the load ...
        served = {m: float(n) for m, n in done.items()}
        prom.wait_until(lambda: prom.by_model("sum by (model) (muxserve_inference_texts_total)") == served, f"Prometheus totals never reached the texts served {done}")
        [scraped] = prom.query("max(timestamp(muxserve_inference_texts_total))")
        # ... and every recording rule has been evaluated on that scrape
        prom.wait_until(lambda: prom.rules_evaluated_since(float(scraped["value"][1])), "rules not evaluated after the last scrape")

        rate = prom.by_model("model:muxserve_inference_texts:rate1m")
        [ratio_series] = prom.query("model:muxserve_baseline_throughput:ratio_rate1m")
        ratio = float(ratio_series["value"][1])
        gauge = max(float(r["value"][1]) for r in prom.query(f'max_over_time(muxserve_baseline_throughput_ratio{{model="{MUX}"}}[30s])'))
        p50 = prom.by_model("model:muxserve_request_duration_seconds:p50_rate1m")
        p99 = prom.by_model("model:muxserve_request_duration_seconds:p99_rate1m")
        print(f"\nclient: {done} texts in {LOAD_S:.0f} s (ratio {client_ratio:.2f}); Prometheus texts/s {rate}, ratio rule {ratio:.2f}, server gauge max {gauge:.2f}, p50 {p50}, p99 {p99}")

        assert ratio_series["metric"]["model"] == MUX and ratio_series["metric"]["baseline"] == BASELINE
        assert rate[BASELINE] > 0 and rate[MUX] > 0
        assert ratio == pytest.approx(rate[MUX] / rate[BASELINE], rel=1e-6)
        assert ratio == pytest.approx(client_ratio, rel=0.1), "the rule's ratio should be that of the texts served"
        assert ratio > 1, f"mux model {MUX} is not faster than its baseline under the same load: {ratio:.2f}"
        assert gauge > 1, "the server's own sliding-window ratio should agree"
        for model in (BASELINE, MUX):
            assert 0 < p50[model] <= p99[model]

        # every query of the dashboard runs in Prometheus; those about traffic return data
        empty = [(where, expr) for where, expr in dashboard_queries() if not prom.query(grafana_to_promql(expr))]
        # no shadow sampling and no model family in this test: only their queries may be empty
        assert all("shadow" in expr or "family" in expr for _, expr in empty), f"dashboard queries without data: {empty}"
        assert prom.by_model('model_reason:muxserve_request_failures:rate1m{reason="bad_request"}').get(MUX, 0) > 0
    finally:
        if prom is not None:
            prom.stop()
        server.stop()
