"""What the serving stack costs per request, before and after a change, in one run.

Each of several source trees (git revisions of this repository, exported with ``git archive``)
serves the echo engine (no model: the serving stack alone) over each protocol, ``classify``,
``json``, ``binary`` (wrk) and ``grpc`` (h2load), 1 text per request at ``--concurrency``
connections, and optionally a real model over ``/v1/classify``. The trees take turns, their
order reversed every repetition, so that a noisy moment of a shared machine hurts them alike.
For every point: req/s, latency, and the CPU time per request of each server process (the
frontend, the engine, the supervisor; from ``/proc``), so that what a change moved shows on the
side where it moved.

    python benchmarks/serving_stack.py --rev before=REV --rev after=HEAD --model sst2-mux5 --out docs/bench/serving_stack

``--grpc-floor`` measures instead what a gRPC server itself costs under the same h2load load: a
server whose ModelInfer handler returns a fixed reply and does nothing else, on grpc.aio (uvloop),
on grpcio's synchronous server (a thread pool) and on muxserve's own HTTP/2 transport, in turns.
``--http-floor`` does the same for HTTP/1.1 under wrk (``POST /v1/classify``): an ASGI application
that reads the body and returns a fixed reply, on uvicorn (httptools, uvloop; ``pip install
uvicorn``) and on muxserve's own server (``muxserve.serving.http.server``, where it answers with
the one-write ``RESPOND`` shortcut the inference routes use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from muxserve.bench import native
from muxserve.bench.run import default_sst2_dev, load_texts, machine_info, server_counts
from muxserve.launch import start_server
from muxserve.serving.http.routes import RESPOND

ROOT = Path(__file__).resolve().parents[1]
ECHO_MODEL = "sst2-mux5"  # the echo engine serves under this model's config and tokenizer


def process_role(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"muxserve.serving.frontend" in command:
        return "frontend"
    if b"muxserve.serving.engine_service" in command:
        return "engine"
    return "supervisor"


def cpu_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the server's processes, summed by role."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in native.process_tree(server_pid):
        try:
            role = process_role(pid)
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def measure(server, model: str, texts: list[str], protocol: str, concurrency: int, duration: float, warmup: float) -> dict:
    run = native.drive(protocol, server.http_url, server.grpc_url, model, texts, 1, concurrency)
    run(warmup)
    counts0, cpu0 = server_counts(server.http_url, model), cpu_by_role(server.proc.pid)
    load = run(duration)
    cpu1, counts1 = cpu_by_role(server.proc.pid), server_counts(server.http_url, model)
    requests = counts1["requests"] - counts0["requests"]
    split = {role: 1000 * (cpu1[role] - cpu0.get(role, 0.0)) / requests for role in cpu1}
    return {"protocol": protocol, "requests_per_s": load.requests_per_s, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "errors": load.errors, "cpu_ms_per_request": sum(split.values()), "cpu_ms_by_process": split}


def fixed_reply() -> bytes:
    """A serialized ModelInferResponse as the echo engine would answer one text."""
    from tritonclient.grpc import service_pb2 as pb

    reply = pb.ModelInferResponse(model_name=ECHO_MODEL, model_version="1")
    reply.outputs.add(name="LABEL", datatype="BYTES", shape=[1, 1])
    reply.raw_output_contents.append(b"\x08\x00\x00\x00positive")
    return reply.SerializeToString()


def serve_fixed_grpc_reply(port: int) -> None:
    """A grpc.aio server (uvloop) answering every ModelInfer with the same serialized reply."""

    import grpc
    import uvloop

    body = fixed_reply()

    async def infer(request: bytes, context: object) -> bytes:
        return body

    async def serve() -> None:
        server = grpc.aio.server()
        handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


def serve_fixed_grpc_reply_sync(port: int, workers: int = 4) -> None:
    """The same on grpcio's synchronous server: handlers on a pool of ``workers`` threads."""
    from concurrent import futures

    import grpc

    body = fixed_reply()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(lambda request, context: body)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_fixed_grpc_reply_native(port: int) -> None:
    """The same on muxserve's own HTTP/2 transport (``muxserve.serving.grpc.http2``, uvloop)."""
    import socket

    import uvloop

    from muxserve.serving.grpc.http2 import GrpcServer, Method

    body = fixed_reply()

    async def infer(request: bytes, context: object) -> bytes:
        return body

    async def serve() -> None:
        listener = socket.create_server(("127.0.0.1", port), backlog=2048)
        server = GrpcServer({"/inference.GRPCInferenceService/ModelInfer": Method(infer, bytes, bytes, False)}, listener)
        await server.start()
        await asyncio.Event().wait()

    uvloop.run(serve())


FIXED_CLASSIFY_REPLY = b'[{"label":"positive","score":0.9,"num_instances":5}]'


async def fixed_http_reply(scope: dict, receive, send) -> None:
    """An ASGI application: read the request's body, answer a fixed /v1/classify reply."""
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(FIXED_CLASSIFY_REPLY))]
    respond = scope.get(RESPOND)
    if respond is not None:
        return await respond(scope, 200, headers, FIXED_CLASSIFY_REPLY)
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FIXED_CLASSIFY_REPLY})


def serve_fixed_http_reply_uvicorn(port: int) -> None:
    import uvicorn

    uvicorn.run(fixed_http_reply, host="127.0.0.1", port=port, http="httptools", loop="uvloop", log_level="warning", access_log=False, lifespan="off")


def serve_fixed_http_reply_native(port: int) -> None:
    import socket

    import uvloop

    from muxserve.serving.http.server import HttpServer

    async def serve() -> None:
        server = HttpServer(fixed_http_reply)
        await server.start([socket.create_server(("127.0.0.1", port), backlog=2048)])
        await asyncio.Event().wait()

    uvloop.run(serve())


def floor(texts: list[str], protocol: str, concurrency: int, duration: float, warmup: float, serve) -> dict:
    """``serve(port)`` in a process of its own, under wrk (``classify``) or h2load (``grpc``)."""
    import multiprocessing
    import socket
    import time

    from muxserve.launch import free_port

    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=serve, args=(port,), daemon=True)
    proc.start()
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        if protocol == "grpc":
            body = native.grpc_message(ECHO_MODEL, texts[:1])
            run = lambda s: native.run_h2load(f"127.0.0.1:{port}", body, concurrency, s)  # noqa: E731
        else:
            load = native.http_load(protocol, ECHO_MODEL, texts)
            run = lambda s: native.run_wrk(f"http://127.0.0.1:{port}", load, concurrency, s)  # noqa: E731
        m = native.measure(proc.pid, run, duration, warmup)
        return {"protocol": protocol, "engine": "none (fixed reply)", "requests_per_s": m.load.requests_per_s, "cpu_ms_per_request": m.cpu_ms_per_request, "errors": m.load.errors}
    finally:
        proc.terminate()
        proc.join()


def export_tree(rev: str, into: Path) -> Path:
    """The repository's ``server/`` at ``rev`` (``.`` for the working tree as it is)."""
    if rev == ".":
        return ROOT / "server"
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "server"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "server"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", action="append", default=[], help="'LABEL=REV [SERVER FLAG...]': a git revision, or . for the working tree, and flags for its servers (e.g. 'grpcio=. --grpc-transport grpcio'); repeatable")
    ap.add_argument("--protocols", default=",".join(native.PROTOCOLS))
    ap.add_argument("--model", default="", help="also serve this model over /v1/classify (e.g. sst2-mux5)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--repository", default="model_repository")
    ap.add_argument("--out", default="", help="write NAME.json and NAME.md here (a path without suffix)")
    ap.add_argument("--grpc-floor", action="store_true", help="only measure the gRPC servers (grpc.aio, grpcio's sync server, muxserve's transport) with a handler that returns a fixed reply")
    ap.add_argument("--http-floor", action="store_true", help="only measure the HTTP/1.1 servers (uvicorn, muxserve's own) with an application that returns a fixed reply")
    args = ap.parse_args(argv)

    texts = load_texts(default_sst2_dev())
    if args.grpc_floor or args.http_floor:
        if args.grpc_floor:
            protocol, servers = "grpc", [("grpc.aio", serve_fixed_grpc_reply), ("grpc sync, 4 threads", serve_fixed_grpc_reply_sync), ("muxserve native HTTP/2", serve_fixed_grpc_reply_native)]
        else:
            protocol, servers = "classify", [("uvicorn (httptools)", serve_fixed_http_reply_uvicorn), ("muxserve HTTP/1.1", serve_fixed_http_reply_native)]
        for rep in range(args.repeat):
            for name, serve in servers if rep % 2 == 0 else servers[::-1]:
                p = floor(texts, protocol, args.concurrency, args.duration, args.warmup, serve)
                print(f"{name}, fixed reply: {p['requests_per_s']:.1f} req/s, CPU {p['cpu_ms_per_request']:.3f} ms/request", flush=True)
        return 0
    protocols = args.protocols.split(",")
    points: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="muxserve-stack-") as tmp:
        trees = []
        for label, _, spec in (r.partition("=") for r in args.rev):
            rev, *flags = spec.split()
            trees.append((label, export_tree(rev, Path(tmp) / label), flags))
        for rep in range(args.repeat):
            for label, tree, flags in trees if rep % 2 == 0 else trees[::-1]:
                os.environ["PYTHONPATH"] = str(tree)  # the server's processes import this tree
                runs = [("echo", ECHO_MODEL, ["--engine", "echo", *flags], protocols)]
                if args.model:
                    runs.append(("model", args.model, flags, ["classify"]))
                for engine, model, extra, served in runs:
                    server = start_server(args.repository, [model], Path(tmp) / f"{label}-{engine}.log", extra=extra)
                    try:
                        for protocol in served:
                            p = {"tree": label, "repeat": rep, "engine": engine, "model": model, **measure(server, model, texts, protocol, args.concurrency, args.duration * (2 if engine == "model" else 1), args.warmup)}
                            points.append(p)
                            split = " ".join(f"{k} {v:.3f}" for k, v in sorted(p["cpu_ms_by_process"].items()))
                            print(f"{label} {engine} {model} {protocol}: {p['requests_per_s']:.1f} req/s, p50 {p['p50_ms']:.1f} ms, CPU {p['cpu_ms_per_request']:.3f} ms/request ({split})", file=sys.stderr, flush=True)
                    finally:
                        server.stop()
    report = {"machine": machine_info(), "command": "python benchmarks/serving_stack.py " + shlex.join(argv if argv is not None else sys.argv[1:]), "revs": args.rev, "points": points, "summary": summarize(points, [label for label, _, _ in trees])}
    print(markdown(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
        Path(args.out + ".md").write_text(markdown(report))
    return 0


def summarize(points: list[dict], labels: list[str]) -> list[dict]:
    """Per (engine, protocol) and tree: the mean over repetitions."""
    rows = []
    keys = list(dict.fromkeys((p["engine"], p["model"], p["protocol"]) for p in points))
    for engine, model, protocol in keys:
        for label in labels:
            mine = [p for p in points if (p["engine"], p["model"], p["protocol"], p["tree"]) == (engine, model, protocol, label)]
            if not mine:
                continue
            roles = sorted({r for p in mine for r in p["cpu_ms_by_process"]})
            rows.append({
                "engine": engine, "model": model, "protocol": protocol, "tree": label,
                "requests_per_s": sum(p["requests_per_s"] for p in mine) / len(mine),
                "cpu_ms_per_request": sum(p["cpu_ms_per_request"] for p in mine) / len(mine),
                "cpu_ms_by_process": {r: sum(p["cpu_ms_by_process"].get(r, 0.0) for p in mine) / len(mine) for r in roles},
            })
    return rows


def markdown(report: dict) -> str:
    rows = report["summary"]
    first = {(r["engine"], r["protocol"]): r for r in rows if r["tree"] == rows[0]["tree"]} if rows else {}
    lines = [
        f"Command: `{report['command']}`", "",
        "| engine | protocol | tree | req/s | server CPU ms/req | frontend | engine | req/s × first | CPU × first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = first[(r["engine"], r["protocol"])]
        by = r["cpu_ms_by_process"]
        lines.append(
            f"| {r['engine'] if r['engine'] == 'echo' else r['model']} | {r['protocol']} | {r['tree']} | {r['requests_per_s']:.1f} | {r['cpu_ms_per_request']:.3f} | {by.get('frontend', 0):.3f} | {by.get('engine', 0):.3f} "
            f"| {r['requests_per_s'] / base['requests_per_s']:.2f} | {r['cpu_ms_per_request'] / base['cpu_ms_per_request']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
