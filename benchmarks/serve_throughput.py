"""Served throughput of each model against the plain baseline, in one run on one machine.

Starts ``muxserve serve`` on loopback, drives each model with the same closed-loop load
(tritonclient asyncio, fixed concurrency, SST-2 dev sentences), then measures each model's
forward pass alone on the same texts with the same batching and thread count. Prints a JSON
report and a markdown table:

    python benchmarks/serve_throughput.py --models sst2-bert,sst2-mux2,sst2-mux5 \
        --concurrency 64 --duration 20 --out results/serve_throughput.json

The full sweep (concurrency x texts per request, accuracy, plots, physical limit) is
``muxserve bench serve``; both use the pieces in ``muxserve.bench.run``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from muxserve.bench.loadgen import closed_loop
from muxserve.bench.run import ROOT, default_sst2_dev, forward_only, load_texts, machine_info
from muxserve.launch import start_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-bert,sst2-mux2,sst2-mux5")
    p.add_argument("--data", default=str(default_sst2_dev()), help="text source: .tsv with a header or one text per line")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--forward-seconds", type=float, default=10.0)
    p.add_argument("--http-port", type=int, default=0, help="0: a free port")
    p.add_argument("--grpc-port", type=int, default=0, help="0: a free port")
    p.add_argument("--out", help="write the JSON report here")
    a = p.parse_args()

    models = a.models.split(",")
    texts = load_texts(a.data)
    log_path = Path(a.out or "serve_throughput.json").with_suffix(".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(a.model_repository, models, log_path, a.http_port, a.grpc_port, grpc=a.protocol == "grpc")
    served = []
    try:
        for model in models:
            r = asyncio.run(closed_loop(server.url(a.protocol), model, texts, a.concurrency, a.duration, a.texts_per_request, a.protocol, a.warmup))
            served.append(r.summary())
            print(json.dumps(served[-1]), file=sys.stderr)
    finally:
        server.stop()
    forward = [{"model": m, **forward_only(a.model_repository, m, texts, a.forward_seconds)} for m in models]
    base = served[0]["requests_per_s"] or float("nan")
    rows = []
    for s, f in zip(served, forward, strict=True):
        rows.append({**s, **f, "ratio_to_first": round(s["requests_per_s"] / base, 3), "served_over_forward": round(s["texts_per_s"] / f["forward_texts_per_s"], 3)})
    report = {"machine": machine_info(), "settings": vars(a), "results": rows}
    print(json.dumps(report, indent=2))
    print("\n| model | req/s | ratio | p50 ms | p99 ms | errors | forward texts/s | served/forward |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['requests_per_s']:.1f} | {r['ratio_to_first']:.2f}x | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['forward_texts_per_s']:.1f} | {r['served_over_forward']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
