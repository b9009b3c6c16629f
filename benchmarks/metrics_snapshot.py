"""Render the Grafana dashboard's panels from real data, without Grafana or Docker.

Starts ``muxserve serve`` and a real Prometheus (Debian package ``prometheus``) on loopback with
the project's config and rules (docker/prometheus, scraping every second), drives the same
closed-loop load at a mux model and at its plain baseline in phases of rising concurrency,
then queries Prometheus' HTTP API (``/api/v1/query_range``) with every query of every time-series
panel of docker/grafana/dashboards/muxserve.json and draws them with matplotlib:

    python benchmarks/metrics_snapshot.py --out docs/dashboard.png

Recording rules in a query are expanded to their expressions, and all rate windows are
``--window`` (default 5 s instead of the dashboard's 1 min) so that a one-minute run shows
its phases. Without ``--model-repository`` it builds random models big enough (hidden 256,
4 layers) that the forward pass dominates on a CPU: ``bert`` (N=1) and ``mux5`` (N=5, baseline
``bert``, shadow sampling 20%). Random models predict one label for almost every text, so
their classifiers are rescaled so that each model splits the texts between two labels, and
their agreement (about 50%) says nothing about multiplexing; use trained models for that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from helpers import start_server  # noqa: E402
from observability import COMPUTE_BOUND, DASHBOARD_JSON, closed_loop, grafana_to_promql, make_repository, recording_rules, start_prometheus, synthetic_texts  # noqa: E402

UNITS = {"s": (1000.0, "ms"), "percentunit": (100.0, "%"), "short": (1.0, ""), "none": (1.0, "")}


def expand(expr: str, rules: dict[str, str], window: str) -> str:
    """Inline recording rules (dropping their label filter: all models are shown) and set every
    range and rate interval to ``window``."""
    for _ in range(5):  # rules may use rules
        for name, body in rules.items():
            expr = re.sub(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?", lambda _m, body=body: f"({body.strip()})", expr)
    expr = expr.replace("$__rate_interval", window)
    return re.sub(r"\[\d+[smhd]\]", f"[{window}]", grafana_to_promql(expr))


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def windowed(text: str, window: str) -> str:
    """A legend that names the dashboard's window names the one used here."""
    return re.sub(r"\((\d+m)\)", f"({window})", text)


def bad_request_trickle(url: str, model: str, stop: threading.Event, every_s: float) -> None:
    """One invalid request every ``every_s`` seconds (so that the error panel shows something)."""
    while not stop.wait(every_s):
        httpx.post(f"{url}/v1/classify", json={"model": model, "inputs": []}, timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    ap.add_argument("--model-repository", default="", help="serve this repository (default: build random models)")
    ap.add_argument("--baseline", default="bert")
    ap.add_argument("--mux", default="mux5")
    ap.add_argument("--phases", default="2:20,8:20,16:20", help="concurrency:seconds,... per model, run in turn")
    ap.add_argument("--texts-per-request", type=int, default=4)
    ap.add_argument("--window", default="5s", help="rate window of the queries")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per engine")
    ap.add_argument("--data", default="", help="a TSV of sentences (first column) to send; default: synthetic")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = Path(tempfile.mkdtemp(prefix="muxserve-snapshot-"))
    if args.model_repository:
        repo = Path(args.model_repository)
        described = f"models from {repo}"
    else:
        described = "random models, hidden 256, 4 layers"
    if args.data:
        texts = [line.split("\t")[0] for line in Path(args.data).read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    else:
        texts = synthetic_texts(1024)
    if not args.model_repository:
        repo = make_repository(work / "repo", {args.baseline: 1, args.mux: 5}, configs={args.mux: {"baseline": args.baseline, "shadow_sample_rate": 0.2}}, balance_on=texts, **COMPUTE_BOUND)
    phases = [(int(c), float(s)) for c, s in (p.split(":") for p in args.phases.split(","))]

    server = start_server(repo, work / "server.log", "--threads", str(args.threads), "--models", f"{args.baseline},{args.mux}", grpc=False)
    prom = None
    stop = threading.Event()
    try:
        prom = start_prometheus(work / "prometheus", server.http_url, interval="1s")
        if not prom.wait_for('up{job="muxserve"} == 1'):
            raise RuntimeError(f"Prometheus never scraped the server:\n{prom.log()}")
        time.sleep(3)
        trickle = threading.Thread(target=bad_request_trickle, args=(f"http://{server.http_url}", args.mux, stop, 2.0), daemon=True)
        start = time.time()
        trickle.start()
        marks, served = [], []
        for concurrency, seconds in phases:
            t0 = time.time()
            done = asyncio.run(closed_loop(server.http_url, [args.baseline, args.mux], texts, concurrency, args.texts_per_request, seconds))
            elapsed = time.time() - t0
            marks.append((t0 - start, concurrency))
            served.append({"concurrency": concurrency, "seconds": round(elapsed, 1), **{m: round(n / elapsed, 1) for m, n in done.items()}, "ratio": round(done[args.mux] / max(1, done[args.baseline]), 2)})
            print(json.dumps(served[-1]), flush=True)
        stop.set()
        end = time.time()
        time.sleep(3)  # last scrape and rule evaluation

        rules = recording_rules()
        board = json.loads(DASHBOARD_JSON.read_text())
        panels = [p for p in board["panels"] if p["type"] == "timeseries"]
        cols = 3
        rows = -(-len(panels) // cols)
        plt.style.use("dark_background")
        fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), facecolor="#111217")
        for ax, panel in zip(axes.flat, panels, strict=False):
            ax.set_facecolor("#181b1f")
            unit = panel["fieldConfig"]["defaults"].get("unit", "short")
            scale, suffix = UNITS.get(unit, (1.0, unit))
            lines = 0
            for target in panel["targets"]:
                for series in prom.query_range(expand(target["expr"], rules, args.window), start - 2, end + 2, 1):
                    xs = [float(t) - start for t, _ in series["values"]]
                    ys = [float(v) * scale for _, v in series["values"]]
                    ax.plot(xs, ys, linewidth=1.6, label=windowed(legend(target.get("legendFormat", ""), series["metric"]), args.window))
                    lines += 1
            for t, concurrency in marks:
                ax.axvline(t, color="#555", linewidth=0.8, linestyle="--")
                ax.text(t + 0.5, 0.02, f"c={concurrency}", transform=ax.get_xaxis_transform(), va="bottom", fontsize=7, color="#aaa")
            ax.set_title(panel["title"], fontsize=10, loc="left")
            ax.set_ylabel(suffix, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(color="#2c3235", linewidth=0.6)
            if lines:
                ax.legend(fontsize=7, loc="upper left", framealpha=0.4, ncol=2 if lines > 4 else 1)
                ax.set_ylim(bottom=0)
            else:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888")
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel("seconds since the load started", fontsize=8)
        title = f"muxserve: {args.mux} vs {args.baseline}, same closed-loop load ({args.texts_per_request} texts/request; c = callers per model), {described}; Prometheus, {args.window} windows"
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=90, facecolor=fig.get_facecolor())
        print(json.dumps({"png": str(out), "phases": served}))
    finally:
        stop.set()
        if prom is not None:
            prom.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
