"""A frontend process: HTTP and gRPC on ports it shares with the other frontends
(``SO_REUSEPORT``: the kernel spreads connections over them), the data plane (validate,
tokenize, format) and an ``EngineClient`` to the engine process.

Run by the supervisor as ``python -m muxserve.serving.frontend <engine address>``. It listens
once the engine process has answered it. SIGTERM: refuse new requests (503), wait until every
accepted one is answered, then close both listeners and exit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from typing import TYPE_CHECKING

from muxserve.serving.dataplane import DataPlane
from muxserve.serving.engine_client import EngineClient
from muxserve.serving.processes import child_settings, run_loop
from muxserve.serving.settings import Settings

if TYPE_CHECKING:
    from muxserve.serving.http.server import HttpServer

log = logging.getLogger("muxserve")


def shared_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048, reuse_port=True)


class Frontend:
    def __init__(self, settings: Settings, address: str) -> None:
        self.settings = settings
        self.engine = EngineClient(address)
        self.plane = DataPlane(self.engine, settings)
        self.http: HttpServer | None = None
        self.grpc = None
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        from muxserve.serving.connection_rate import ConnectionRate
        from muxserve.serving.http.app import create_app
        from muxserve.serving.http.server import HttpServer, ssl_context
        from muxserve.serving.http.shedding import HeadAdmission
        from muxserve.serving.security import AccessPolicy
        from muxserve.serving.syn_filter import SynBlocklist, listening_sockets, save_syns

        s = self.settings
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self.drain_and_stop()))
        await self.engine.start()
        # listen only once the engine has answered: on ports shared with the other frontends, one
        # that has not heard from it yet would answer "not ready" right after another answered
        # ready (the engine answers once its models are loaded; a later engine restart leaves
        # the frontends listening, not ready)
        connected = asyncio.ensure_future(self.engine.wait_connected())
        stopped = asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait((connected, stopped), return_when=asyncio.FIRST_COMPLETED)
        if self._stopped.is_set():
            connected.cancel()
            self.engine.close()
            return
        stopped.cancel()
        admission = HeadAdmission(self.plane, AccessPolicy(s.api_key, s.open_endpoints))
        blocklist = SynBlocklist() if s.client_connection_rate and s.client_connection_block_s else None
        connection_rate = ConnectionRate(s.client_connection_rate, s.client_connection_burst, blocklist=blocklist, block_s=s.client_connection_block_s) if s.client_connection_rate else None
        tls = ssl_context(s.tls_certfile, s.tls_keyfile) if s.tls_certfile else None
        self.http = HttpServer(create_app(self.plane), header_timeout_s=s.header_timeout_s, idle_timeout_s=s.idle_timeout_s, write_timeout_s=s.write_timeout_s, admission=admission, connection_rate=connection_rate, ssl_context=tls)
        listener = shared_listener(s.host, s.http_port)
        if connection_rate is not None:
            save_syns(listener)  # the address of a connection reset before it is taken up
        if blocklist is not None:
            blocklist.add_sockets([listener])
        if s.grpc_port > 0:
            from muxserve.serving.grpc.server import create_grpc_server

            grpc_listener = shared_listener(s.host, s.grpc_port) if s.grpc_transport == "native" else None
            self.grpc = create_grpc_server(self.plane, grpc_listener or (s.host, s.grpc_port), s.grpc_transport, connection_rate)
            await self.grpc.start()
            if grpc_listener is not None and connection_rate is not None:
                save_syns(grpc_listener)
            if blocklist is not None:  # an address blocked for its HTTP connections is blocked on gRPC too
                blocklist.add_sockets([grpc_listener] if grpc_listener is not None else listening_sockets(s.grpc_port))
        scheme = "https" if s.tls_certfile else "http"
        log.info("frontend listening: HTTP %s://%s:%d%s, gRPC %s", scheme, s.host, s.http_port, " (API key required)" if s.api_key else "", f"{s.host}:{s.grpc_port}" if s.grpc_port > 0 else "off")
        gc.freeze()  # what start-up made lives as long as the process: the collector skips it
        await self.http.start([listener])
        await self._stopped.wait()
        self.engine.close()

    async def drain_and_stop(self) -> None:
        await self.plane.drain()
        if self.grpc is not None:
            await self.grpc.stop(grace=5)
        if self.http is not None:
            await self.http.shutdown(grace=30)
        self._stopped.set()


def main(argv: list[str] | None = None) -> int:
    (address,) = argv if argv is not None else sys.argv[1:]
    run_loop(Frontend(child_settings(), address).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
