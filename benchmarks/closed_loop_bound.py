"""The most a closed loop of C one-text callers can be served of a model on this machine, against
the model's full-queue forward capacity: how much of "served / forward-only" a serving stack
can reach at all, whatever it does, given the cores, the forward pass's speed at the passes
the load can form, and the CPU the request path needs.

In one run, on one machine:

1. ``F``: the forward pass alone at the batches the scheduler forms from a full queue, the
   server's instances side by side (``forward_only``: the capacity ``muxserve bench serve``
   holds served rates to).
2. ``c``: the request path's CPU per request, the engine's forward pass left out: a server of
   the echo engine (all its processes, from /proc) plus the load generator's own CPU (wrk or
   h2load, from getrusage), same protocol, connections and texts.
3. For every engine layout of ``k`` instances x ``t`` threads with ``k * t`` <= the cores: the
   forward pass alone at passes of ``C / k`` texts (in whole mux groups: the short last group
   costs a full one), the instances side by side (``r``). That is the largest pass a closed
   loop can give each instance (every text in flight inside a pass, none on its way), and a
   pass's rate grows with its size. While the engine runs in a layout, it serves at most ``r``
   and takes ``k * t`` cores, and each request takes ``c`` of CPU besides. Whatever the
   schedule, it spends shares ``x`` of its time in the layouts (or idle), so the served rate is
   at most the best ``sum(x * r)`` with ``sum(x) <= 1`` and ``sum(x * (k * t + c * r)) <= cores``:
   a linear program of two constraints, whose optimum mixes at most two layouts (``bound``).
   The bound is optimistic: the offline passes run with nothing beside them.
4. ``served``: the real server (its default layout) under the same load.

    python benchmarks/closed_loop_bound.py [--models sst2-mux5,sst2-bert] [--connections 64] [--protocol classify] [--out docs/bench/closed_loop_bound]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from muxserve.bench import native
from muxserve.bench.run import forward_only, load_texts, machine_info
from muxserve.bench.serve import measure_point, num_instances_of
from muxserve.launch import start_server
from muxserve.serving.cpus import available_cores
from muxserve.serving.settings import Settings


def served_point(repository: str, model: str, texts: list[str], protocol: str, connections: int, seconds: float, warmup: float, log_dir: Path, extra: list[str]) -> dict:
    """A server of ``model`` (with ``extra`` arguments) under the closed-loop load: req/s, the
    server's CPU per request and the load generator's."""
    server = start_server(repository, [model], log_dir / f"server-{'-'.join(a.strip('-') for a in extra) or 'default'}.log", extra=extra, grpc=protocol == "grpc")
    try:
        p = measure_point(server, model, texts, protocol, connections, 1, seconds, warmup)
    finally:
        server.stop()
    return {"requests_per_s": p["requests_per_s"], "p50_ms": p["p50_ms"], "errors": p["error_count"], "server_cpu_ms_per_request": p["cpu_ms_per_request"], "client_cpu_ms_per_request": p["client_cpu_ms_per_request"]}


def bound(layouts: list[dict], cores: int, path_ms: float) -> dict:
    """The most ``sum(x * r)`` over time shares ``x`` of the layouts with ``sum(x) <= 1`` and
    ``sum(x * (k * t + c * r)) <= cores``: the optimum sits on a vertex, one layout alone (as long
    as time or the cores allow) or two with both constraints tight."""
    demand = [x["instances"] * x["threads"] + path_ms / 1000 * x["forward_texts_per_s"] for x in layouts]
    best: dict = {"per_s": 0.0, "shares": []}

    def consider(shares: list[tuple[int, float]]) -> None:
        rate = sum(share * layouts[i]["forward_texts_per_s"] for i, share in shares)
        if rate > best["per_s"]:
            best.update(per_s=rate, shares=[{"instances": layouts[i]["instances"], "threads": layouts[i]["threads"], "share": share} for i, share in shares])

    for i, a in enumerate(demand):
        consider([(i, min(1.0, cores / a))])
    for (i, a), (j, b) in itertools.combinations(enumerate(demand), 2):
        if a != b:
            xj = (cores - a) / (b - a)
            if 0 <= xj <= 1:
                consider([(i, 1 - xj), (j, xj)])
    return best


def model_bound(repo: str, model: str, texts: list[str], cores: int, path_ms: float, args: argparse.Namespace, log_dir: Path) -> dict:
    """The full-queue capacity, every layout's forward pass at the closed loop's passes, the
    bound and the served rate of one model."""
    n = num_instances_of(repo, model)
    full = forward_only(repo, model, texts, args.forward_seconds)
    capacity = full["forward_texts_per_s"]
    print(f"{model}: full-queue forward {capacity:.0f} texts/s ({full['precision']}, {full['instances']} x {full['threads']}, {full['mean_batch_texts']:.0f} texts a pass)", flush=True)
    layouts = []
    for k in range(1, cores + 1):
        for t in range(1, cores // k + 1):
            # a pass of C / k texts costs whole mux groups: measured at those, counted at C / k
            held = args.connections // k
            whole = -(-held // n) * n
            f = forward_only(repo, model, texts, args.forward_seconds, Settings(instances=k, threads=t), pass_texts=whole)
            rate = f["forward_texts_per_s"] * held / f["batch_texts"]
            layouts.append({"instances": k, "threads": t, "pass_texts": held, "forward_texts_per_s": rate, "forward_of_capacity": rate / capacity})
            print(f"  {k} x {t}: passes of {held} texts: forward {rate:.0f} texts/s ({rate / capacity:.0%} of the full queue's)", flush=True)
    limit = bound(layouts, cores, path_ms)
    served = served_point(repo, model, texts, args.protocol, args.connections, args.duration, args.warmup, log_dir, [])
    print(f"  served (default layout): {served['requests_per_s']:.0f} req/s = {served['requests_per_s'] / capacity:.0%} of the full-queue forward; the bound {limit['per_s']:.0f}/s = {limit['per_s'] / capacity:.0%} ({shares_text(limit)})", flush=True)
    return {"model": model, "full_queue_forward": full, "layouts": layouts, "bound": limit, "bound_of_capacity": limit["per_s"] / capacity, "served": served, "served_of_capacity": served["requests_per_s"] / capacity}


def shares_text(limit: dict) -> str:
    return " + ".join(f"{x['share']:.0%} of the time {x['instances']} × {x['threads']}" for x in limit["shares"])


def markdown(result: dict) -> str:
    """The results as the tables of docs/bench."""
    path, m = result["request_path"], result["machine"]
    units = ", ".join(m["bf16_units"]) or "none"
    lines = [
        "# The most a closed loop can be served, against the full-queue forward pass",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, bf16 units: {units}, CPU precision {m['cpu_precision']}, torch {m['torch']}. muxserve at commit {result['commit']}. Date: {result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['connections']} connections, 1 text a request, `{result['protocol']}`, {result['cores']} cores. Request path: {path['server_cpu_ms_per_request']:.3f} ms of server CPU (echo engine) + {path['client_cpu_ms_per_request']:.3f} ms of the load generator's per request.",
        "",
        "| model | full-queue forward texts/s | layout | pass texts | forward texts/s at that pass | ÷ full queue |",
        "|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for x in m["layouts"]:
            lines.append(f"| {m['model']} | {m['full_queue_forward']['forward_texts_per_s']:.0f} | {x['instances']} × {x['threads']} | {x['pass_texts']} | {x['forward_texts_per_s']:.0f} | {x['forward_of_capacity']:.0%} |")
    lines += ["", "| model | served req/s (default layout) | served ÷ full queue | bound ÷ full queue | the bound's schedule | served ÷ bound |", "|---|---|---|---|---|---|"]
    for m in result["models"]:
        lines.append(f"| {m['model']} | {m['served']['requests_per_s']:.0f} | {m['served_of_capacity']:.0%} | {m['bound_of_capacity']:.0%} | {shares_text(m['bound'])} | {m['served']['requests_per_s'] / m['bound']['per_s']:.0%} |")
    lines += [
        "",
        "The bound: while the engine runs in a layout (instances × threads) it serves at most the forward pass alone at the largest passes the closed loop",
        "can give its instances (every text in flight inside a pass, none on its way; a short last mux group costs a whole one) and takes its threads' cores,",
        "and every request takes the request path's CPU besides; over any schedule of layouts and idle time on these cores, the served rate is at most the",
        "bound (a linear program over the time shares). It is optimistic: the passes were measured with nothing beside them.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-repository", default="model_repository")
    ap.add_argument("--models", default="sst2-mux5", help="comma-separated")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--protocol", default="classify", choices=native.PROTOCOLS)
    ap.add_argument("--duration", type=float, default=12.0, help="measured seconds of each served load")
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--forward-seconds", type=float, default=6.0, help="seconds of each forward-only measurement")
    ap.add_argument("--out", default="", help="results: OUT.json and OUT.md")
    args = ap.parse_args()

    texts = load_texts()
    cores = available_cores()
    models = args.models.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="muxserve-bound-"))
    echo = served_point(args.model_repository, models[0], texts, args.protocol, args.connections, args.duration, args.warmup, log_dir, ["--engine", "echo"])
    path_ms = echo["server_cpu_ms_per_request"] + echo["client_cpu_ms_per_request"]
    print(f"request path: {echo['server_cpu_ms_per_request']:.3f} ms server + {echo['client_cpu_ms_per_request']:.3f} ms load generator CPU per request (echo engine, {echo['requests_per_s']:.0f} req/s)", flush=True)
    result = {
        "command": "python " + shlex.join(["benchmarks/closed_loop_bound.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown",
        "machine": machine_info(), "connections": args.connections, "protocol": args.protocol, "cores": cores, "request_path": echo, "request_path_cpu_ms": path_ms,
        "models": [model_bound(args.model_repository, m, texts, cores, path_ms, args, log_dir) for m in models],
    }
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
