"""Where the server's CPU goes under load: served rate, and CPU per request of each server process
(the engine process and every frontend), one text per request, from a native load generator.

    python benchmarks/process_split.py --model sst2-mux5 --workers 8 -- --device cuda --precision fp16
    python benchmarks/process_split.py --model sst2-mux5 --workers 8 -- --device cuda --precision fp16 --no-cuda-graphs

Arguments after ``--`` go to ``muxserve serve``. The process that is near one core is the
bottleneck: on a GPU that was the engine process (its event loop launches passes and routes
every answer), which is how CUDA graphs were found to pay (docs/benchmarks.md#gpu).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from muxserve.bench import native
from muxserve.launch import start_server
from muxserve.training.data import read_tsv_sentences

ROOT = Path(__file__).resolve().parents[1]


def process_cpu(root: int) -> dict[int, tuple[float, str]]:
    """CPU seconds (its own, not its waited children's) and command line of ``root`` and of
    every descendant alive now."""
    out = {}
    for pid in native.process_tree(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[pid] = (native.process_cpu_seconds(pid, waited_children=False), cmd)
    return out


def role(cmd: str) -> str:
    return "engine" if "engine_service" in cmd else "frontend" if "serving.frontend" in cmd else "supervisor"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--model", default="sst2-mux5")
    p.add_argument("--engine", default="eager")
    p.add_argument("--workers", type=int, default=0, help="frontend processes (0: the server's default)")
    p.add_argument("--protocol", default="classify", choices=native.PROTOCOLS)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--client-threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "process_split.server.log"), help="the server's log")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: more arguments of muxserve serve")
    a = p.parse_args()
    extra = ["--engine", a.engine, *(["--workers", str(a.workers)] if a.workers else []), *[x for x in a.server_args if x != "--"]]
    texts = read_tsv_sentences(a.data)
    server = start_server(a.model_repository, [a.model], Path(a.log), extra=extra)
    try:
        run = native.drive(a.protocol, server.http_url, server.grpc_url, a.model, texts, 1, a.connections, a.client_threads)
        run(2.0)  # warm-up
        before, t0 = process_cpu(server.proc.pid), time.monotonic()
        load = run(a.seconds)
        after, elapsed = process_cpu(server.proc.pid), time.monotonic() - t0
    finally:
        server.stop()
    requests = max(1, load.requests)
    processes = []
    for pid, (cpu, cmd) in sorted(after.items(), key=lambda kv: role(kv[1][1])):
        used = cpu - before.get(pid, (0.0, ""))[0]
        processes.append({"role": role(cmd), "pid": pid, "cores": round(used / elapsed, 3), "cpu_us_per_request": round(1e6 * used / requests, 1)})
    print(json.dumps({"model": a.model, "server_args": extra, "load": load.summary(), "processes": processes}, indent=1))


if __name__ == "__main__":
    main()
