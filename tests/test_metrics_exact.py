"""Exactness of the metrics: K texts served add exactly K, and every request, good or bad, moves
exactly the counters it should, by exactly one; ``/v2/models/{m}/stats`` (and gRPC
``ModelStatistics``) report the same counts as ``/metrics``.

One real server process on loopback, tiny random models:
- ``mux2`` (N=2): the default config (a forward pass holds up to 64 texts, 2 ms queue delay);
- ``slow`` (N=2): at most 2 queued requests and a 3 s queue delay, so that two single-text
  requests sit in the queue and a third is rejected (queue full), deterministically.
"""

from __future__ import annotations

import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import start_server
from observability import Samples, delta, make_repository, scrape, value

MAX_BATCH = 64  # default_config: max_batch_size of an N=2 model
SLOW_DELAY_S = 3.0
HAS_GRPC = importlib.util.find_spec("muxserve.serving.grpc.server") is not None

REQUESTS = "muxserve_requests_total"
TEXTS = "muxserve_inference_texts_total"
EXECUTIONS = "muxserve_executions_total"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("exact")
    repo = make_repository(root / "repo", {"mux2": 2, "slow": 2}, configs={"slow": {"max_queue_size": 2, "max_queue_delay_us": int(SLOW_DELAY_S * 1e6)}})
    srv = start_server(repo, root / "server.log", "--threads", "1", grpc=HAS_GRPC)
    yield srv
    srv.stop()


def kserve_body(texts: list[str], name: str = "TEXT", datatype: str = "BYTES", shape: list[int] | None = None, outputs: list[str] | None = None) -> dict:
    body: dict = {"inputs": [{"name": name, "datatype": datatype, "shape": shape if shape is not None else [len(texts), 1], "data": texts}]}
    if outputs is not None:
        body["outputs"] = [{"name": o} for o in outputs]
    return body


def infer(srv, model: str, body: dict | bytes, version: str = "") -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"http://{srv.http_url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=30)


def texts_of(k: int, start: int = 0) -> list[str]:
    return [f"sentence number {start + i} is {'good' if i % 2 else 'bad'}" for i in range(k)]


def assert_deltas(after: Samples, before: Samples, model: str, **expected: float) -> None:
    """Counter / histogram-count deltas of one model, by short name."""
    names = {
        "success": (REQUESTS, {"outcome": "success"}),
        "failure": (REQUESTS, {"outcome": "failure"}),
        "bad_request": (REQUESTS, {"outcome": "failure", "reason": "bad_request"}),
        "queue_full": (REQUESTS, {"outcome": "failure", "reason": "queue_full"}),
        "texts": (TEXTS, {}),
        "executions": (EXECUTIONS, {}),
        "failed_executions": ("muxserve_failed_executions_total", {}),
        "request_observations": ("muxserve_request_duration_seconds_count", {}),
        "tokenize_observations": ("muxserve_tokenize_duration_seconds_count", {}),
        "queue_observations": ("muxserve_queue_duration_seconds_count", {}),
        "compute_observations": ("muxserve_compute_duration_seconds_count", {}),
        "batch_observations": ("muxserve_batch_texts_count", {}),
        "batch_texts_sum": ("muxserve_batch_texts_sum", {}),
        "fill_observations": ("muxserve_mux_group_fill_ratio_count", {}),
        "fill_sum": ("muxserve_mux_group_fill_ratio_sum", {}),
    }
    got = {key: delta(after, before, names[key][0], model=model, **names[key][1]) for key in expected}
    assert got == pytest.approx(expected, abs=1e-9), f"{model}: counter deltas {got} != expected {expected}"


def test_sequential_requests_add_exactly_their_texts(server):
    sizes = [1, 2, 3, 5, 8, 13, 64]
    before = scrape(server.http_url)
    for i, k in enumerate(sizes):
        r = infer(server, "mux2", kserve_body(texts_of(k, 100 * i)))
        assert r.status_code == 200, r.text
        labels = {o["name"]: o for o in r.json()["outputs"]}["LABEL"]
        assert len(labels["data"]) == k
    # the simple API counts the same way
    r = httpx.post(f"http://{server.http_url}/v1/classify", json={"model": "mux2", "inputs": texts_of(7)}, timeout=30)
    assert r.status_code == 200 and len(r.json()) == 7
    sizes.append(7)
    after = scrape(server.http_url)
    # one request at a time: each is one forward pass of exactly its own texts
    fills = sum(k / (2 * -(-k // 2)) for k in sizes)
    assert_deltas(
        after, before, "mux2",
        success=len(sizes), failure=0, texts=sum(sizes), executions=len(sizes), failed_executions=0,
        request_observations=len(sizes), tokenize_observations=len(sizes), queue_observations=sum(sizes),
        compute_observations=len(sizes), batch_observations=len(sizes), batch_texts_sum=sum(sizes),
        fill_observations=len(sizes), fill_sum=fills,
    )


def test_concurrent_requests_add_exactly_their_texts(server):
    """Requests batched together into shared mux groups still count text by text."""
    sizes = [(i % 5) + 1 for i in range(48)]
    before = scrape(server.http_url)
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda ik: infer(server, "mux2", kserve_body(texts_of(ik[1], 1000 * ik[0]))).status_code, enumerate(sizes)))
    assert codes == [200] * len(sizes)
    after = scrape(server.http_url)
    passes = delta(after, before, EXECUTIONS, model="mux2")
    assert 1 <= passes <= len(sizes)
    assert_deltas(
        after, before, "mux2",
        success=len(sizes), failure=0, texts=sum(sizes), request_observations=len(sizes), tokenize_observations=len(sizes),
        queue_observations=sum(sizes), batch_texts_sum=sum(sizes), batch_observations=passes, compute_observations=passes, fill_observations=passes,
    )


def test_bad_requests_count_once_each_by_reason(server):
    bad = [
        kserve_body(["a"], name="WRONG"),  # unknown input
        kserve_body(["a"], datatype="INT32"),  # TEXT must be BYTES
        kserve_body(texts_of(MAX_BATCH + 1)),  # over max_batch_size
        kserve_body(["a", "b"], shape=[3, 1]),  # shape does not match the data
        kserve_body(["a"], outputs=["NOPE"]),  # unknown output
    ]
    before = scrape(server.http_url)
    for body in bad:
        r = infer(server, "mux2", body)
        assert r.status_code == 400, r.text
        assert "error" in r.json()
    r = httpx.post(f"http://{server.http_url}/v1/classify", json={"model": "mux2", "inputs": []}, timeout=30)
    assert r.status_code == 400
    after = scrape(server.http_url)
    assert_deltas(
        after, before, "mux2",
        success=0, failure=len(bad) + 1, bad_request=len(bad) + 1, queue_full=0, texts=0, executions=0,
        request_observations=0, tokenize_observations=0, queue_observations=0,
    )


def test_requests_not_attributed_to_a_model_version_move_nothing(server):
    """Unknown versions and models (404) never reach a model version, so, as in Triton, no
    model's counters or statistics move (a body that cannot be parsed is counted as a failure
    of the model it was sent to: tests/test_limits.py)."""
    before = scrape(server.http_url)
    assert infer(server, "mux2", kserve_body(["a"]), version="7").status_code == 404
    assert infer(server, "no-such-model", kserve_body(["a"])).status_code == 404
    assert httpx.post(f"http://{server.http_url}/v1/classify", json={"model": "no-such-model", "inputs": ["a"]}, timeout=30).status_code == 404
    after = scrape(server.http_url)
    for name in (REQUESTS, TEXTS, EXECUTIONS, "muxserve_tokenize_duration_seconds_count"):
        assert value(after, name) == value(before, name), name
    assert not any(dict(labels).get("version") == "7" or dict(labels).get("model") == "no-such-model" for _, labels in after)


def test_queue_full_is_counted_once(server):
    url = f"http://{server.http_url}"
    before = scrape(server.http_url)
    with ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        waiting = [pool.submit(infer, server, "slow", kserve_body([f"queued text {i}"])) for i in range(2)]
        # both single-text requests sit in the queue (3 s delay, room for 64 texts)
        deadline = time.monotonic() + SLOW_DELAY_S
        while value(scrape(server.http_url), "muxserve_queue_depth_texts", model="slow") < 2:
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.02)
        rejected = infer(server, "slow", kserve_body(["one too many"]))
        assert time.monotonic() - t0 < SLOW_DELAY_S, "the queue drained before the third request: the test proves nothing"
        assert rejected.status_code == 503, rejected.text
        assert "queue" in rejected.json()["error"]
        assert [f.result().status_code for f in waiting] == [200, 200]
    after = scrape(server.http_url)
    assert value(after, "muxserve_queue_depth_texts", model="slow") == 0
    assert_deltas(
        after, before, "slow",
        success=2, failure=1, queue_full=1, bad_request=0, texts=2, executions=1, failed_executions=0,
        request_observations=2, tokenize_observations=3, queue_observations=2, batch_texts_sum=2,
        fill_observations=1, fill_sum=1.0,
    )
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def expected_statistics(samples: Samples, model: str) -> dict:
    """What /v2/models/{m}/stats must say, derived from /metrics alone."""
    v = lambda name, **labels: int(value(samples, name, model=model, **labels))  # noqa: E731
    return {
        "inference_count": v(TEXTS),
        "execution_count": v(EXECUTIONS),
        "success": v(REQUESTS, outcome="success"),
        "fail": v(REQUESTS, outcome="failure"),
        "queue": v("muxserve_queue_duration_seconds_count"),
        "compute_input": v("muxserve_tokenize_duration_seconds_count"),
        "compute_infer": v("muxserve_compute_duration_seconds_count"),
        "batch_passes": v("muxserve_batch_texts_count"),
        "batch_texts": v("muxserve_batch_texts_sum"),
    }


def reported_statistics(stats: dict) -> dict:
    inf = stats["inference_stats"]
    count = lambda key: int(inf.get(key, {}).get("count", 0))  # noqa: E731
    batches = stats.get("batch_stats", [])
    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "success": count("success"),
        "fail": count("fail"),
        "queue": count("queue"),
        "compute_input": count("compute_input"),
        "compute_infer": count("compute_infer"),
        "batch_passes": sum(int(b["compute_infer"]["count"]) for b in batches),
        "batch_texts": sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in batches),
    }


@pytest.mark.parametrize("model", ["mux2", "slow"])
def test_statistics_report_the_same_counts_as_metrics(server, model):
    # also meaningful alone: send a little traffic of both kinds first
    assert infer(server, model, kserve_body(texts_of(3))).status_code == 200
    assert infer(server, model, kserve_body(["a"], name="WRONG")).status_code == 400
    samples = scrape(server.http_url)
    doc = httpx.get(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10).json()
    [stats] = doc["model_stats"]
    assert (stats["name"], stats["version"]) == (model, "1")
    expected = expected_statistics(samples, model)
    assert expected["inference_count"] >= 3 and expected["fail"] >= 1
    assert reported_statistics(stats) == expected
    # all models at once: the same numbers
    every = {s["name"]: s for s in httpx.get(f"http://{server.http_url}/v2/models/stats", timeout=10).json()["model_stats"]}
    assert reported_statistics(every[model]) == expected
    if HAS_GRPC:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            grpc_doc = client.get_inference_statistics(model, as_json=True)
        finally:
            client.close()
        [grpc_stats] = grpc_doc["model_stats"]
        assert reported_statistics(grpc_stats) == expected


def test_exposition_is_parseable_and_typed(server):
    """Names in Prometheus style: counters end in _total, durations in _seconds histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://{server.http_url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families, text
    for name, family in families.items():
        assert name.startswith("muxserve_"), name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
        if "duration" in name:
            assert family.type == "histogram" and name.endswith("_seconds"), name
        for s in family.samples:
            assert "model" in s.labels, s
    for name in ("muxserve_request_duration_seconds", "muxserve_compute_duration_seconds", "muxserve_queue_duration_seconds"):
        bounds = sorted({float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")})
        assert bounds[0] <= 0.001 and any(0.005 <= b <= 0.02 for b in bounds), f"{name}: buckets {bounds} do not fit millisecond latencies"
