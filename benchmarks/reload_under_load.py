"""A model reload under load: version 1 swapped for version 2 while wrk keeps sending.

Copies one model of the repository (config and version 1) into a temporary repository, starts
``muxserve serve --model-control-mode explicit --load-model MODEL`` on it, measures the
replica's capacity for that model (closed loop), then runs ``wrk`` paced at ``--fraction`` of
that capacity for ``--duration`` seconds. ``--swap-at`` seconds in, version 2 (a copy of version
1's files, moved in whole) appears and ``POST /v2/repository/models/MODEL/load`` swaps it in.
Reported: wrk's answered requests and errors, the server's successes, failures and cancellations
(requests whose client went away, as wrk's at its stop) per version
(``muxserve_requests_total``), latency over the run, and how long the load request took.

    python benchmarks/reload_under_load.py --model sst2-mux5 \
        --out results/reload_under_load.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from muxserve.bench.native import LoadResult, drive
from muxserve.bench.run import ROOT, counts_delta, failures_except_cancelled, load_texts, machine_info, server_counts
from muxserve.launch import start_server
from muxserve.serving.repository import CONFIG_PBTXT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--model", default="sst2-mux5")
    p.add_argument("--fraction", type=float, default=0.5, help="offered load as a fraction of the measured capacity")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of paced load")
    p.add_argument("--swap-at", type=float, default=10.0, help="seconds into the paced load when version 2 is loaded")
    p.add_argument("--texts", default="", help="text source (default: SST-2 dev)")
    p.add_argument("--out", default="")
    a = p.parse_args()

    texts = load_texts(a.texts or None)
    out = Path(a.out) if a.out else None
    with tempfile.TemporaryDirectory(prefix="muxserve-reload-") as tmp:
        repo = Path(tmp) / "repository"
        source = Path(a.model_repository) / a.model
        (repo / a.model).mkdir(parents=True)
        shutil.copy(source / CONFIG_PBTXT, repo / a.model / CONFIG_PBTXT)
        shutil.copytree(source / "1", repo / a.model / "1")
        log_path = (out.parent if out else Path(tmp)) / "reload_under_load.server.log"
        server = start_server(repo, [a.model], log_path, extra=["--model-control-mode", "explicit", "--load-model", a.model])
        try:
            closed = drive("binary", server.http_url, server.grpc_url, a.model, texts, 1, a.connections, threads=2)
            closed(3.0)
            capacity = closed(10.0).texts_per_s
            rate = a.fraction * capacity
            paced = drive("binary", server.http_url, server.grpc_url, a.model, texts, 1, a.connections, threads=2, rate=rate)
            paced(3.0)
            before = {v: server_counts(server.http_url, a.model, version=v) for v in ("1", "2")}
            result: dict[str, LoadResult] = {}
            runner = threading.Thread(target=lambda: result.setdefault("load", paced(a.duration)))
            runner.start()
            time.sleep(a.swap_at)  # the load runs on its own clock; this only places the swap inside it
            staging = repo / f".{a.model}-2"
            shutil.copytree(repo / a.model / "1", staging)
            staging.rename(repo / a.model / "2")
            t0 = time.monotonic()
            response = httpx.post(f"http://{server.http_url}/v2/repository/models/{a.model}/load", timeout=600)
            load_seconds = time.monotonic() - t0
            runner.join()
            after = {v: server_counts(server.http_url, a.model, version=v) for v in ("1", "2")}
        finally:
            server.stop()
    load = result["load"]
    # a request wrk leaves unanswered when it stops is cancelled by the server (its client went
    # away): counted apart, since no caller was refused or failed
    delta = {v: counts_delta(before[v], after[v]) for v in ("1", "2")}
    per_version = {v: {"success": int(d.get("success", 0)), "failure": int(failures_except_cancelled(d)), "cancelled": int(d.get("failure:cancelled", 0))} for v, d in delta.items()}
    report = {
        "machine": machine_info(),
        "command": shlex.join(["python", "benchmarks/reload_under_load.py", *sys.argv[1:]]),
        "model": a.model,
        "capacity_texts_per_s": round(capacity, 1),
        "offered_texts_per_s": round(rate, 1),
        "answered_texts_per_s": round(load.texts_per_s, 1),
        "wrk_requests": load.requests,
        "wrk_errors": load.errors,
        "server_by_version": per_version,
        "load_request_status": response.status_code,
        "load_request_seconds": round(load_seconds, 2),
        "p50_ms": round(load.p50_ms, 1),
        "p99_ms": round(load.p99_ms, 1),
        "max_ms": round(load.max_ms, 1),
    }
    print(json.dumps(report, indent=2))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
