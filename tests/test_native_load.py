"""The native load generators (wrk, h2load) against the real server with the echo engine: what
they count adds up with the server's own /metrics, over every protocol; what they send is what
the server parses."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from helpers import make_tiny_repository
from serving import TextSource, serving

from muxserve.bench import native
from muxserve.bench.run import counts_delta, failures_except_cancelled, server_counts

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
needs_h2load = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed (apt-get install nghttp2-client)")
ECHO = "tiny-echo"
CONNECTIONS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("native")
    repository = make_tiny_repository(root / "repo", {ECHO: 2}, engine="echo", max_batch_size=16)
    with serving(repository, root / "server.log") as proc:
        yield proc


def settled_counts(server, before: dict, at_least: float, deadline_s: float = 30.0) -> dict:
    """The server's counts over a run once it has answered ``at_least`` requests of it (requests
    in flight when the load generator stopped finish after it)."""
    end = time.monotonic() + deadline_s
    while True:
        delta = counts_delta(before, server_counts(server.http_url, ECHO))
        if delta["requests"] >= at_least or time.monotonic() > end:
            return delta
        time.sleep(0.05)


@needs_wrk
@pytest.mark.parametrize(("kind", "texts_per_request"), [("classify", 1), ("json", 3), ("binary", 1), ("binary", 3)])
def test_wrk_counts_add_up_with_server_metrics(server, kind: str, texts_per_request: int) -> None:
    texts = TextSource(seed=texts_per_request)(50)
    before = server_counts(server.http_url, ECHO)
    run = native.drive(kind, server.http_url, server.grpc_url, ECHO, texts, texts_per_request, CONNECTIONS)
    m = native.measure(server.proc.pid, run, duration_s=1)
    load = m.load
    assert load.tool == "wrk" and load.errors == {} and load.requests > 0
    # every request wrk generated was answered by the server or cut off at the stop
    assert load.requests <= load.sent <= load.requests + CONNECTIONS
    delta = settled_counts(server, before, load.sent)
    assert load.requests <= delta["success"] <= load.sent
    assert failures_except_cancelled(delta) == 0
    assert delta["texts"] == delta["success"] * texts_per_request
    # the CPU of the server process over the run, per request the server saw, and wrk's own
    assert m.cpu_seconds > 0 and m.cpu_ms_per_request > 0
    assert m.client_cpu_seconds > 0 and m.summary()["client_cpu_ms_per_request"] > 0


@needs_h2load
@pytest.mark.parametrize("texts_per_request", [1, 4])
def test_h2load_grpc_counts_add_up_with_server_metrics(server, texts_per_request: int) -> None:
    texts = TextSource(seed=10 + texts_per_request)(texts_per_request)
    before = server_counts(server.http_url, ECHO)
    run = native.drive("grpc", server.http_url, server.grpc_url, ECHO, texts, texts_per_request, CONNECTIONS)
    m = native.measure(server.proc.pid, run, duration_s=1, counters=lambda: server_counts(server.http_url, ECHO))
    assert m.load.tool == "h2load" and m.load.errors == {} and m.load.requests > 0
    assert m.client_cpu_seconds > 0  # h2load's own CPU over the run
    assert m.load.p50_ms <= m.load.p99_ms <= m.load.max_ms
    delta = settled_counts(server, before, m.load.requests)
    # h2load cannot see gRPC errors (HTTP 200 with an error status in the trailers): the server's counters can
    assert failures_except_cancelled(delta) == 0
    assert m.load.requests <= delta["success"] <= m.load.requests + CONNECTIONS
    assert delta["texts"] == delta["success"] * texts_per_request
    assert m.server["requests"] >= m.load.requests


@needs_wrk
def test_wrk_counts_failed_requests(server) -> None:
    """A load the server refuses (unknown model) shows as status errors, not as served requests."""
    before = server_counts(server.http_url, "no-such-model")
    load = native.run_wrk(server.http_url, native.http_load("json", "no-such-model", ["a text"]), CONNECTIONS, 1)
    assert load.requests == 0 and load.errors["status"] > 0
    assert counts_delta(before, server_counts(server.http_url, "no-such-model"))["success"] == 0


@needs_wrk
def test_wrk_paced_rate(server) -> None:
    """With a rate, wrk holds back to about that many requests/s (the echo server answers far
    more): a bound on what is sent, which a slow machine can only lower."""
    rate, seconds = 20.0, 2
    paced = native.run_wrk(server.http_url, native.http_load("classify", ECHO, ["a text"]), CONNECTIONS, seconds, rate=rate)
    assert paced.target_rate == rate and paced.errors == {} and paced.requests > 0
    assert paced.sent <= rate * seconds * 1.25 + 1


def test_binary_bodies_share_one_json_header_length() -> None:
    load = native.http_load("binary", "m", ["short", "a much longer sentence than the first"], 1)
    width = int(load.headers["Inference-Header-Content-Length"])
    for body, text in zip(load.bodies, ["short", "a much longer sentence than the first"], strict=True):
        header = json.loads(body[:width])
        assert header["inputs"][0]["parameters"]["binary_data_size"] == len(body) - width == 4 + len(text)
        assert body[width + 4 :] == text.encode()


def test_text_groups_cycle_through_every_text() -> None:
    groups = native.text_groups(["a", "b", "c"], 2)
    assert groups == [["a", "b"], ["c", "a"], ["b", "c"]]


def test_process_tree_cpu_counts_children() -> None:
    """A child's CPU time counts toward its parent's tree, also once the child has exited."""
    import subprocess
    import sys

    burn = "import time\nwhile time.process_time() < 0.3: pass"
    script = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}]); print('done', flush=True); sys.stdin.readline()"
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "done"  # the child has run and been waited for
        assert native.tree_cpu_seconds(proc.pid) >= 0.3
    finally:
        proc.communicate("\n", timeout=30)
