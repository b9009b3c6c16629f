"""Native load generators driven from Python: ``wrk`` (HTTP, with a Lua script) and ``h2load``
(gRPC unary, one pre-encoded message), plus the server's CPU time from ``/proc``.

A Python client on the same few cores eats the server's CPU and hides its real rate, so every
throughput figure comes from these. The pieces, for ``muxserve bench serve``, the scripts in
``benchmarks/`` and anyone who needs load:

- what to send: ``http_load(kind, model, texts, texts_per_request)`` builds an ``HttpLoad``
  (path, headers, bodies that cycle through the texts) for ``classify`` (``/v1/classify``),
  ``json`` (KServe v2 JSON) or ``binary`` (KServe v2 with the binary tensor extension);
  ``grpc_message`` one length-prefixed ``ModelInfer`` frame; ``json_load`` the same for any
  other server's JSON route;
- how to send it: ``run_wrk`` (closed loop, or paced to a total request rate) and ``run_h2load``,
  each returning a ``LoadResult`` (requests, errors, latency percentiles);
- what it cost the server: ``tree_cpu_seconds(pid)``, the CPU time of a process and all its
  descendants (a multi-process server counts whole);
- all of it in one call: ``measure(...)`` runs a warm-up, snapshots CPU and the server's counters
  around the measured run and returns a ``Measurement``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HTTP_KINDS = ("classify", "json", "binary")
PROTOCOLS = (*HTTP_KINDS, "grpc")
GRPC_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}


class MissingTool(RuntimeError):
    """wrk or h2load is not installed."""


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        package = {"wrk": "wrk", "h2load": "nghttp2-client"}.get(tool, tool)
        raise MissingTool(f"{tool} not found: install it (Debian: apt-get install {package})")
    return path


# ---------------------------------------------------------------------------- what to send


@dataclass
class HttpLoad:
    """POST requests for wrk: every connection cycles through ``bodies`` (threads start at
    different offsets)."""

    path: str
    bodies: list[bytes]
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    texts_per_request: int = 1


def text_groups(texts: Sequence[str], texts_per_request: int) -> list[list[str]]:
    """``len(texts)`` groups of consecutive texts (wrapping around), so that every text is sent."""
    if not texts or texts_per_request < 1:
        raise ValueError("need at least one text and texts_per_request >= 1")
    n = len(texts)
    return [[texts[(i * texts_per_request + j) % n] for j in range(texts_per_request)] for i in range(n)]


def bytes_tensor(texts: Sequence[str]) -> bytes:
    """Triton's BYTES wire format: 4-byte little-endian length + UTF-8 bytes per element."""
    return b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in texts))


def _json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def json_load(path: str, body: Callable[[list[str]], object], texts: Sequence[str], texts_per_request: int = 1) -> HttpLoad:
    """JSON POSTs to ``path`` of any server: ``body(texts of one request)`` -> the JSON object."""
    return HttpLoad(path, [_json(body(g)) for g in text_groups(texts, texts_per_request)], texts_per_request=texts_per_request)


def http_load(kind: str, model: str, texts: Sequence[str], texts_per_request: int = 1) -> HttpLoad:
    """muxserve's request bodies of one HTTP ``kind`` (``classify``, ``json`` or ``binary``)."""
    if kind == "classify":
        return json_load("/v1/classify", lambda g: {"model": model, "inputs": g}, texts, texts_per_request)
    groups = text_groups(texts, texts_per_request)
    path = f"/v2/models/{model}/infer"
    outputs = [{"name": "LABEL"}, {"name": "LOGITS"}]
    if kind == "json":
        return json_load(path, lambda g: {"inputs": [{"name": "TEXT", "shape": [len(g), 1], "datatype": "BYTES", "data": g}], "outputs": outputs}, texts, texts_per_request)
    if kind == "binary":
        bodies = []
        for g in groups:
            raw = bytes_tensor(g)
            header = _json({"inputs": [{"name": "TEXT", "shape": [len(g), 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}], "outputs": [{**o, "parameters": {"binary_data": True}} for o in outputs]})
            bodies.append((header, raw))
        # wrk sends one header set per load: all bodies share one JSON header length by padding
        # the JSON part with trailing spaces (JSON allows them) to the longest
        width = max(len(h) for h, _ in bodies)
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(width)}
        return HttpLoad(path, [h + b" " * (width - len(h)) + raw for h, raw in bodies], headers, texts_per_request)
    raise ValueError(f"HTTP load kind must be one of {HTTP_KINDS}, not {kind!r}")


def grpc_message(model: str, texts: Sequence[str]) -> bytes:
    """One gRPC ``ModelInfer`` request frame (flag byte, 4-byte big-endian length, protobuf) with
    the texts as a BYTES tensor in ``raw_input_contents``, as tritonclient sends it."""
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    tensor = req.inputs.add(name="TEXT", datatype="BYTES")
    tensor.shape.extend([len(texts), 1])
    for name in ("LABEL", "LOGITS"):
        req.outputs.add(name=name)
    req.raw_input_contents.append(bytes_tensor(texts))
    payload = req.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


# ---------------------------------------------------------------------------- results


@dataclass
class LoadResult:
    """One load generator run. Latencies in ms; ``errors`` counts failed requests by kind (HTTP
    status >= 400 counts as ``status``; a gRPC error travels in trailers with HTTP 200, so over
    gRPC only the server's counters tell failures)."""

    tool: str
    connections: int
    seconds: float
    requests: int
    texts_per_request: int = 1
    errors: dict[str, int] = field(default_factory=dict)
    sent: int | None = None  # requests generated (wrk), including those cut off by the stop
    mean_ms: float = math.nan
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    target_rate: float = 0.0  # total requests/s asked for; 0: closed loop

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def texts_per_s(self) -> float:
        return self.requests_per_s * self.texts_per_request

    def summary(self) -> dict:
        out = asdict(self)
        out.update(requests_per_s=self.requests_per_s, texts_per_s=self.texts_per_s, error_count=self.error_count)
        return {k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else (None if isinstance(v, float) else v)) for k, v in out.items()}


# ---------------------------------------------------------------------------- wrk

# The load file: "key=value" lines (path, threads, rate, header=Name: value), then "bodies=K" and
# K records of "<length>\n<bytes>" (binary bodies stay intact). Each thread formats all its
# requests once in init(), so that request() costs nothing. delay() paces a thread to its share
# of a total rate on the wall clock (LuaJIT ffi), without bursting to catch up.
WRK_SCRIPT = r"""
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } mux_timespec; int clock_gettime(int, mux_timespec *); ]]
local ts = ffi.new("mux_timespec")
local function now_ms() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6 end

local threads, counter = {}, 0
function setup(thread)
  counter = counter + 1
  thread:set("thread_index", counter)
  table.insert(threads, thread)
end

local requests, at, interval, next_at = {}, 0, 0, 0
sent = 0
function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*a")
  f:close()
  local cfg, headers, pos = {}, {}, 1
  while true do
    local nl = data:find("\n", pos, true)
    local line = data:sub(pos, nl - 1)
    pos = nl + 1
    local k, v = line:match("^(%w+)=(.*)$")
    if k == "header" then
      local name, value = v:match("^(.-): (.*)$")
      headers[name] = value
    elseif k == "bodies" then
      for _ = 1, tonumber(v) do
        local nl2 = data:find("\n", pos, true)
        local len = tonumber(data:sub(pos, nl2 - 1))
        local h = {}
        for hk, hv in pairs(headers) do h[hk] = hv end
        table.insert(requests, wrk.format("POST", cfg.path, h, data:sub(nl2 + 1, nl2 + len)))
        pos = nl2 + 1 + len
      end
      break
    else
      cfg[k] = v
    end
  end
  at = ((thread_index or 1) - 1) * math.floor(#requests / tonumber(cfg.threads)) % #requests
  local rate = tonumber(cfg.rate)
  if rate > 0 then interval = 1000 * tonumber(cfg.threads) / rate end
end

function request()
  at = at % #requests + 1
  sent = sent + 1
  return requests[at]
end

function delay()
  if interval <= 0 then return 0 end
  local now = now_ms()
  if next_at < now then next_at = now end
  local wait = next_at - now
  next_at = next_at + interval
  return wait
end

function done(summary, latency, reqs)
  -- wrk calls request() once on the first thread to verify the script: not a request sent
  local total = -1
  for _, t in ipairs(threads) do total = total + (t:get("sent") or 0) end
  local e = summary.errors
  io.write(string.format(
    "MUXSERVE_WRK {\"requests\":%d,\"duration_us\":%d,\"sent\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"mean_us\":%f,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"max_us\":%d}\n",
    summary.requests, summary.duration, total, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_load_file(load: HttpLoad, threads: int, rate: float) -> bytes:
    """The file ``WRK_SCRIPT`` reads: settings, headers, then the length-prefixed bodies."""
    head = [f"path={load.path}", f"threads={threads}", f"rate={rate}"] + [f"header={k}: {v}" for k, v in load.headers.items()] + [f"bodies={len(load.bodies)}"]
    return ("\n".join(head) + "\n").encode() + b"".join(str(len(b)).encode() + b"\n" + b for b in load.bodies)


def run_wrk(url: str, load: HttpLoad, connections: int, duration_s: float, threads: int = 1, rate: float = 0.0, timeout_s: float = 30.0) -> LoadResult:
    """``wrk`` against ``url`` (``http://host:port``) for ``duration_s`` with ``connections``
    connections, each keeping one request in flight (closed loop), or with ``rate`` > 0 paced
    to that many requests/s in total (each thread sends its share at even intervals on the wall
    clock; when the server falls behind, the rate is what it manages). Requests that take longer
    than ``timeout_s`` count as ``timeout`` errors."""
    wrk = require("wrk")
    threads = max(1, min(threads, connections))
    if connections % threads:
        raise ValueError(f"wrk splits connections evenly over threads: {connections} connections over {threads} threads")
    base = url if "://" in url else f"http://{url}"
    with tempfile.TemporaryDirectory(prefix="muxserve-wrk-") as tmp:
        d = Path(tmp)
        (d / "load.cfg").write_bytes(wrk_load_file(load, threads, rate))
        (d / "load.lua").write_text(WRK_SCRIPT)
        cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", f"--timeout={max(1, math.ceil(timeout_s))}s", "-s", str(d / "load.lua"), base.rstrip("/") + load.path, "--", str(d / "load.cfg")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MUXSERVE_WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-2000:] or proc.stdout.strip()[-2000:]}")
    r = json.loads(line.split(" ", 1)[1])
    errors = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
    # wrk counts a non-2xx response both as a request and as a status error
    ok = r["requests"] - r["status"]
    return LoadResult("wrk", connections, r["duration_us"] / 1e6, ok, load.texts_per_request, errors, r["sent"], r["mean_us"] / 1e3, r["p50_us"] / 1e3, r["p90_us"] / 1e3, r["p99_us"] / 1e3, r["max_us"] / 1e3, rate)


# ---------------------------------------------------------------------------- h2load


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def run_h2load(url: str, body: bytes, connections: int, duration_s: float, path: str = GRPC_INFER_PATH, headers: dict[str, str] | None = None, streams_per_connection: int = 1, warmup_s: float = 0.0, threads: int = 1, texts_per_request: int = 1) -> LoadResult:
    """``h2load`` (HTTP/2, cleartext) posting ``body`` to ``path`` for ``duration_s`` with
    ``connections`` x ``streams_per_connection`` requests in flight, after ``warmup_s`` of
    unmeasured load on the same connections. Default: gRPC unary ``ModelInfer`` with a frame
    from ``grpc_message``."""
    h2load = require("h2load")
    threads = max(1, min(threads, connections))
    base = url if "://" in url else f"http://{url}"
    with tempfile.TemporaryDirectory(prefix="muxserve-h2load-") as tmp:
        d = Path(tmp)
        (d / "body").write_bytes(body)
        cmd = [h2load, f"-t{threads}", f"-c{connections}", f"-m{streams_per_connection}", f"-D{max(1, round(duration_s))}", "-d", str(d / "body"), "--log-file", str(d / "requests.log")]
        if warmup_s > 0:
            cmd.append(f"--warm-up-time={max(1, round(warmup_s))}")
        for k, v in (GRPC_HEADERS if headers is None else headers).items():
            cmd += ["-H", f"{k}: {v}"]
        proc = subprocess.run([*cmd, base.rstrip("/") + path], capture_output=True, text=True, timeout=duration_s + warmup_s + 120)
        log_lines = (d / "requests.log").read_text().splitlines() if (d / "requests.log").exists() else []
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stderr.strip()[-2000:] or proc.stdout.strip()[-2000:]}")
    # the log: one line per request finished in the measured window: start (us), status, duration (us)
    latencies, failed = [], 0
    for ln in log_lines:
        parts = ln.split()
        if len(parts) >= 3:
            if 200 <= int(parts[1]) < 300:
                latencies.append(int(parts[2]) / 1e3)
            else:
                failed += 1
    latencies.sort()
    errors = {"status": failed} if failed else {}
    for ln in proc.stdout.splitlines():
        if ln.startswith("requests:"):
            # "requests: T total, S started, D done, OK succeeded, F failed, E errored, X timeout"
            fields = {name.strip(","): int(n) for n, name in zip(ln.split()[1::2], ln.split()[2::2], strict=False) if n.isdigit()}
            if fields.get("errored"):
                errors["errored"] = fields["errored"]
            if fields.get("timeout"):
                errors["timeout"] = fields["timeout"]
    seconds = float(max(1, round(duration_s)))
    mean = sum(latencies) / len(latencies) if latencies else math.nan
    return LoadResult("h2load", connections * streams_per_connection, seconds, len(latencies), texts_per_request, errors, None, mean, _percentile(latencies, 50), _percentile(latencies, 90), _percentile(latencies, 99), latencies[-1] if latencies else math.nan)


# ---------------------------------------------------------------------------- the server's CPU


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def process_cpu_seconds(pid: int, waited_children: bool = True) -> float:
    """User + system CPU seconds of ``pid`` (and of its children that have exited and been
    waited for: ``cutime``/``cstime``); 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    columns = (11, 12, 13, 14) if waited_children else (11, 12)  # utime stime cutime cstime
    return sum(int(fields[i]) for i in columns) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants, including those of descendants
    that have exited and been waited for."""
    return sum(process_cpu_seconds(p) for p in process_tree(pid))


# ---------------------------------------------------------------------------- one measurement


@dataclass
class Measurement:
    load: LoadResult
    cpu_seconds: float  # the server's, over the measured run
    server: dict = field(default_factory=dict)  # the server's counters over the measured run (counts_delta)
    client_cpu_seconds: float = 0.0  # the load generator's (this process's waited-for children), over the measured run

    @property
    def requests_served(self) -> float:
        """The server's count of requests over the run where known (it also did the work of
        requests the load generator cut off at its stop), else the load generator's."""
        return self.server.get("requests") or self.load.requests

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_seconds / self.requests_served if self.requests_served else math.nan

    def summary(self) -> dict:
        out = self.load.summary()
        served = self.requests_served
        out.update(cpu_seconds=round(self.cpu_seconds, 3), cpu_ms_per_request=round(self.cpu_ms_per_request, 4) if served else None)
        out.update(client_cpu_seconds=round(self.client_cpu_seconds, 3), client_cpu_ms_per_request=round(1000 * self.client_cpu_seconds / served, 4) if served else None)
        if self.server:
            out["server"] = self.server
        return out


def measure(server_pid: int, run: Callable[[float], LoadResult], duration_s: float, warmup_s: float = 0.0, counters: Callable[[], dict] | None = None) -> Measurement:
    """``run(warmup_s)`` unmeasured (if ``warmup_s`` > 0), then ``run(duration_s)`` between two
    snapshots of the server's CPU time (process ``server_pid`` and its descendants), of the load
    generator's (``children_cpu_seconds``) and, with
    ``counters``, of the server's own counters (e.g. ``lambda: server_counts(url, model)``)."""
    if warmup_s > 0:
        run(warmup_s)
    before = counters() if counters else None
    cpu0, client0 = tree_cpu_seconds(server_pid), children_cpu_seconds()
    load = run(duration_s)
    cpu1, client1 = tree_cpu_seconds(server_pid), children_cpu_seconds()
    delta = {k: after - before.get(k, 0.0) for k, after in counters().items()} if counters and before is not None else {}
    return Measurement(load, cpu1 - cpu0, delta, client1 - client0)


def children_cpu_seconds() -> float:
    """User + system time of this process's waited-for children: the load generator's runs
    (``run_wrk`` and ``run_h2load`` wait for theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def drive(protocol: str, http_url: str, grpc_url: str, model: str, texts: Sequence[str], texts_per_request: int, connections: int, threads: int = 1, rate: float = 0.0) -> Callable[[float], LoadResult]:
    """A ``run(seconds)`` for ``measure``: muxserve's ``protocol`` (``classify``, ``json``,
    ``binary`` over wrk; ``grpc`` over h2load with the first ``texts_per_request`` texts in
    one message) against one model."""
    if protocol == "grpc":
        if rate:
            raise ValueError("paced load (rate) is for the HTTP protocols (wrk)")
        body = grpc_message(model, list(texts[:texts_per_request]) or [""])
        return lambda seconds: run_h2load(grpc_url, body, connections, seconds, threads=threads, texts_per_request=texts_per_request)
    load = http_load(protocol, model, texts, texts_per_request)
    return lambda seconds: run_wrk(http_url, load, connections, seconds, threads=threads, rate=rate)
