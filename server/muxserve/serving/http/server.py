"""muxserve's HTTP/1.1 server: ASGI applications on httptools, with the guards a serving frontend
needs and no more per-request work than a request needs.

What a request costs the frontend is mostly fixed work, and under load it decides how much CPU is
left for the model. This server keeps that work small: one ASGI scope per request and a task that
runs the application, a body handed over whole when it arrived with its head (no event, no
wakeup), and timeouts kept as deadlines on the connection, checked by one timer that is re-armed
only when it fires (a request moves a deadline; it does not start or cancel a timer).

Per connection:

- requests are answered in order; a pipelined request waits (and reading pauses) until the one
  before it is answered;
- keep-alive as HTTP/1.1 says (``Connection: close``, HTTP/1.0); ``Expect: 100-continue`` is
  answered when the application first asks for the body;
- head timeout: a request's line and headers must arrive within ``header_timeout_s`` of its first
  byte (of the connection being opened, for the first request; of the answer before it, for a
  request that arrived while the server was still answering), else 408 and close; a head over
  ``MAX_HEAD_BYTES`` gets 431;
- idle timeout: a kept-alive connection with no request for ``idle_timeout_s`` is closed;
- write timeout: a client that reads none of its responses for ``write_timeout_s`` while the server
  has more to send (the transport's buffer is over its high-water mark, or holds what is left to
  send before a close) is reset;
- a request answered before its body was all in (413, 408, a refusal from its head) closes the
  connection rather than reading and discarding the rest.

The body timeout is the application's (``wire.receive_body``). Shortcuts for the inference routes
(``routes.InferenceRoutes``), offered in each request's scope: ``RESPOND`` writes a whole response
with one write; ``ARRIVED`` is when its first byte was read; ``BODY_ARRIVED`` says the body is all
in; and when a connection is lost, each of its unanswered requests' ``ON_DISCONNECT`` hook is
called (the request is cancelled there, without a watcher task per request).

With a ``HeadAdmission`` (``shedding``), an inference request can be refused from its head alone,
and one whose client is gone by the time it would start (it sent the request and reset the
connection) never reaches the application. With a ``ConnectionRate``, an address past its rate of
new connections is answered 429 (or reset) when it connects.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import http
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httptools

from muxserve.serving.connection_rate import Verdict, reset
from muxserve.serving.http.routes import ARRIVED, BODY_ARRIVED, INTERNAL_MESSAGE, JSON, ON_DISCONNECT, RESPOND
from muxserve.serving.http.wire import error_body
from muxserve.serving.processes import wait_while

if TYPE_CHECKING:
    from muxserve.serving.connection_rate import ConnectionRate
    from muxserve.serving.http.shedding import HeadAdmission

log = logging.getLogger("muxserve")

ASGIApp = Callable[[dict, Any, Any], Awaitable[None]]
MAX_HEAD_BYTES = 64 * 1024  # a request line and headers past this get 431
BODY_HIGH_WATER = 64 * 1024  # body bytes held for an application that has not asked for them
STATUS_LINE = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_DISCONNECT = {"type": "http.disconnect"}
# deadline kinds
HEAD, IDLE = 1, 2


def closing_response(status: int, message: str, extra_headers: bytes = b"") -> bytes:
    """A whole HTTP/1.1 error response, written before the connection is closed: the
    ``{"error": message}`` body of every error answer (``wire.error_body``)."""
    body = error_body(message)
    return b"%scontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n%s" % (STATUS_LINE[status], len(body), extra_headers, body)


TIMEOUT_RESPONSE = closing_response(408, "request head did not arrive in time")
HEAD_TOO_LARGE_RESPONSE = closing_response(431, f"request line and headers exceed {MAX_HEAD_BYTES} bytes")
CONNECTION_RATE_RESPONSE = closing_response(429, "too many new connections from this address: keep connections alive", b"retry-after: 1\r\n")


def status_line(status: int) -> bytes:
    line = STATUS_LINE.get(status)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % status


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self.second = 0
        self.header = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.header = b"date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode()
        return self.header


_date = _Date()


class Exchange:
    """One request and its response: the ASGI ``receive`` and ``send`` of the application that
    answers it, and ``respond`` for a whole response in one write."""

    __slots__ = ("connection", "scope", "body", "held", "more_body", "keep_alive", "expect_continue", "disconnected", "started", "start", "complete", "chunked", "head_only", "waiter", "news", "task", "app")

    def __init__(self, connection: HttpConnection, scope: dict, keep_alive: bool, expect_continue: bool) -> None:
        self.connection = connection
        self.scope = scope
        self.body: list[bytes] = []
        self.held = 0  # bytes in body (a running count: a body in many tiny chunks is summed once)
        self.more_body = True
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.disconnected = False
        self.started = False  # the response has begun (its head is written, or held in ``start``)
        self.start: dict | None = None  # http.response.start, written with the first body message
        self.complete = False  # the whole response is written
        self.chunked = False
        self.head_only = scope["method"] == "HEAD"
        self.waiter: asyncio.Future | None = None  # a receive() waiting for news
        self.news = False  # body, its end, or a disconnect, since the last receive()
        self.task: asyncio.Task | None = None
        self.app: ASGIApp | None = None

    def wake(self) -> None:
        self.news = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> dict:
        connection = self.connection
        if self.expect_continue and self.more_body and not self.complete and not connection.transport.is_closing():
            connection.transport.write(CONTINUE)
        self.expect_continue = False
        connection.resume_reading()  # the application asks for the body: read on
        if not self.disconnected and not self.complete and not self.news:
            self.waiter = connection.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        self.news = False
        if self.disconnected or self.complete:
            return _DISCONNECT
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        self.held = 0
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    def _head(self, status: int, headers: Any, length: int | None) -> list[bytes]:
        content = [status_line(status), _date.get()]
        has_length = False
        for name, value in headers:  # ASGI header names are lowercase bytes
            if name == b"content-length":
                has_length = True
            elif name == b"connection" and value.lower() == b"close":
                self.keep_alive = False
                continue
            content += (name, b": ", value, b"\r\n")
        if not has_length:
            if length is not None:
                content.append(b"content-length: %d\r\n" % length)
            else:
                self.chunked = True
                content.append(b"transfer-encoding: chunked\r\n")
        if self.more_body:
            self.keep_alive = False  # answered before its body was all in: see HttpConnection.response_done
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        return content

    async def respond(self, scope: dict, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The whole response (``headers`` with its Content-Length), in one write; what ASGI's
        start and body messages do, for a complete response."""
        connection = self.connection
        if connection.write_paused and not self.disconnected:
            await connection.drain()
        if self.disconnected or self.started:
            return
        self.started = True
        content = self._head(status, headers, len(body))
        if not self.head_only:
            content.append(body)
        connection.transport.write(b"".join(content))
        self._done()

    async def send(self, message: dict) -> None:
        connection = self.connection
        kind = message["type"]
        if connection.write_paused and not self.disconnected:
            await connection.drain()
        if self.disconnected or self.complete:
            return
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("response already started")
            self.started = True
            self.start = message
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started:
            raise RuntimeError("response body before its start")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        start, self.start = self.start, None
        out: list[bytes] = []
        if start is not None:  # the head goes out with the first body message
            out = self._head(start["status"], start.get("headers", ()), None if more else len(body))
        if body and not self.head_only:
            out += (b"%x\r\n" % len(body), body, b"\r\n") if self.chunked else (body,)
        if not more and self.chunked and not self.head_only:
            out.append(b"0\r\n\r\n")
        if out:
            connection.transport.write(b"".join(out))
        if not more:
            self._done()

    def _done(self) -> None:
        self.complete = True
        self.wake()  # a receive() waiting for a disconnect gets one now
        self.connection.response_done(self)


class HttpServer:
    """An ASGI application served on listening sockets: ``start``, then ``shutdown(grace)``, which
    stops accepting, closes idle connections and waits up to ``grace`` for the answers in flight."""

    def __init__(self, app: ASGIApp, *, header_timeout_s: float = 10.0, idle_timeout_s: float = 30.0, write_timeout_s: float = 30.0, admission: HeadAdmission | None = None, connection_rate: ConnectionRate | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.header_timeout_s, self.idle_timeout_s, self.write_timeout_s = header_timeout_s, idle_timeout_s, write_timeout_s
        self.shortest_timeout_s = min(header_timeout_s, idle_timeout_s)
        self.admission = admission
        self.connection_rate = connection_rate
        self.ssl_context = ssl_context
        self.connections: set[HttpConnection] = set()
        self.servers: list[asyncio.Server] = []
        self.idle = asyncio.Event()  # set whenever a connection finishes an answer
        self.stopping = False

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self.servers.append(await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=2048, ssl=self.ssl_context))

    async def shutdown(self, grace: float = 30.0) -> None:
        self.stopping = True
        for server in self.servers:
            server.close()
        for connection in list(self.connections):
            connection.shutdown()
        await wait_while(lambda: any(c.exchanges for c in self.connections), self.idle, grace)
        for connection in list(self.connections):
            connection.close()


def ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.exchanges: collections.deque[Exchange] = collections.deque()  # answering first, then pipelined
        self.parsing: Exchange | None = None  # the request whose body is arriving
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # bytes read while no head was complete (a head that never completes)
        self.head_size = 0  # the request line and headers, as parsed
        self.expect = False  # Expect: 100-continue
        self.arrived = 0.0
        self.first_request = True
        self.refused = False  # closed when made (``connection_rate``)
        self.closed = False
        self.reading = True
        self.write_paused = False
        self.drained: asyncio.Future | None = None
        self.deadline = 0.0
        self.deadline_kind = 0
        self.timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None
        self.scope_base: dict = {}

    # -- connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if server.connection_rate is not None:
            verdict = server.connection_rate.admit_transport(transport)
            if verdict is not Verdict.ADMIT:
                self.refused = self.closed = True
                if verdict is Verdict.REFUSE:
                    transport.write(CONNECTION_RATE_RESPONSE)  # type: ignore[attr-defined]
                    transport.close()  # reads nothing more: what the client sent is never parsed
                else:
                    reset(transport)
                return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        server.connections.add(self)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.scope_base = {
            "asgi": {"version": "3.0", "spec_version": "2.3"}, "scheme": "https" if transport.get_extra_info("sslcontext") is not None else "http",
            "client": tuple(peer[:2]) if isinstance(peer, tuple) else None, "server": tuple(local[:2]) if isinstance(local, tuple) else None,
        }
        self._watch(HEAD, server.header_timeout_s)  # the first request's head, from the connection's opening

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.closed = True
        self.server.connections.discard(self)
        for timer in (self.timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.write_timer = None
        running = self.exchanges[0] if self.exchanges else None
        for exchange in self.exchanges:
            exchange.disconnected = True
            exchange.wake()
        if running is not None and not running.complete:
            hook = running.scope.get(ON_DISCONNECT)
            if hook is not None:
                hook()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.server.idle.set()

    def shutdown(self) -> None:
        """Stop after the answer in flight (now, if there is none)."""
        if not self.exchanges:
            self.close()
        else:
            for exchange in self.exchanges:
                exchange.keep_alive = False

    # -- reading

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.parsing is None:  # a head, or the start of one
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # an upgrade (h2c, websocket) is not offered: the request is answered over HTTP/1.1,
            # and the connection closed after it (what follows it is in the other protocol)
            for exchange in self.exchanges:
                exchange.keep_alive = False
            self.pause_reading()
        except httptools.HttpParserCallbackError:  # this server's own callback failed, not the client
            log.exception("HTTP request handling failed")
            self._close_with(closing_response(500, INTERNAL_MESSAGE))
            return
        except httptools.HttpParserError:
            self._close_with(closing_response(400, "invalid HTTP request"))
            return
        if self.parsing is None and self.head_bytes > MAX_HEAD_BYTES:
            self._close_with(HEAD_TOO_LARGE_RESPONSE)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.expect = False
        self.arrived = time.monotonic()
        if not self.first_request:  # the first request's head is timed from the connection's opening
            self._watch(HEAD, self.server.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")
        self.headers.append((name, value))
        self.head_size += len(name) + len(value)
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect = True

    def on_headers_complete(self) -> None:
        self.deadline_kind = 0  # the head is in: no deadline until the answer (the body's is the application's)
        self.head_bytes = 0
        if self.closed:
            return
        if self.head_size + len(self.url) > MAX_HEAD_BYTES:
            self._close_with(HEAD_TOO_LARGE_RESPONSE)
            return
        parser = self.parser
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:  # a target llhttp lets through (``http://[``, ``host:443``)
            self._close_with(closing_response(400, "invalid request target"))
            return
        raw_path = url.path
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = urllib.parse.unquote(path)
        version = parser.get_http_version()
        base = self.scope_base
        scope = {
            "type": "http", "asgi": base["asgi"], "http_version": version, "scheme": base["scheme"], "root_path": "", "client": base["client"], "server": base["server"],
            "method": parser.get_method().decode("ascii"), "path": path, "raw_path": raw_path, "query_string": url.query or b"", "headers": self.headers,
            ON_DISCONNECT: None, ARRIVED: self.arrived,  # this server calls the hook
        }
        exchange = Exchange(self, scope, parser.should_keep_alive() and not self.server.stopping, self.expect)
        scope[RESPOND] = exchange.respond
        self.parsing = exchange
        app = self.server.app
        admission = self.server.admission
        if admission is not None:
            refusal = admission.refusal(scope)
            if refusal is not None:
                app = refusal
            elif self.first_request:  # one that resets at once sends one request per connection
                app = self._unless_gone(exchange, app)
        self.first_request = False
        exchange.app = app
        self.exchanges.append(exchange)
        if len(self.exchanges) == 1:
            self._start(exchange)
        else:
            self.pause_reading()  # pipelined: answered after the ones before it

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is None or exchange.complete:
            return
        exchange.body.append(body)
        exchange.held += len(body)
        exchange.news = True
        if exchange.waiter is not None:
            exchange.wake()
        elif exchange.held > BODY_HIGH_WATER:
            self.pause_reading()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        self.parsing = None
        if exchange is None or exchange.complete:
            return
        exchange.more_body = False
        exchange.scope[BODY_ARRIVED] = True
        exchange.wake()

    def _start(self, exchange: Exchange) -> None:
        exchange.task = self.loop.create_task(self._run(exchange))

    async def _run(self, exchange: Exchange) -> None:
        try:
            await exchange.app(exchange.scope, exchange.receive, exchange.send)  # type: ignore[misc]
        except asyncio.CancelledError:
            if not exchange.disconnected:
                raise
        except Exception:
            log.exception("HTTP %s %s failed", exchange.scope["method"], exchange.scope["path"])
        else:
            if not exchange.complete and not exchange.disconnected and not exchange.started:
                log.error("HTTP %s %s: the application sent no response", exchange.scope["method"], exchange.scope["path"])
        if not exchange.complete and not exchange.disconnected:
            if exchange.started:  # a response the application began and did not finish
                self.close()
            else:
                exchange.keep_alive = False
                await exchange.respond(exchange.scope, 500, [(b"content-type", JSON)], error_body(INTERNAL_MESSAGE))

    def _unless_gone(self, exchange: Exchange, app: ASGIApp) -> ASGIApp:
        """``app``, one loop iteration later, unless the client has gone by then: a reset that
        arrived with the request is handled in the iteration that read it. Only a connection's
        first request waits the iteration (a kept-alive connection's later ones go straight on)."""
        admission = self.server.admission
        assert admission is not None

        async def run(scope: dict, receive: Any, send: Any) -> None:
            await asyncio.sleep(0)
            if exchange.disconnected:
                admission.gone(scope)
                return
            await app(scope, receive, send)

        return run

    def response_done(self, exchange: Exchange) -> None:
        """The answer to the first request in line is written: the next one starts, or the
        connection waits idle for one, or closes."""
        if self.exchanges and self.exchanges[0] is exchange:
            self.exchanges.popleft()
        if self.server.stopping:
            self.server.idle.set()
        if self.closed:
            return
        if not exchange.keep_alive:
            # asked for (Connection: close, HTTP/1.0), the server stopping, a failed answer, or a
            # request answered before its whole body arrived (a body timeout, a body over the
            # limit, a refusal from its head), whose rest is not read (RFC 9110: 408 closes)
            self.close()
            return
        if self.exchanges:
            self._start(self.exchanges[0])
        elif self.deadline_kind == HEAD:  # a next head begun while this was answered: its clock starts now
            self._watch(HEAD, self.server.header_timeout_s)
        elif self.parsing is None:  # no next request begun
            self._watch(IDLE, self.server.idle_timeout_s)
        self.resume_reading()

    # -- flow control

    def pause_reading(self) -> None:
        if self.reading and not self.closed:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and not self.closed and len(self.exchanges) <= 1:
            self.reading = True
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._watch_writes()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if self.closed and self.transport.get_write_buffer_size():  # closing: the rest gets a write timeout of its own
            self._watch_writes()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    async def drain(self) -> None:
        if self.drained is None or self.drained.done():
            self.drained = self.loop.create_future()
        await self.drained

    def close(self) -> None:
        """Close once what is buffered is sent. The transport holds the connection open until
        then, so a client that reads none of it is reset after ``write_timeout_s``."""
        self.closed = True
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self._watch_writes()

    def _watch_writes(self) -> None:
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.server.write_timeout_s, self._write_expired)

    def _write_expired(self) -> None:
        self.write_timer = None
        # its buffered responses will never be read: reset the connection (SO_LINGER 0) so that
        # the kernel drops them too, rather than holding them behind a FIN that cannot be sent
        for exchange in self.exchanges:
            exchange.disconnected = True  # their handlers write nothing more
        reset(self.transport)

    # -- timeouts: one deadline, one timer re-armed only when it fires

    def _watch(self, kind: int, seconds: float) -> None:
        """A new deadline, ``seconds`` from now. The timer is armed at most the shortest timeout
        ahead, so that a deadline set later never needs it re-armed sooner: it fires, finds the
        deadline still ahead, and re-arms for it."""
        now = self.loop.time()
        self.deadline, self.deadline_kind = now + seconds, kind
        if self.timer is None:
            self.timer = self.loop.call_at(now + min(seconds, self.server.shortest_timeout_s), self._deadline_check)

    def _deadline_check(self) -> None:
        self.timer = None
        if self.closed or not self.deadline_kind:
            return
        if self.exchanges:  # answers pending: no idle time yet, and a head behind them may be unread
            return  # (reading pauses behind a pipelined request); response_done restarts the clock
        now = self.loop.time()
        left = self.deadline - now
        if left > 0:
            self.timer = self.loop.call_at(now + min(left, self.server.shortest_timeout_s), self._deadline_check)
        elif self.deadline_kind == HEAD:
            self._close_with(TIMEOUT_RESPONSE)
        else:
            self.close()

    def _close_with(self, response: bytes) -> None:
        self.closed = True
        for exchange in self.exchanges:
            exchange.disconnected = True  # their handlers write nothing more
        if not self.transport.is_closing():
            self.transport.write(response)
            self.close()
