"""uvicorn's httptools protocol with the two timeouts it lacks, so that slow clients cost only
their own connection:

- head timeout: a request's line and headers must arrive within ``header_timeout_s`` of its
  first byte (of the connection being opened, for the first request). A slowloris client that
  sends its headers a byte at a time gets 408 and is closed.
- write timeout: a client that reads none of its responses for ``write_timeout_s`` while the
  server has more to send (the transport's buffer is over its high-water mark) is closed.

The idle timeout between requests is uvicorn's keep-alive timeout; the body timeout is the
HTTP adapter's (``receive_body``).

Shortcuts for the inference routes (``routes.InferenceRoutes``), offered in each request's
scope: ``RESPOND`` writes a whole response (head and body) with one write, where ASGI's two
messages take two; ``ARRIVED`` is when its first byte was read; ``BODY_ARRIVED`` says the body
is all in (no body timer to arm); and when a
connection is lost, each of its unanswered requests' ``ON_DISCONNECT`` hooks is called (the
request is cancelled there, without a watcher task per request).

With a ``HeadAdmission`` (``shedding``), an inference request can be refused from its head alone,
and one whose client is gone by the time it would start (it sent the request and reset the
connection) never reaches the application.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from muxserve.serving.connection_rate import Verdict, reset
from muxserve.serving.http.routes import ARRIVED, BODY_ARRIVED, ON_DISCONNECT, RESPOND
from muxserve.serving.http.wire import error_body

if TYPE_CHECKING:
    from muxserve.serving.connection_rate import ConnectionRate
    from muxserve.serving.http.shedding import HeadAdmission



def closing_response(status: bytes, message: str, extra_headers: bytes = b"") -> bytes:
    """A whole HTTP/1.1 error response, written before the connection is closed: the
    ``{"error": message}`` body of every error answer (``wire.error_body``)."""
    body = error_body(message)
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n%s" % (status, len(body), extra_headers, body)


TIMEOUT_RESPONSE = closing_response(b"408 Request Timeout", "request head did not arrive in time")
CONNECTION_RATE_RESPONSE = closing_response(b"429 Too Many Requests", "too many new connections from this address: keep connections alive", b"retry-after: 1\r\n")


class GuardedHttpProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    write_timeout_s: float = 30.0
    admission: HeadAdmission | None = None  # decisions from a request's head (``shedding``)
    connection_rate: ConnectionRate | None = None  # new connections per client address
    _refused = False  # closed when made (``connection_rate``)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._running: list[Any] = []  # request cycles started on this connection and not yet answered
        self._first_request = True

    @classmethod
    def with_timeouts(cls, header_timeout_s: float, write_timeout_s: float, admission: HeadAdmission | None = None, connection_rate: ConnectionRate | None = None) -> type[GuardedHttpProtocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s, "write_timeout_s": write_timeout_s, "admission": admission, "connection_rate": connection_rate})

    # -- head timeout

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[ON_DISCONNECT] = None  # type: ignore[literal-required]  # this protocol calls the hook
        self.scope[RESPOND] = self.respond  # type: ignore[literal-required]
        self.scope[ARRIVED] = time.monotonic()  # type: ignore[literal-required]

    def on_message_complete(self) -> None:
        self.scope[BODY_ARRIVED] = True  # type: ignore[literal-required]
        super().on_message_complete()

    async def respond(self, scope: dict, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The whole response to the request of ``scope`` (``headers`` with its Content-Length),
        in one write; what ASGI's start and body messages do, for a complete response."""
        cycle = self.cycle if self.cycle is not None and self.cycle.scope is scope else next(c for c in self._running if c.scope is scope)
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected or cycle.response_started:
            return
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        if cycle.more_body:
            cycle.keep_alive = False  # answered before its body was all in (408, 413): see on_response_complete
        content = [STATUS_LINE[status]]
        for name, value in (*cycle.default_headers, *headers):
            content += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        self.transport.write(b"".join(content))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.connection_rate is not None:
            verdict = self.connection_rate.admit_transport(transport)
            if verdict is not Verdict.ADMIT:
                self._refused = True
                self.transport = transport
                if verdict is Verdict.REFUSE:
                    transport.write(CONNECTION_RATE_RESPONSE)
                    transport.close()  # reads nothing more: what the client sent is never parsed
                else:
                    reset(transport)
                return
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()  # the first byte of a new request
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._cancel(self._head_timer)
        self._head_timer = None
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    def on_response_complete(self) -> None:
        # A request answered before its whole body arrived (a body timeout, a body over the limit,
        # a refusal from its head) leaves the rest of that body on the connection: it is closed
        # rather than kept alive to read and discard it (RFC 9110: 408 closes the connection).
        cycle = self.cycle  # the request being read; a pipelined one behind it is not yet answered
        if cycle is not None and cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            self.transport.close()
        super().on_response_complete()

    # -- write timeout

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel(self._write_timer)
        self._write_timer = None

    def _write_expired(self) -> None:
        self._write_timer = None
        # its buffered responses will never be read: reset the connection (SO_LINGER 0) so that
        # the kernel drops them too, rather than holding them behind a FIN that cannot be sent
        for cycle in [self.cycle, *self._running, *(c for c, _ in self.pipeline)]:
            if cycle is not None:
                cycle.disconnected = True  # their handlers write nothing more
        reset(self.transport)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = [c for c in self._running if not c.response_complete]
        self._running.append(cycle)
        if self.admission is not None:
            refusal = self.admission.refusal(cycle.scope)
            if refusal is not None:
                app = refusal
            elif self._first_request:  # one that resets at once sends one request per connection
                app = self._unless_gone(cycle, app)
        self._first_request = False
        super()._start_asgi_task(cycle, app)

    def _unless_gone(self, cycle: Any, app: Any) -> Any:
        """``app``, one loop iteration later, unless the client has gone by then: a reset that
        arrived with the request is handled in the iteration that read it. Only a connection's
        first request waits the iteration (a kept-alive connection's later ones go straight on)."""
        admission = self.admission

        async def run(scope: dict, receive: Any, send: Any) -> None:
            await asyncio.sleep(0)
            if cycle.disconnected:
                admission.gone(scope)
                return
            await app(scope, receive, send)

        return run

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        for cycle in {id(c): c for c in (self.cycle, *self._running) if c is not None}.values():
            hook = cycle.scope.get(ON_DISCONNECT)
            if hook is not None and not cycle.response_complete:
                hook()
        self._cancel(self._head_timer)
        self._cancel(self._write_timer)
        self._head_timer = self._write_timer = None
        super().connection_lost(exc)

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()
