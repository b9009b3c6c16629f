"""Where the cores go while a model is served: per-thread CPU of the server's processes, the load
generator's and the idle CPU, over one closed-loop point of ``muxserve bench serve``.

The server serves one model (its server arguments as given, e.g. ``--instances=3``); wrk drives
``--connections`` x 1 SST-2 sentence on ``/v1/classify``; over the middle of the measured run
each thread's user + system time is read from ``/proc`` twice. Variants given with ``--variant``
run one after the other, alternating over ``--rounds``, so that they share the machine's moods:

    python benchmarks/cpu_breakdown.py --model sst2-mux5 --variant default= --variant "three=--instances=3" --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import threading
import time
from pathlib import Path

from muxserve.bench.native import process_tree
from muxserve.bench.run import load_texts
from muxserve.bench.serve import measure_point
from muxserve.launch import start_server

TICK = os.sysconf("SC_CLK_TCK")
LOAD_GENERATORS = ("wrk", "h2load")


def _cpu_seconds(stat: str) -> float:
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def snapshot(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of each server thread ("ROLE pid/thread-name"), of the load
    generators, and the machine's idle seconds."""
    out: dict[str, float] = {}
    for pid in process_tree(server_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            role = "frontend" if b"serving.frontend" in command else "engine" if b"engine_service" in command else "supervisor"
            for tid in os.listdir(f"/proc/{pid}/task"):
                out[f"{role} {pid}/{tid}"] = _cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat").read_text())
        except OSError:
            continue  # a process that ended meanwhile
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() in LOAD_GENERATORS:
                out[f"load generator {entry}"] = _cpu_seconds(Path(f"/proc/{entry}/stat").read_text())
        except OSError:
            continue
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    out["idle"] = (int(cpu[3]) + int(cpu[4])) / TICK
    return out


def measure(repository: str, model: str, server_args: list[str], connections: int, duration: float, warmup: float, log_path: Path) -> dict:
    texts = load_texts(None)
    server = start_server(repository, [model], log_path, extra=server_args, grpc=False)
    window: dict[str, object] = {}

    def sample() -> None:  # the middle of the measured run: no ramp at either end
        time.sleep(duration / 4)
        first, start = snapshot(server.proc.pid), time.monotonic()
        time.sleep(duration / 2)
        window.update(first=first, last=snapshot(server.proc.pid), seconds=time.monotonic() - start)

    sampler = threading.Thread(target=sample)
    try:
        point = measure_point(server, model, texts, "classify", connections, 1, duration, warmup, window_start=sampler.start)
        sampler.join()
    finally:
        server.stop()
    first, last, seconds = window["first"], window["last"], window["seconds"]
    cores = {k: (v - first.get(k, 0.0)) / seconds for k, v in last.items()}  # type: ignore[union-attr]
    profile = point.get("profile") or {}
    return {"requests_per_s": point["requests_per_s"], "engine_busy": profile.get("engine_busy"), "texts_per_pass": profile.get("texts_per_forward"), "cores": {k: round(v, 3) for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.005}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--model", default="sst2-mux5")
    p.add_argument("--variant", action="append", default=[], help="NAME=SERVER ARGS (repeatable; default: one variant with no arguments)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--log", default="cpu-breakdown-server.log")
    a = p.parse_args()
    variants = [v.partition("=") for v in a.variant] or [("default", "=", "")]
    for _ in range(a.rounds):
        for name, _, args in variants:
            r = measure(a.model_repository, a.model, shlex.split(args), a.connections, a.duration, a.warmup, Path(a.log))
            print(f"{a.model} {name}: {r['requests_per_s']:.0f} req/s, engine busy {r['engine_busy']:.2f}, {r['texts_per_pass']:.1f} texts/pass; cores: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cores"].items()), flush=True)


if __name__ == "__main__":
    main()
