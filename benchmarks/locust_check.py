"""Headless locust against every model, checked against the server's own metrics.

Starts ``muxserve serve`` on loopback with the given models, then for each model runs
``locust -f benchmarks/locustfile.py --headless`` for ``--time`` and compares the CSV's request
count (and texts = requests x texts per request) with the server's ``muxserve_requests_total``
and ``muxserve_inference_texts_total`` over the same window. Writes ``{out}/{model}_stats.csv``
(locust's CSVs), ``{out}/locust_check.json`` and ``.md``; exits 1 when a run had failures or
disagreed by more than ``--tolerance``:

    python benchmarks/locust_check.py --models sst2-bert,sst2-mux2,sst2-mux5 --users 32 --time 30s \\
        --out bench-results/locust
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from muxserve.bench.run import ROOT, counts_delta, failures_except_cancelled, machine_info, repository_models, server_counts
from muxserve.launch import start_server

LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"


def run_one(server, model: str, a: argparse.Namespace, out: Path) -> dict:
    prefix = out / model
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(a.users), "-r", str(a.spawn_rate or a.users), "-t", a.time, "--stop-timeout", str(a.stop_timeout),
        "--host", f"http://{server.http_url}", "--grpc-url", server.grpc_url, "--csv", str(prefix), "--only-summary",
        "--model", model, "--texts-per-request", str(a.texts_per_request), "--api", a.api,
    ]
    if a.texts:
        cmd += ["--texts", a.texts]
    before = server_counts(server.http_url, model)
    run = subprocess.run(cmd, capture_output=True, text=True)
    after = server_counts(server.http_url, model)
    (out / f"{model}.locust.log").write_text(run.stdout + run.stderr)
    with open(f"{prefix}_stats.csv", newline="") as f:
        total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    delta = counts_delta(before, after)
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    row = {
        "model": model, "locust_exit": run.returncode, "locust_requests": requests, "locust_failures": failures, "locust_requests_per_s": float(total["Requests/s"]),
        "locust_p50_ms": float(total["50%"]), "locust_p99_ms": float(total["99%"]), "server_requests": delta["requests"], "server_failures": delta["failure"], "server_failures_not_cancelled": failures_except_cancelled(delta),
        "server_texts": delta["texts"], "texts_per_request": a.texts_per_request,
        "ratio_requests": requests / delta["requests"] if delta["requests"] else None,
        "ratio_texts": requests * a.texts_per_request / delta["texts"] if delta["texts"] else None,
    }
    row["ok"] = failures == 0 and row["server_failures_not_cancelled"] == 0 and row["ratio_requests"] is not None and abs(row["ratio_requests"] - 1) <= a.tolerance and abs(row["ratio_texts"] - 1) <= a.tolerance
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--models", default="", help="comma-separated (default: every model in the repository)")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--spawn-rate", type=float, default=0, help="users started per second (default: all at once)")
    p.add_argument("--time", default="30s", help="locust run time per model")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--api", default="http-binary", help="http-binary, http-json, classify, grpc (comma-separated)")
    p.add_argument("--texts", default="", help="text source (default: SST-2 dev)")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--stop-timeout", type=float, default=10, help="seconds users get to finish their request when the time is up")
    p.add_argument("--out", default="bench-results/locust")
    a = p.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in a.models.split(",") if m] or repository_models(a.model_repository)
    server = start_server(a.model_repository, models, out / "server.log")
    try:
        rows = []
        for model in models:
            rows.append(run_one(server, model, a, out))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        server.stop()
    report = {"machine": machine_info(), "command": " ".join(["python", *sys.argv]), "settings": vars(a), "results": rows}
    (out / "locust_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Locust {a.time} per model, {a.users} users, {a.texts_per_request} text(s) per request, API {a.api}; machine: {report['machine']['cpu']} ({report['machine']['cores']} cores).",
        "",
        "| model | locust requests | failures | req/s | p50 ms | p99 ms | server requests | server texts | locust / server | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio_requests']:.3f}" if r["ratio_requests"] else "–"
        lines.append(f"| {r['model']} | {r['locust_requests']} | {r['locust_failures']} | {r['locust_requests_per_s']:.1f} | {r['locust_p50_ms']:.0f} | {r['locust_p99_ms']:.0f} | {r['server_requests']:.0f} | {r['server_texts']:.0f} | {ratio} | {'yes' if r['ok'] else 'NO'} |")
    (out / "locust_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
