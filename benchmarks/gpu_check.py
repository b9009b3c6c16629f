"""The GPU check (under 5 minutes on one H100): CUDA engine parity with the CPU, fp16, model and
served throughput, for every bundled model. Run it on any machine with a GPU:

    python benchmarks/gpu_check.py --out results/gpu_check.json

1. parity: logits of the CUDA engine (fp32 and fp16) against the CPU engine (fp32) on SST-2 dev
   sentences, max abs difference and label agreement;
2. model throughput: forward pass alone, batches of 32·N texts at length 128 (the paper's setting)
   and of a fixed 320 texts at length 64, fp16 on CUDA, interleaved rounds;
3. served throughput: ``muxserve serve --device cuda --precision fp16``, closed loop of wrk
   (``muxserve.bench.native``: 256 connections, one text per request on ``/v1/classify``; with
   ``--protocols classify,grpc`` also gRPC ``ModelInfer`` over h2load) per model, with the
   server's CPU per request; with ``--engines eager,compiled``, once more with
   ``--engine compiled`` (``torch.compile`` of the forward pass; its compilation adds a minute or
   two to the server's start).

``--device cpu`` runs the same script on the CPU (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from muxserve.bench import native
from muxserve.cli.bench import bench_models
from muxserve.launch import start_server
from muxserve.model.tokenizer import TextTokenizer
from muxserve.serving.engine import Engine, EngineOptions
from muxserve.serving.repository import resolve_model_dir, scan
from muxserve.training.data import read_tsv_sentences

ROOT = Path(__file__).resolve().parents[1]


def parity(repository: str, model: str, texts: list[str], device: str) -> dict:
    directory = resolve_model_dir(repository, model)
    cpu = Engine.load(directory, EngineOptions(device="cpu", precision="fp32"), name=model)
    rows = TextTokenizer(directory / "tokenizer.json", cpu.config.max_seq_length).encode(texts).ids
    n = cpu.config.num_instances
    batches = [rows[i : i + 32 * n] for i in range(0, len(rows), 32 * n)]
    ref = np.concatenate([cpu.infer(b) for b in batches])
    out = {"model": model}
    for precision in ("fp32", "fp16") if device != "cpu" else ("fp32",):
        eng = Engine.load(directory, EngineOptions(device=device, precision=precision), name=model)
        got = np.concatenate([eng.infer(b) for b in batches])
        out[f"{precision}_max_abs_diff"] = float(np.abs(got - ref).max())
        out[f"{precision}_label_agreement"] = float((got.argmax(1) == ref.argmax(1)).mean())
        eng.close()
    cpu.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, default=3.0, help="per model per round, forward throughput")
    p.add_argument("--serve-seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--protocols", default="classify", help=f"served over each of these, comma-separated ({', '.join(native.PROTOCOLS)})")
    p.add_argument("--workers", type=int, default=0, help="frontend processes of the served server (0: its default, one per 2 cores on a GPU)")
    p.add_argument("--client-threads", type=int, default=4, help="wrk threads (a divisor of --concurrency)")
    p.add_argument("--engines", default="eager", help="served with each of these engine kinds (eager, compiled), comma-separated")
    p.add_argument("--out")
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a smoke test")
    t0 = time.time()
    # the models that have weights (a family such as sst2 serves these, and has none of its own)
    repository = {m: entry for m, entry in scan(a.model_repository).items() if not entry.is_family}
    instances = {m: int(entry.parameter("num_instances", "1") or 1) for m, entry in repository.items()}
    models = sorted(repository, key=lambda m: (instances[m], m))
    texts = read_tsv_sentences(a.data) if Path(a.data).exists() else [f"a sentence number {i} about a film" for i in range(512)]
    card = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    report: dict = {"device": card, "torch": torch.__version__, "models": models}

    out = Path(a.out or "gpu_check.json")

    def section(name: str, fn) -> None:
        """One part of the check; a failure is recorded and the rest still runs. The report is
        written after each part, so a run cut short keeps what it measured."""
        t = time.time()
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - the report says what broke; the other parts still measure
            report.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        report.setdefault("section_seconds", {})[name] = round(time.time() - t, 1)
        print(f"{name}: {time.time() - t:.1f} s", json.dumps(report.get(name, report.get("errors", {}).get(name)))[:2000], file=sys.stderr, flush=True)
        if a.out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")

    section("parity", lambda: [parity(a.model_repository, m, texts[:512], a.device) for m in models])

    precision = "fp16" if a.device != "cpu" else "fp32"
    lcm = int(np.lcm.reduce(list(instances.values())))
    section("forward_len64", lambda: bench_models(a.model_repository, models, seq_len=64, batch_texts=32 * lcm, seconds=a.seconds, rounds=2, device=a.device, precision=precision))
    # the paper's setting: 32·N texts at length 128, per model
    section("forward_paper", lambda: [r for m in models for r in bench_models(a.model_repository, [m], seq_len=128, batch_texts=32 * instances[m], seconds=a.seconds, rounds=1, device=a.device, precision=precision)])

    def served(engine: str) -> list[dict]:
        extra = ("--device", a.device, "--precision", "fp16") if a.device != "cpu" else ()
        if a.workers:
            extra = (*extra, "--workers", str(a.workers))
        server = start_server(a.model_repository, models, out.with_suffix(f".server-{engine}.log"), extra=(*extra, "--engine", engine))
        try:
            rows = []
            for protocol in a.protocols.split(","):
                for m in models:
                    run = native.drive(protocol, server.http_url, server.grpc_url, m, texts, 1, a.concurrency, a.client_threads)
                    rows.append({"model": m, "protocol": protocol, "engine": engine, **native.measure(server.proc.pid, run, a.serve_seconds, warmup_s=2).summary()})
            return rows
        finally:
            server.stop()

    for engine in a.engines.split(","):
        section("served" if engine == "eager" else f"served_{engine}", lambda engine=engine: served(engine))
    report["wall_seconds"] = round(time.time() - t0, 1)
    if a.out:
        out.write_text(json.dumps(report, indent=2) + "\n")

    print(json.dumps(report, indent=2))
    print(f"\n{card}, torch {torch.__version__}, {report['wall_seconds']} s")
    print(f"| model | fp32 max diff | fp16 max diff | fp16 label agreement | fwd texts/s len 64 | fwd texts/s 32·N × 128 | served texts/s (c={a.concurrency}) |\n|---|---|---|---|---|---|---|")
    def cell(rows: list[dict] | None, i: int, key: str, fmt: str) -> str:
        try:
            return format(rows[i][key], fmt)  # type: ignore[index]
        except (TypeError, KeyError, IndexError):
            return "—"

    par, f64, fp, sv = (report.get(k) for k in ("parity", "forward_len64", "forward_paper", "served"))
    for i, m in enumerate(models):
        print(f"| {m} | {cell(par, i, 'fp32_max_abs_diff', '.2e')} | {cell(par, i, 'fp16_max_abs_diff', '.2e')} | {cell(par, i, 'fp16_label_agreement', '.3f')} | {cell(f64, i, 'texts_per_s', '.0f')} | {cell(fp, i, 'texts_per_s', '.0f')} | {cell(sv, i, 'texts_per_s', '.0f')} |")
    if report.get("errors"):
        print("errors:", json.dumps(report["errors"], indent=2))
        sys.exit(1)

if __name__ == "__main__":
    main()
