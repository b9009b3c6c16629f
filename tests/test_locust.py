"""benchmarks/locustfile.py: a short headless run against a tiny server, every user class at once;
no failures, and locust's request count agrees with the server's own /metrics."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
from helpers import ROOT, SST2_DEV, make_tiny_repository, start_server

from muxserve.bench.run import counts_delta, failures_except_cancelled, server_counts

# never import locust here: it monkey-patches the whole test process with gevent (sync gRPC
# clients in later tests would hang); it runs in a subprocess only
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (pip install -e '.[bench]')", allow_module_level=True)
pytestmark = pytest.mark.slow

LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
MODEL = "tiny-mux2"
TEXTS_PER_REQUEST = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("locust")
    repo = make_tiny_repository(root / "repo", {MODEL: 2})
    srv = start_server(repo, root / "server.log")
    yield srv
    srv.stop()


def test_headless_locust_agrees_with_server_metrics(server, tmp_path) -> None:
    if not SST2_DEV.exists():  # the locustfile's default source; any text file will do
        texts = tmp_path / "texts.txt"
        texts.write_text("a fine film\nnot good at all\nsomewhat dull\n")
    prefix = tmp_path / "out" / "run"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "5s", "--stop-timeout", "5",
        "--host", f"http://{server.http_url}", "--grpc-url", server.grpc_url, "--csv", str(prefix), "--only-summary",
        "--model", MODEL, "--texts-per-request", str(TEXTS_PER_REQUEST), "--api", "http-binary,http-json,classify,grpc",
    ]
    if not SST2_DEV.exists():
        cmd += ["--texts", str(texts)]
    before = server_counts(server.http_url, MODEL)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    after = server_counts(server.http_url, MODEL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows.pop("Aggregated")
    assert set(rows) == {f"v2 binary {MODEL} [2]", f"v2 json {MODEL} [2]", f"/v1/classify {MODEL} [2]", f"grpc {MODEL} [2]"}
    assert all(int(r["Request Count"]) > 0 for r in rows.values()), rows
    assert int(total["Failure Count"]) == 0, open(f"{prefix}_failures.csv").read()

    delta = counts_delta(before, after)
    requests = int(total["Request Count"])
    assert failures_except_cancelled(delta) == 0, delta
    assert requests == pytest.approx(delta["requests"], rel=0.10)
    assert requests * TEXTS_PER_REQUEST == pytest.approx(delta["texts"], rel=0.10)

    # the locustfile's own check over the same window, written beside the CSV
    check = json.loads(open(f"{prefix}_server.json").read())
    assert check["locust_failures"] == 0 and check["ratio"] == pytest.approx(1.0, rel=0.10)
