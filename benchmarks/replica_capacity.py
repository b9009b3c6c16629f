"""What one replica carries: each model's capacity, and its latency at paced loads below it.

Starts one ``muxserve serve`` (one replica) on loopback with the given models and, with ``wrk``
over KServe v2 binary HTTP (one text per request, SST-2 dev sentences):

1. capacity: a closed loop of ``--connections`` requests in flight per model, texts/s answered;
2. paced load: each rate of ``--rates`` (texts/s offered) for each model in turn, with the
   texts/s answered, p50/p99 latency, texts per forward pass and the mean queue depth (the
   ``muxserve_queue_depth_texts`` gauge sampled every 0.25 s: what the HPA's second metric sees).

A mux model pays on a replica once the offered load passes what the baseline can answer: below
that the baseline answers everything, at higher accuracy. docs/deploy.md reads these figures.

    python benchmarks/replica_capacity.py \
        --models sst2-bert,sst2-mux5 --out results/replica_capacity.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from muxserve.bench.native import drive, measure
from muxserve.bench.run import ROOT, counts_delta, failures_except_cancelled, load_texts, machine_info, server_counts
from muxserve.launch import ServerHandle, start_server


def queue_depth(http_url: str, model: str) -> float:
    text = httpx.get(f"http://{http_url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "muxserve_queue_depth_texts" and s.labels.get("model") == model)


class QueueSampler:
    """Samples a model's queue-depth gauge in a thread while a load runs."""

    def __init__(self, http_url: str, model: str, interval_s: float = 0.25) -> None:
        self.http_url, self.model, self.interval_s = http_url, model, interval_s
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.values.append(queue_depth(self.http_url, self.model))

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def paced_connections(rate: float, most: int) -> int:
    """Connections for a paced point: about one per 2 texts/s, so that each sends well within the
    server's 5 s keep-alive (an idle connection it closes would count as a wrk error) while enough
    requests can be in flight; even, for wrk's 2 threads."""
    return max(4, min(most, 2 * math.ceil(rate / 4)))


def point(server: ServerHandle, model: str, texts: list[str], connections: int, rate: float, duration: float, warmup: float) -> dict:
    run = drive("binary", server.http_url, server.grpc_url, model, texts, 1, connections, threads=2, rate=rate)
    counters = lambda: server_counts(server.http_url, model)  # noqa: E731
    if warmup > 0:
        run(warmup)
    before = counters()
    with QueueSampler(server.http_url, model) as sampler:
        m = measure(server.proc.pid, run, duration)
    delta = counts_delta(before, counters())
    load = m.load
    return {
        "model": model,
        "offered_texts_per_s": rate or None,
        "connections": connections,
        "answered_texts_per_s": round(load.texts_per_s, 1),
        "p50_ms": round(load.p50_ms, 1),
        "p99_ms": round(load.p99_ms, 1),
        "wrk_errors": load.errors,
        "server_failures": int(failures_except_cancelled(delta)),
        "texts_per_forward": round(delta["texts"] / delta["executions"], 1) if delta.get("executions") else None,
        "mean_queue_depth": round(statistics.fmean(sampler.values), 1) if sampler.values else None,
        "server_cpu_s_per_s": round(m.cpu_seconds / load.seconds, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-bert,sst2-mux5")
    p.add_argument("--rates", default="30,60,100,130,160,240,320", help="offered texts/s, comma-separated")
    p.add_argument("--connections", type=int, default=64, help="wrk connections for the capacity (closed loop)")
    p.add_argument("--max-connections", type=int, default=128, help="most wrk connections at a paced point (about one per 2 texts/s offered)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--texts", default="", help="text source (default: SST-2 dev)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `muxserve serve` (repeatable)")
    p.add_argument("--out", default="")
    a = p.parse_args()

    models = [m for m in a.models.split(",") if m]
    texts = load_texts(a.texts or None)
    out = Path(a.out) if a.out else None
    log_dir = out.parent if out else Path(".")
    server = start_server(a.model_repository, models, log_dir / "replica_capacity.server.log", extra=a.server_arg)
    report: dict = {"machine": machine_info(), "command": shlex.join(["python", "benchmarks/replica_capacity.py", *sys.argv[1:]]), "capacity": [], "paced": []}
    try:
        for model in models:
            report["capacity"].append(point(server, model, texts, a.connections, 0.0, a.duration, a.warmup))
            print(json.dumps(report["capacity"][-1]), flush=True)
        for rate in [float(r) for r in a.rates.split(",") if r]:
            for model in models:
                report["paced"].append(point(server, model, texts, paced_connections(rate, a.max_connections), rate, a.duration, a.warmup))
                print(json.dumps(report["paced"][-1]), flush=True)
    finally:
        server.stop()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
