"""Overload, soak and abuse runs of the real server under native load (wrk, h2load), and the
served rate of two source trees side by side; the figures behind docs/reliability.md.

    overload  capacity C (closed loop), then a server bounding the wait at --queue-bound-s
              (--max-queue-wait-s), paced at --factor x C for --seconds: accepted and refused
              requests, accepted p99 (the server's own histogram, and a native probe's),
              how long a refusal took, cores used and RSS by process, requests lost (socket
              errors, timeouts, internal failures)
    soak      capacity C (closed loop), --warmup-s paced at --load x C, then --minutes
              one-minute runs at that load: p99 and RSS (by process) per minute, RSS growth
              since the warm-up, the server's counters against wrk's at the end
    abuse     a well-behaved client paced at --victim-load x C, alone, beside each abuser (huge
              element counts, slowloris, disconnect storm, invalid protobuf flood, gRPC
              connection storm; at --abuser-nice, from an address of their own), alone again:
              its p99 beside each over the mean of its two p99s alone; with --variant (server
              arguments) or --tree (source trees), once per variant, alternating --rounds times
    storm-cost  the frontend's CPU per connection of each storm (--abuser), nothing else sent,
              against each server --variant, at --storm-rate
    hotpath   closed-loop served req/s of source trees (--tree NAME=DIR, each a checkout's
              server/ folder), alternating --rounds times in one run

    python benchmarks/reliability.py overload --out results/overload.json

Every server runs the bundled ``--model`` (default sst2-mux5) on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from muxserve.bench.native import GRPC_INFER_PATH, HttpLoad, LoadResult, grpc_message, http_load, process_cpu_seconds, process_tree, run_h2load, run_wrk
from muxserve.bench.run import ROOT, counts_delta, load_texts, machine_info, model_stats, server_counts
from muxserve.launch import ServerHandle, start_server

# enough callers that mux groups and batches fill as under overload (a mux server serves more
# per second the more callers it has, up to its batch size)
CAPACITY_CONNECTIONS = 128


# ---------------------------------------------------------------------------- the server's side


def rss_mb(pid: int, tree: bool = True) -> float:
    """Resident memory of ``pid`` and (``tree``) its descendants, MiB."""
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def role_of(pid: int) -> str:
    """``engine``, ``frontend`` or ``supervisor``: which of the server's processes ``pid`` is."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    return "engine" if b"engine_service" in cmdline else "frontend" if b"serving.frontend" in cmdline else "supervisor"


def rss_by_role(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of the server's engine, frontends and supervisor."""
    out: dict[str, float] = {}
    for p in process_tree(pid):
        role = role_of(p)
        out[role] = round(out.get(role, 0.0) + rss_mb(p, tree=False), 1)
    out.pop("gone", None)
    return out


def cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server's engine, frontends and supervisor."""
    out: dict[str, float] = {}
    for p in process_tree(pid):
        role = role_of(p)
        out[role] = out.get(role, 0.0) + process_cpu_seconds(p, waited_children=False)
    out.pop("gone", None)
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores used by each role between two ``cpu_by_role`` snapshots ``seconds`` apart."""
    return {k: round((after[k] - before.get(k, 0.0)) / seconds, 3) for k in after}


@contextmanager
def sampling_rss(pid: int, every_s: float = 1.0) -> Iterator[list[dict[str, float]]]:
    """RSS samples (MiB, by process role, ``rss_by_role``) taken every ``every_s`` seconds while the block runs."""
    samples: list[dict[str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_by_role(pid))
            stop.wait(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        samples.append(rss_by_role(pid))


def duration_buckets(metrics_text: str, model: str) -> dict[float, float]:
    """Cumulative counts of ``muxserve_request_duration_seconds`` (successful requests) by bucket."""
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "muxserve_request_duration_seconds_bucket" and s.labels.get("model") == model:
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound (s) of the bucket holding quantile ``q`` of the requests between two scrapes."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    for le, count in delta:
        if total and count >= q * total:
            return le
    return math.nan


def scrape(server: ServerHandle) -> str:
    return httpx.get(f"http://{server.http_url}/metrics", timeout=30).text


def wait_idle(server: ServerHandle, model: str, timeout_s: float = 60, quiet_polls: int = 3) -> None:
    """Until the model's queue is empty and its request count has stopped moving for
    ``quiet_polls`` scrapes in a row: requests wrk cut off at its stop may still be in a frontend
    (read, not yet handed to the engine) when the queue is already empty, and each is counted
    once answered or cancelled."""
    deadline, last, quiet = time.monotonic() + timeout_s, None, 0
    while time.monotonic() < deadline:
        families = list(text_string_to_metric_families(scrape(server)))
        empty = any(f.name == "muxserve_queue_depth_texts" for f in families) and all(s.value == 0 for f in families if f.name == "muxserve_queue_depth_texts" for s in f.samples if s.labels.get("model") == model)
        total = sum(s.value for f in families if f.name == "muxserve_requests" for s in f.samples if s.name == "muxserve_requests_total" and s.labels.get("model") == model)
        quiet = quiet + 1 if empty and total == last else 0
        if quiet >= quiet_polls:
            return
        last = total
        time.sleep(0.2)


# ---------------------------------------------------------------------------- load


CAPACITY_SECONDS = 10.0
ABUSER_ADDRESS = "127.0.0.2"  # a client address of the abusers' own (the whole of 127/8 is loopback)
PROBE_RATE = 10.0  # probe requests a second beside the overload
PROBE_CURLS = 10  # curl processes sharing them
# wrk connections under overload: enough that the paced rate is offered while the server keeps
# hundreds of requests waiting (a pacing thread sends only on a connection that is free)
OVERLOAD_CONNECTIONS = 512


@contextmanager
def probing(server: ServerHandle, model: str, text: str, rate: float, seconds: float) -> Iterator[list[tuple[int, float]]]:
    """``curl`` beside the load sending one text ``rate`` times a second for about ``seconds``:
    (status, seconds) of each answer, timed by curl from its first byte sent, so that accepted
    and refused requests' latencies, as a client sees them, can be told apart. One curl sends
    its next request only once it has its answer, which under overload is right after a
    forward pass, when most room has just been made: so PROBE_CURLS of them, staggered, each
    once every PROBE_CURLS / ``rate`` seconds (longer than an answer takes), time requests sent
    on a clock of their own."""
    seen: list[tuple[int, float]] = []
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]})
    each = rate / PROBE_CURLS
    count = max(1, int(each * seconds))
    url = f"http://{server.http_url}/v2/models/{model}/infer?probe=[1-{count}]"
    # the timings go to stderr, which curl does not buffer: all of them are there when it is stopped
    cmd = ["curl", "-s", "-o", "/dev/null", "--rate", f"{round(each * 3600)}/h", "-w", "%{stderr}%{http_code} %{time_total}\\n", "-H", "Content-Type: application/json", "--data-binary", body, url]
    procs = []
    for _ in range(PROBE_CURLS):
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        time.sleep(1 / rate)
    try:
        yield seen
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            _, out = proc.communicate()
            for line in out.splitlines():
                status, took = line.split()
                seen.append((int(status), float(took)))


def percentiles_ms(seconds: Sequence[float]) -> dict:
    ordered = sorted(seconds)
    if not ordered:
        return {"count": 0}
    return {"count": len(ordered), "p50_ms": round(1000 * ordered[len(ordered) // 2], 2), "p99_ms": round(1000 * ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)], 2), "max_ms": round(1000 * ordered[-1], 2)}


def capacity(server: ServerHandle, load: HttpLoad, seconds: float = 0.0) -> LoadResult:
    """Closed-loop requests/s after a short warm-up."""
    run_wrk(server.http_url, load, CAPACITY_CONNECTIONS, 3.0, threads=2)
    return run_wrk(server.http_url, load, CAPACITY_CONNECTIONS, seconds or CAPACITY_SECONDS, threads=2)


def paced(server: ServerHandle, load: HttpLoad, rate: float, seconds: float, connections: int) -> LoadResult:
    connections = max(2, connections - connections % 2)
    return run_wrk(server.http_url, load, connections, seconds, threads=2, rate=rate, timeout_s=30.0)


def lost(result: LoadResult, counts: dict) -> int:
    """Requests that got neither their answer nor a refusal: socket errors, timeouts, and the
    server's internal failures."""
    return sum(v for k, v in result.errors.items() if k != "status") + int(counts.get("failure:internal", 0))


# ---------------------------------------------------------------------------- runs


def overload(a: argparse.Namespace, texts: list[str]) -> dict:
    load = http_load("json", a.model, texts)
    with serving(a, "capacity") as server:
        c = capacity(server, load).requests_per_s
    with serving(a, "overload", "--max-queue-wait-s", f"{a.queue_bound_s:g}") as server:
        run_wrk(server.http_url, load, 8, 3.0, threads=2)  # warm-up
        before, m0, cpu0, t0 = server_counts(server.http_url, a.model), scrape(server), cpu_by_role(server.proc.pid), time.monotonic()
        with sampling_rss(server.proc.pid) as rss, probing(server, a.model, texts[0], PROBE_RATE, a.seconds) as probe:
            result = paced(server, load, a.factor * c, a.seconds, OVERLOAD_CONNECTIONS)
        cpu = cpu_delta(cpu0, cpu_by_role(server.proc.pid), time.monotonic() - t0)
        wait_idle(server, a.model)
        after, m1 = server_counts(server.http_url, a.model), scrape(server)
        rss_roles = rss_by_role(server.proc.pid)
    counts = counts_delta(before, after)
    b0, b1 = duration_buckets(m0, a.model), duration_buckets(m1, a.model)
    return {
        "capacity_requests_per_s": round(c, 1), "offered_requests_per_s": round(a.factor * c, 1), "seconds": a.seconds, "queue_bound_s": a.queue_bound_s,
        "answered": result.requests, "refused": int(counts.get("failure:overloaded", 0) + counts.get("failure:queue_full", 0)),
        "served_requests_per_s": round(result.requests / result.seconds, 1), "wrk": result.summary(), "server": counts,
        "accepted_p99_s_at_most": bucket_quantile(b0, b1, 0.99), "accepted_p50_s_at_most": bucket_quantile(b0, b1, 0.50),
        "probe_accepted": percentiles_ms([t for status, t in probe if status == 200]),
        "probe_refused": percentiles_ms([t for status, t in probe if status in (429, 503)]),
        "probe_other": sorted({status for status, _ in probe} - {200, 429, 503}),
        "cores_used": cpu,
        "rss_mb": {"start": rss[0], "end": rss[-1], "peak_total": round(max(sum(x.values()) for x in rss), 1), "every_10_s": rss[::10], "after_idle": rss_roles},
        "lost": lost(result, counts),
    }


def soak(a: argparse.Namespace, texts: list[str]) -> dict:
    load = http_load("json", a.model, texts)
    with serving(a, "soak") as server:
        pid = server.proc.pid
        c = capacity(server, load).requests_per_s
        rate = a.load * c
        connections = max(16, math.ceil(rate * 0.2))
        warmup = paced(server, load, rate, a.warmup_s, connections)  # the allocators settle at this load
        wait_idle(server, a.model)
        warm = rss_by_role(pid)
        before, s0 = server_counts(server.http_url, a.model), model_stats(server.http_url, a.model)
        minutes = []
        for _ in range(a.minutes):
            result = paced(server, load, rate, 60.0, connections)
            minutes.append({"p99_ms": round(result.p99_ms, 2), "answered": result.requests, "sent": result.sent, "errors": result.errors, "rss_mb": rss_by_role(pid)})
        wait_idle(server, a.model)
        after, s1 = server_counts(server.http_url, a.model), model_stats(server.http_url, a.model)
    counts = counts_delta(before, after)
    sent = sum(m["sent"] or 0 for m in minutes)
    inference = int(s1.get("inference_count", 0)) - int(s0.get("inference_count", 0))
    warm_total, last_total = sum(warm.values()), sum(minutes[-1]["rss_mb"].values())
    return {
        "capacity_requests_per_s": round(c, 1), "offered_requests_per_s": round(rate, 1), "warmup": {"seconds": a.warmup_s, "p99_ms": round(warmup.p99_ms, 2), "answered": warmup.requests},
        "minutes": minutes, "rss_mb_after_warmup": warm,
        "rss_growth_after_warmup": round((last_total - warm_total) / warm_total, 4),
        "rss_growth_by_process": {k: round((minutes[-1]["rss_mb"].get(k, 0.0) - v) / v, 4) for k, v in warm.items() if v},
        "p99_last_over_first_minute": round(minutes[-1]["p99_ms"] / minutes[0]["p99_ms"], 3),
        "server": counts, "wrk_sent": sent, "wrk_answered": sum(m["answered"] for m in minutes),
        # every request wrk sent is counted once: answered, or cancelled when wrk cut it off at a
        # minute's end; one text each; Triton's statistics agree with Prometheus
        "counters_exact": counts["requests"] == sent and counts["failure"] == counts.get("failure:cancelled", 0) and counts["texts"] == counts["success"] and inference == counts["texts"],
        "refused": int(counts.get("failure:overloaded", 0) + counts.get("failure:queue_full", 0)),
        "lost": sum(v for m in minutes for k, v in m["errors"].items() if k != "status") + int(counts.get("failure:internal", 0)),
    }


def abuse(a: argparse.Namespace, texts: list[str]) -> dict:
    """The abuse run; with --variant (server arguments) or --tree (source trees), the whole run
    once per variant (its own server, capacity and reference), alternating --rounds times, and
    each variant's ratios and frontend cores side by side."""
    variants = {name: (args, "") for name, args in ((v.split("=", 1) + [""])[:2] for v in a.variant)}
    variants.update((name, ("", src)) for name, src in (t.split("=", 1) for t in a.tree))
    if not variants:
        return abuse_once(a, texts)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name, (args, src) in variants.items():
            runs[name].append(abuse_once(a, texts, name, shlex.split(args), src))
    ratios = {name: {abuser: [r["abusers"][abuser]["p99_over_alone"] for r in rs] for abuser in rs[0]["abusers"]} for name, rs in runs.items()}
    cores = {name: {abuser: [r["abusers"][abuser]["cores_used"]["frontend"] for r in rs] for abuser in rs[0]["abusers"]} for name, rs in runs.items()}
    return {"variants": {name: args or f"tree {src}" for name, (args, src) in variants.items()}, "p99_over_alone": ratios, "frontend_cores": cores, "runs": runs}


def abuse_once(a: argparse.Namespace, texts: list[str], name: str = "abuse", server_args: Sequence[str] = (), pythonpath: str = "") -> dict:
    load = http_load("json", a.model, texts)
    with serving(a, name, *server_args, pythonpath=pythonpath) as server:
        c = capacity(server, load).requests_per_s
        rate = a.victim_load * c

        def victim() -> tuple[LoadResult, dict[str, float]]:
            """The victim's run and the cores each server process, and this process (the
            abusers' threads), used meanwhile."""
            cpu0, own0, t0 = cpu_by_role(server.proc.pid), os.times(), time.monotonic()
            result = paced(server, load, rate, a.seconds, max(16, math.ceil(rate * 0.2)))
            own1, seconds = os.times(), time.monotonic() - t0
            cores = cpu_delta(cpu0, cpu_by_role(server.proc.pid), seconds)
            cores["abusers"] = round((own1.user + own1.system - own0.user - own0.system) / seconds, 3)
            return result, cores

        alone, cores = victim()
        out: dict = {"server_args": list(server_args), "capacity_requests_per_s": round(c, 1), "victim_requests_per_s": round(rate, 1), "abuser_nice": a.abuser_nice, "storm_rate": a.storm_rate, "alone": {**alone.summary(), "cores_used": cores}, "abusers": {}}
        for name in ABUSERS:
            if a.abuser and name not in a.abuser:
                continue
            with abusing(a, name, server) as tally:
                beside, cores = victim()
            alive = httpx.get(f"http://{server.http_url}/v2/health/live", timeout=30).status_code == 200
            out["abusers"][name] = {"victim": beside.summary(), "abuse": tally, "server_live_after": alive, "cores_used": cores}
        # alone once more at the end: the reference is the mean of the two p99s alone
        again, cores = victim()
        out["alone_after"] = {**again.summary(), "cores_used": cores}
    reference = (alone.p99_ms + again.p99_ms) / 2
    out["alone_p99_ms"] = round(reference, 2)
    for entry in out["abusers"].values():
        entry["p99_over_alone"] = round(entry["victim"]["p99_ms"] / reference, 3)
    return out


@contextmanager
def abusing(a: argparse.Namespace, name: str, server: ServerHandle) -> Iterator[dict]:
    """The abuser ``name`` running (at --abuser-nice; storms at --storm-rate) while the block
    runs; yields its tally, complete once the block is over."""
    abuser = ABUSERS[name]
    if name in STORMS and a.storm_rate:
        abuser = functools.partial(abuser, rate=a.storm_rate)
    stop = threading.Event()
    tally = {"sent": 0}
    thread = threading.Thread(target=niced, args=(a.abuser_nice, abuser, server, a.model, stop, tally), daemon=True)
    thread.start()
    try:
        yield tally
    finally:
        stop.set()
        thread.join()


def storm_cost(a: argparse.Namespace, texts: list[str]) -> dict:
    """The frontend's CPU per storm connection, with nothing else sent: each storm (--abuser,
    default both) against a fresh server of each --variant, for --seconds at --storm-rate,
    alternating --rounds times. CPU seconds do not depend on what else the machine runs, as
    latencies do."""
    variants = dict((v.split("=", 1) + [""])[:2] for v in a.variant) or {"default": ""}
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in variants}
    for _ in range(a.rounds):
        for name, args in variants.items():
            for storm in a.abuser or list(STORMS):
                with serving(a, f"storm-{name}", *shlex.split(args)) as server:
                    cpu0, t0 = cpu_by_role(server.proc.pid), time.monotonic()
                    with abusing(a, storm, server) as tally:
                        time.sleep(a.seconds)
                    seconds = time.monotonic() - t0
                    frontend = cpu_by_role(server.proc.pid)["frontend"] - cpu0["frontend"]
                    runs[name].setdefault(storm, []).append({
                        **tally, "per_s": round(tally["sent"] / seconds), "frontend_cores": round(frontend / seconds, 3),
                        "frontend_us_per_connection": round(1e6 * frontend / max(1, tally["sent"]), 1),
                    })
    return {"variants": variants, "storm_rate": a.storm_rate, "abuser_nice": a.abuser_nice, "runs": runs}


def hotpath(a: argparse.Namespace, texts: list[str]) -> dict:
    """Served req/s of source trees under the same closed loop, alternating; each mean over
    the first tree's."""
    load = http_load("json", a.model, texts)
    trees = dict(t.split("=", 1) for t in a.tree)
    rates: dict[str, list[float]] = {k: [] for k in trees}
    for _ in range(a.rounds):
        for name, src in trees.items():
            with serving(a, f"hotpath-{name}", pythonpath=src) as server:
                rates[name].append(round(capacity(server, load, a.seconds).requests_per_s, 1))
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    first = next(iter(mean.values()))
    spread = {k: {"mean": round(mean[k], 1), "stdev": round(statistics.stdev(v), 1) if len(v) > 1 else 0.0, "min": min(v), "max": max(v)} for k, v in rates.items()}
    return {"requests_per_s": rates, "spread": spread, "mean_over_first": {k: round(v / first, 4) for k, v in mean.items()}, "trees": trees}


# ---------------------------------------------------------------------------- abusers (threads beside the victim)


def _huge_elements(server: ServerHandle, model: str, stop: threading.Event, tally: dict) -> None:
    """10 MB binary requests carrying 2,000,000 one-byte texts under a shape of one, back to
    back; ``tally``: the answers by status, and ``reset``: connections reset before an answer."""
    raw = b"\x01\x00\x00\x00x" * 2_000_000
    header = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(raw)}}]}).encode()
    body = header + raw
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=60) as http:
        while not stop.is_set():
            try:
                answer = str(http.post(f"/v2/models/{model}/infer", content=body, headers={"Inference-Header-Content-Length": str(len(header))}).status_code)
            except httpx.TransportError:
                answer = "reset"
            tally["sent"] += 1
            tally[answer] = tally.get(answer, 0) + 1


def _slowloris(server: ServerHandle, model: str, stop: threading.Event, tally: dict, connections: int = 200) -> None:
    """200 connections sending a request head one byte every 0.5 s, reopened when closed."""
    head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Padding: ".encode() + b"a" * 4096
    socks: list[list] = []
    while not stop.is_set():
        while len(socks) < connections:
            socks.append([socket.create_connection(("127.0.0.1", server.http_port)), 0])
            tally["sent"] += 1
        for entry in list(socks):
            sock, at = entry
            try:
                sock.send(head[at : at + 1])
                entry[1] = (at + 1) % len(head)
            except OSError:
                sock.close()
                socks.remove(entry)
        stop.wait(0.5)
    for sock, _ in socks:
        sock.close()


def _disconnect_storm(server: ServerHandle, model: str, stop: threading.Event, tally: dict, rate: float = 0.0) -> None:
    """Requests whose clients send them and reset the connection at once, from 4 threads, all
    from an address of their own (127.0.0.2: the victim's is 127.0.0.1); ``rate`` connections
    a second in all (0: as fast as they can)."""
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["gone before the answer"]}]}).encode()
    request = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body

    _storm(server.http_port, request, stop, tally, rate)


STORM_THREADS = 4
# how long a storm's connect waits for the server's SYN-ACK: on loopback the handshake is done
# within the connect call unless the server's kernel dropped the SYN (a blocked address), and
# the storm goes on with its next connection, as a client that does not wait for one would
STORM_CONNECT_TIMEOUT_S = 0.002


def _storm(port: int, opening: bytes, stop: threading.Event, tally: dict, rate: float = 0.0) -> None:
    """Connections to ``port`` from the abusers' address, each sending ``opening`` and reset at
    once, from STORM_THREADS threads, ``rate`` a second in all (0: as fast as they can).
    ``tally``: connections tried (``sent``), and those whose SYN went unanswered (``dropped``)."""
    tally.setdefault("dropped", 0)

    def storm() -> None:
        due = time.monotonic()
        while not stop.is_set():
            if rate:
                due += STORM_THREADS / rate
                stop.wait(max(0.0, due - time.monotonic()))
            tally["sent"] += 1
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=STORM_CONNECT_TIMEOUT_S, source_address=(ABUSER_ADDRESS, 0))
            except TimeoutError:
                tally["dropped"] += 1  # the server's kernel dropped the SYN (a blocked address)
                continue
            except OSError:
                continue  # reset by the server before the connect call returned
            try:
                sock.sendall(opening)
            except OSError:
                pass  # the server refused the connection (its address's connection rate) before it was sent
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    threads = [threading.Thread(target=storm, daemon=True) for _ in range(STORM_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


HTTP2_OPENING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # client preface, empty SETTINGS


def _grpc_connection_storm(server: ServerHandle, model: str, stop: threading.Event, tally: dict, rate: float = 0.0) -> None:
    """gRPC connections opened (the HTTP/2 preface and SETTINGS sent) and reset at once, from 4
    threads, from the abusers' address; ``rate`` a second in all (0: as fast as they can)."""
    _storm(server.grpc_port, HTTP2_OPENING, stop, tally, rate)


def _grpc_rapid_reset(server: ServerHandle, model: str, stop: threading.Event, tally: dict) -> None:
    """HTTP/2 rapid reset: on one gRPC connection (again when the server closes it), ModelInfer
    calls of one text started and reset at once, 64 to a write, as fast as the server reads
    them. ``tally``: calls sent, ``goaway``: connections the server sent GOAWAY on, ``dropped``:
    connections whose SYN went unanswered (a blocked address)."""
    import hpack

    message = grpc_message(model, ["reset before its answer"])
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", GRPC_INFER_PATH), (":authority", server.grpc_url), ("content-type", "application/grpc"), ("te", "trailers")])

    def h2(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload

    tally.setdefault("goaway", 0)
    tally.setdefault("dropped", 0)
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", server.grpc_port), timeout=0.5, source_address=(ABUSER_ADDRESS, 0))
        except TimeoutError:
            tally["dropped"] += 1  # the server's kernel dropped the SYN (a blocked address)
            continue
        except OSError:
            continue
        with sock:
            sock.sendall(HTTP2_OPENING)
            sock.settimeout(0.0)
            stream = 1
            with contextlib.suppress(OSError):
                while not stop.is_set() and stream < 2**31 - 256:
                    batch = b"".join(h2(1, 4, s, block) + h2(0, 1, s, message) + h2(3, 0, s, (8).to_bytes(4, "big")) for s in range(stream, stream + 128, 2))
                    sock.settimeout(0.05)  # a server that stopped reading it: on to a new connection
                    sock.sendall(batch)
                    tally["sent"] += 64
                    stream += 128
                    sock.settimeout(0.0)
                    with contextlib.suppress(BlockingIOError):
                        answer = sock.recv(1 << 16)
                        if not answer:
                            break
                        if b"\x07\x00\x00\x00\x00\x00" in answer:  # a GOAWAY frame (type 7, stream 0)
                            tally["goaway"] += 1
                            break


def _invalid_protobuf(server: ServerHandle, model: str, stop: threading.Event, tally: dict) -> None:
    """h2load sending gRPC ModelInfer frames that are not protobuf, 4 connections x 8 streams."""
    garbage = b"\xff\xff\xff\xff not a protobuf message" * 8
    frame = b"\x00" + struct.pack(">I", len(garbage)) + garbage
    while not stop.is_set():
        result = run_h2load(server.grpc_url, frame, 4, 5.0, path=GRPC_INFER_PATH, streams_per_connection=8)
        tally["sent"] += result.requests + result.error_count


def niced(nice: int, abuser: Callable[..., None], *args: object) -> None:
    """``abuser`` at ``nice``: on a machine it shares with the server, an abuser's own CPU
    is then taken from what the server leaves idle, as if it ran on a machine of its own
    (Linux: the calling thread's priority; threads and processes it starts inherit it)."""
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    abuser(*args)


ABUSERS: dict[str, Callable[[ServerHandle, str, threading.Event, dict], None]] = {
    "huge_element_counts": _huge_elements, "slowloris": _slowloris, "disconnect_storm": _disconnect_storm, "invalid_protobuf_flood": _invalid_protobuf,
    "grpc_connection_storm": _grpc_connection_storm, "grpc_rapid_reset": _grpc_rapid_reset,
}
STORMS = ("disconnect_storm", "grpc_connection_storm")


# ---------------------------------------------------------------------------- main


@contextmanager
def serving(a: argparse.Namespace, name: str, *extra: str, pythonpath: str = "") -> Iterator[ServerHandle]:
    env_path = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath
    try:
        server = start_server(a.model_repository, [a.model], Path(a.log_dir) / f"{name}.server.log", extra=[*extra, *a.server_arg])
    finally:
        if pythonpath:
            os.environ.pop("PYTHONPATH") if env_path is None else os.environ.__setitem__("PYTHONPATH", env_path)
    try:
        yield server
    finally:
        server.stop()


RUNS = {"overload": overload, "soak": soak, "abuse": abuse, "storm-cost": storm_cost, "hotpath": hotpath}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", choices=list(RUNS))
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--model", default="sst2-mux5")
    p.add_argument("--texts", default="", help="text source (default: SST-2 dev)")
    p.add_argument("--seconds", type=float, default=60.0, help="overload: paced seconds; abuse: seconds per victim run; hotpath: seconds per measurement")
    p.add_argument("--factor", type=float, default=2.0, help="overload: offered load over capacity")
    p.add_argument("--queue-bound-s", type=float, default=0.5, help="overload: the server's --max-queue-wait-s")
    p.add_argument("--minutes", type=int, default=10, help="soak: one-minute paced runs")
    p.add_argument("--load", type=float, default=0.7, help="soak: offered load over capacity")
    p.add_argument("--warmup-s", type=float, default=60.0, help="soak: seconds at the soak load before the RSS baseline")
    p.add_argument("--victim-load", type=float, default=0.2, help="abuse: the well-behaved client's load over capacity")
    p.add_argument("--abuser-nice", type=int, default=19, help="abuse: the abusers' nice value (19: they use only CPU the server and the victim leave idle; 0: they compete for it)")
    p.add_argument("--storm-rate", type=float, default=0.0, help="abuse, storm-cost: the storms' connections a second (0: as fast as they can)")
    p.add_argument("--abuser", action="append", default=[], choices=list(ABUSERS), help="abuse, storm-cost: only these abusers (repeatable; default: all, storm-cost: the two storms)")
    p.add_argument("--tree", action="append", default=[], help="hotpath, abuse: NAME=DIR, a checkout's server/ folder (repeatable; hotpath: the first is the reference)")
    p.add_argument("--rounds", type=int, default=2, help="hotpath, storm-cost, abuse with --variant: alternations")
    p.add_argument("--variant", action="append", default=[], help="abuse, storm-cost: NAME=SERVER ARGS, a server variant to run against (repeatable; alternating --rounds times)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for muxserve serve (repeatable)")
    p.add_argument("--log-dir", default="results/reliability")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.run == "hotpath" and len(a.tree) < 2:
        p.error("hotpath needs two --tree NAME=DIR or more")
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    report = {"run": a.run, "command": shlex.join(["python", "benchmarks/reliability.py", *(argv if argv is not None else sys.argv[1:])]), "machine": machine_info(), **RUNS[a.run](a, load_texts(a.texts or None))}
    text = json.dumps(report, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
