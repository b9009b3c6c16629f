"""Start ``muxserve serve`` as a child process on loopback and wait until it is ready.

One launcher for everything that needs the real server process: the test suite
(``tests/helpers.py``), ``muxserve bench serve|profile`` and the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_until_ready(proc: subprocess.Popen, url: str, timeout: float, log_path: Path, **request: Any) -> None:
    """Poll ``GET url`` until it answers 200; an error with the log's tail if ``proc`` exits
    first or ``timeout`` seconds pass (also used for peer servers in ``benchmarks/``).
    ``request``: more arguments of ``httpx.get`` (``headers``, ``verify``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{Path(log_path).read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url, timeout=2, **request).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{Path(log_path).read_text(errors='replace')[-4000:]}")


def start_server(repository: str | Path, models: Sequence[str], log_path: str | Path, http_port: int = 0, grpc_port: int = 0, extra: Sequence[str] = (), grpc: bool = True, ready_timeout: float = 300, shadow: bool = False, tls_ca: str | Path | None = None, api_key: str = "") -> ServerHandle:
    """``muxserve serve`` on loopback (free ports unless given; shadow sampling off unless asked), once ready.
    A server started with TLS or an API key (in ``extra``) is polled over HTTPS trusting
    ``tls_ca`` / with ``api_key``."""
    http_port = http_port or free_port()
    grpc_port = (grpc_port or free_port()) if grpc else 0
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "muxserve", "serve", "--model-repository", str(repository), "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    if not shadow:
        cmd.append("--no-shadow")
    if models:
        cmd += ["--models", ",".join(models)]
    cmd += list(extra)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ServerHandle(proc, http_port, grpc_port, log_path)
    base = f"https://{server.http_url}" if tls_ca else f"http://{server.http_url}"
    request: dict[str, Any] = {"verify": ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True, "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {}}
    try:
        wait_until_ready(proc, f"{base}/v2/health/ready", ready_timeout, log_path, **request)
        # each request may reach another frontend process (one port, SO_REUSEPORT), and one
        # that has not yet heard from the engine answers "not ready" for a moment after another
        # answered ready: every model is polled the same way
        for model in models:
            wait_until_ready(proc, f"{base}/v2/models/{model}/ready", ready_timeout, log_path, **request)
    except RuntimeError:
        server.stop()
        raise
    return server
