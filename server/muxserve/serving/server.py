"""Assembles and runs the server: registry -> data plane -> HTTP and gRPC, one event loop.

SIGTERM/SIGINT drain: the server stops accepting (ready turns false, new requests get 503),
answers every accepted request, then closes both listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from muxserve.serving.dataplane import DataPlane
from muxserve.serving.observability.metrics import Metrics
from muxserve.serving.registry import ModelRegistry
from muxserve.serving.settings import Settings

log = logging.getLogger("muxserve")


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the drain below owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MuxServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.registry = ModelRegistry(settings.model_repository, settings, self.metrics)
        self.shadow = None
        self.plane = DataPlane(self.registry, settings)
        self._stop = asyncio.Event()
        self.http: _UvicornServer | None = None
        self.grpc = None
        self.poller: asyncio.Task | None = None

    async def start(self) -> None:
        await self.registry.start()
        if self.settings.shadow:
            await self._restart_shadow()
            self.registry.listeners.append(self._restart_shadow)
        if self.settings.model_control_mode == "poll":
            self.poller = asyncio.create_task(self.registry.poll_forever(self.settings.repository_poll_secs), name="repository-poll")
        from muxserve.serving.http.app import create_app
        from muxserve.serving.http.protocol import GuardedHttpProtocol

        s = self.settings
        app = create_app(self.plane, self.metrics)
        protocol = GuardedHttpProtocol.with_timeouts(s.header_timeout_s, s.write_timeout_s)
        config = uvicorn.Config(app, host=s.host, port=s.http_port, http=protocol, log_level=s.log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=30, timeout_keep_alive=s.idle_timeout_s, ssl_certfile=s.tls_certfile or None, ssl_keyfile=s.tls_keyfile or None)  # type: ignore[arg-type]
        self.http = _UvicornServer(config)
        if self.settings.grpc_port > 0:
            from muxserve.serving.grpc.server import create_grpc_server

            self.grpc = create_grpc_server(self.plane, f"{self.settings.host}:{self.settings.grpc_port}")
            await self.grpc.start()
            log.info("gRPC listening on %s:%d", self.settings.host, self.settings.grpc_port)
        scheme = "https" if self.settings.tls_certfile else "http"
        log.info("HTTP listening on %s://%s:%d%s", scheme, self.settings.host, self.settings.http_port, " (API key required)" if self.settings.api_key else "")

    async def _restart_shadow(self) -> None:
        """Shadow sampling pairs loaded versions: after a model change, pair the new ones (the old
        sampler stops before the versions it holds do)."""
        from muxserve.serving.observability.shadow import ShadowSampler

        if self.shadow is not None:
            await self.shadow.stop()
        self.shadow = ShadowSampler.from_registry(self.registry, self.metrics)
        self.plane.shadow = self.shadow

    async def drain_and_stop(self) -> None:
        log.info("draining: no new requests; answering those accepted")
        self.plane.draining = True
        if self.poller is not None:
            self.poller.cancel()
        await self.registry.drain()
        if self.shadow is not None:
            await self.shadow.stop()
        if self.grpc is not None:
            await self.grpc.stop(grace=5)
        if self.http is not None:
            self.http.should_exit = True
        self._stop.set()

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain_and_stop()))
        assert self.http is not None
        http_task = asyncio.create_task(self.http.serve())
        await self._stop.wait()
        await http_task
        await self.registry.unload_all()
        log.info("stopped")


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(MuxServer(settings).run())
    else:
        uvloop.run(MuxServer(settings).run())
