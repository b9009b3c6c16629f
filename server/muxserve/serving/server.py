"""``muxserve serve``: the supervisor of the server's processes.

```
frontend × K (HTTP + gRPC on shared ports: parse, validate, tokenize, format) ─┐ ZMQ (ipc)
                                                                               └> engine process
                                                                                  (models, schedulers,
                                                                                   forward passes, metrics)
```
The supervisor starts the engine process and K frontends and watches them: an engine that
dies is started again (frontends answer 503 and are not ready meanwhile), so is a frontend.
SIGTERM/SIGINT drain: the frontends stop accepting and wait for every accepted request to be
answered, then the engine stops; the supervisor exits 0 when all of them did.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess

from muxserve.serving.cpus import available_cores
from muxserve.serving.processes import READY_FD_ENV, configure_logging, raise_open_files_limit, run_loop, spawn
from muxserve.serving.repository import scan
from muxserve.serving.settings import Settings

log = logging.getLogger("muxserve")
ENGINE_MODULE = "muxserve.serving.engine_service"
FRONTEND_MODULE = "muxserve.serving.frontend"
RESTART_DELAY_S = 0.5
# oneDNN kernels PyTorch builds for each shape of a matmul are kept in two caches (1024 entries
# each, PyTorch's default): building a kernel costs more than a serving pass's matmul, so a cache
# too small for the shapes traffic brings rebuilds kernels on every pass (16 entries served
# sst2-mux5 at 0.7x the rate of 1024). The serving forward pads its packed token rows to a few
# row counts (``PACKED_ROWS_MULTIPLE`` for oneDNN), so the shapes, and the caches' memory, stay bounded.
# OpenMP's idle intra-op threads sleep at once instead of
# spinning for the next parallel region (OMP_WAIT_POLICY=PASSIVE): the forward pass runs as
# fast, for a quarter to a third less CPU, which the frontends sharing the cores get instead.
# An operator's own setting of any of these variables wins.
ENGINE_ENV = {"LRU_CACHE_CAPACITY": "1024", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "OMP_WAIT_POLICY": "PASSIVE"}
MAX_RESTART_DELAY_S = 10.0


def serving_device(settings: Settings) -> str:
    """Where the engine computes, as the frontends' default count needs it: ``--device``, else
    cuda where a served model's config.pbtxt asks for a GPU (``instance_group { kind: KIND_GPU }``,
    as the engine reads it), else cpu."""
    if settings.device:
        return settings.device
    try:
        entries = scan(settings.model_repository)
    except Exception:  # noqa: BLE001 - the engine process reports a broken repository itself
        return "cpu"
    devices = [e.device() for name, e in entries.items() if not settings.models or name in settings.models]
    return next((d for d in devices if d.startswith("cuda")), "cpu")


def default_workers(device: str = "") -> int:
    """Frontend processes, at least 1, at most 8: one per 4 cores where the engine computes on
    the CPU (it needs the rest); one per 2 cores where it computes on a GPU, and its process
    needs about one core to launch passes and route answers."""
    return max(1, min(8, available_cores() // (2 if device.startswith("cuda") else 4)))


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = settings.workers or default_workers(serving_device(settings))
        # Linux abstract socket: no file to clean up, private to this server
        self.address = f"ipc://@muxserve-{os.getpid()}-{secrets.token_hex(4)}"
        self.stopping = False
        self.engine: subprocess.Popen | None = None
        self.frontends: list[subprocess.Popen | None] = [None] * self.workers

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        engine = asyncio.create_task(self._keep_engine())
        frontends = [asyncio.create_task(self._keep_frontend(i)) for i in range(self.workers)]
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([engine, stopped, *frontends], return_when=asyncio.FIRST_COMPLETED)
        failed = engine.done()  # the engine never came up: nothing to serve
        log.info("stopping: frontends drain, then the engine")
        self.stopping = True
        for proc in self.frontends:
            _terminate(proc)
        codes = await asyncio.gather(*frontends)
        _terminate(self.engine)
        codes.append(await engine)
        stopped.cancel()
        log.info("stopped")
        return 1 if failed or any(codes) else 0

    async def _keep_engine(self) -> int:
        failures = 0
        ever_ready = False
        while True:
            read_end, write_end = os.pipe()
            proc = self.engine = spawn(ENGINE_MODULE, [self.address], self.settings, pass_fds=[write_end], env={**ENGINE_ENV, **os.environ, READY_FD_ENV: str(write_end)})
            os.close(write_end)
            ready = await asyncio.to_thread(os.read, read_end, 1)  # b"" when it died first
            os.close(read_end)
            if ready:
                log.info("engine process %d ready", proc.pid)
                ever_ready, failures = True, 0
            code = await asyncio.to_thread(proc.wait)
            if self.stopping:
                return code
            if not ever_ready:
                log.error("engine process exited with %s before serving", code)
                return code or 1
            failures += 0 if ready else 1
            log.error("engine process %d exited with %s: starting it again", proc.pid, code)
            await asyncio.sleep(min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2**failures) if failures else 0)
            if self.stopping:
                return code

    async def _keep_frontend(self, index: int) -> int:
        while True:
            proc = self.frontends[index] = spawn(FRONTEND_MODULE, [self.address], self.settings)
            code = await asyncio.to_thread(proc.wait)
            if self.stopping:
                return code
            log.error("frontend process %d exited with %s: starting it again", proc.pid, code)
            await asyncio.sleep(RESTART_DELAY_S)
            if self.stopping:
                return code


def _terminate(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


def serve(settings: Settings) -> int:
    configure_logging(settings)
    open_files = raise_open_files_limit()
    if 0 < open_files < 4 * settings.client_connection_burst:  # a few clients' bursts of connections would take them all
        log.warning("open files limited to %d (the hard limit of ulimit -n): every connection takes one, and one client address may open %d at once (--client-connection-burst)", open_files, settings.client_connection_burst)
    return run_loop(Supervisor(settings).run())
