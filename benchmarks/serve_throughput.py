"""Served throughput of each model against the plain baseline, in one run on one machine.

Starts ``muxserve serve`` on loopback, drives each model with the same closed-loop load
(tritonclient asyncio, fixed concurrency, SST-2 dev sentences), then measures each model's
forward pass alone on the same texts with the same batching and thread count. Prints a JSON
report and a markdown table:

    python benchmarks/serve_throughput.py --models sst2-bert,sst2-mux2,sst2-mux5 \
        --concurrency 64 --duration 20 --out results/serve_throughput.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from muxserve.engine import Engine, EngineOptions, default_threads
from muxserve.loadgen import closed_loop
from muxserve.model.tokenizer import TextTokenizer
from muxserve.registry import batch_texts
from muxserve.repository import resolve_model_dir, scan
from muxserve.training.data import read_tsv_sentences

ROOT = Path(__file__).resolve().parents[1]


def start_server(repository: str, models: list[str], http_port: int, grpc_port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "muxserve", "serve", "--model-repository", repository, "--models", ",".join(models), "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--no-shadow"]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become ready")


def forward_only(repository: str, model: str, texts: list[str], seconds: float) -> dict:
    """Texts/s of the engine alone on the served texts, batched as the server batches them."""
    entry = scan(repository)[model]
    directory = resolve_model_dir(repository, model)
    engine = Engine.load(directory, EngineOptions(), name=model)
    tok = TextTokenizer(directory / "tokenizer.json", engine.config.max_seq_length)
    rows = tok.encode(texts).ids
    size = batch_texts(entry, engine.config.num_instances)
    batches = [rows[i : i + size] for i in range(0, len(rows), size)]
    torch.set_num_threads(engine.threads)
    engine.infer(batches[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for b in batches:
            engine.infer(b)
            done += len(b)
    elapsed = time.perf_counter() - start
    engine.close()
    return {"model": model, "batch_texts": size, "threads": engine.threads, "forward_texts_per_s": round(done / elapsed, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-bert,sst2-mux2,sst2-mux5")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--forward-seconds", type=float, default=10.0)
    p.add_argument("--http-port", type=int, default=18000)
    p.add_argument("--grpc-port", type=int, default=18001)
    p.add_argument("--out", help="write the JSON report here")
    a = p.parse_args()

    models = a.models.split(",")
    texts = read_tsv_sentences(a.data)
    log_path = Path(a.out or "serve_throughput.json").with_suffix(".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(a.model_repository, models, a.http_port, a.grpc_port, log_path)
    served = []
    try:
        url = f"127.0.0.1:{a.http_port if a.protocol == 'http' else a.grpc_port}"
        for model in models:
            r = asyncio.run(closed_loop(url, model, texts, a.concurrency, a.duration, a.texts_per_request, a.protocol, a.warmup))
            served.append(r.summary())
            print(json.dumps(served[-1]), file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    forward = [forward_only(a.model_repository, m, texts, a.forward_seconds) for m in models]
    base = served[0]["requests_per_s"] or float("nan")
    rows = []
    for s, f in zip(served, forward, strict=True):
        rows.append({**s, **f, "ratio_to_first": round(s["requests_per_s"] / base, 3), "served_over_forward": round(s["texts_per_s"] / f["forward_texts_per_s"], 3)})
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), "engine_threads": default_threads(), "torch": torch.__version__}, "settings": vars(a), "results": rows}
    print(json.dumps(report, indent=2))
    print("\n| model | req/s | ratio | p50 ms | p99 ms | errors | forward texts/s | served/forward |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['requests_per_s']:.1f} | {r['ratio_to_first']:.2f}x | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['forward_texts_per_s']:.1f} | {r['served_over_forward']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
