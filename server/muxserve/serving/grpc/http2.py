"""gRPC over HTTP/2 on the event loop: the transport under the gRPC adapter.

grpcio's server spends about 0.25 ms of CPU on every unary call before a handler runs (its C
core hands each call to Python through a completion queue and several callbacks). This
transport parses frames in the connection's ``data_received`` and writes a unary answer (its
headers, message and trailers) in one ``write``: 0.07 ms (``benchmarks/serving_stack.py
--grpc-floor``). It is the part of HTTP/2
(RFC 9113) and of gRPC's mapping onto it that gRPC clients use:

- the connection: preface, SETTINGS, PING, GOAWAY, flow control both ways (windows are
  credited as messages are taken, so a stream's reader sets the pace), HPACK header blocks
  (decoded by ``hpack``; what goes out uses no dynamic table, so it is constant bytes);
- calls: ``:path`` names the method; ``grpc-timeout`` sets a deadline; ``grpc-encoding`` gzip
  and deflate are read; ``authorization`` is checked by the ``AccessPolicy``; a client's
  RST_STREAM, or its connection closing, cancels the handler (the data plane drops its texts);
- limits: ``max_concurrent_streams`` per connection (more are refused with REFUSED_STREAM),
  ``max_concurrent_rpcs`` per process, ``max_request_bytes`` per message and the frontend's
  ``max_receiving_bytes`` over the messages still arriving and those of unary calls not yet
  answered (``ReceivingBudget``, shared with HTTP bodies) (RESOURCE_EXHAUSTED), a handshake deadline, idle connections closed, a client that reads none
  of what it is sent (the transport's buffer stays over its high-water mark, or holds what is
  left to send before a close) reset after a write timeout, no frames read from it meanwhile
  (so that PINGs and calls cannot grow that buffer), and a drain that sends GOAWAY and lets
  accepted calls finish; a client that resets calls as soon as it starts them far more often
  than it lets them be answered (HTTP/2 "rapid reset": each call costs the server its start,
  and the stream limit never binds) is sent GOAWAY (ENHANCE_YOUR_CALM), and its address is blocked
  as one far past its connection rate (``ConnectionRate.block_abuser``), else it reconnects and
  goes on; new connections per client address counted in the
  frontend's ``ConnectionRate`` (the HTTP port's buckets: an address has one budget for both).

Handlers are the servicer's methods, as grpc.aio would call them: ``(request, context)`` for a
unary method, ``(request iterator, context)`` and an async generator of responses for a
streaming one. ``context.abort`` ends the call with a status.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import hpack

from muxserve.serving.admission import ReceivingBudget
from muxserve.serving.connection_rate import ConnectionRate, ThrottledCount, Verdict, reset
from muxserve.serving.errors import Overloaded, Unauthenticated
from muxserve.serving.processes import wait_while
from muxserve.serving.security import AccessPolicy

log = logging.getLogger("muxserve")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x3, 0x6, 0x7, 0x8, 0x9, 0xB
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 1, 3, 4, 5, 6

DEFAULT_WINDOW = 65_535  # what either side may send before the other's SETTINGS say otherwise
STREAM_WINDOW = 1 << 20  # what a client may send on a stream before its messages are taken
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = 1 << 20  # the largest frame we accept (a client may send big messages in fewer frames)
MAX_HEADER_LIST = 64 * 1024
HEADER_BLOCKS_KEPT = 64
# calls a connection may reset within PREMATURE_RESET_S of starting them, per max_concurrent_streams,
# beyond one for each call answered. A client's own deadline or cancel comes later than that; a
# rapid-reset client resets each call in the same packet that starts it.
RESETS_PER_STREAM = 2
PREMATURE_RESET_S = 0.01
RAPID_RESET = "too many calls reset as soon as they were started"
STREAM_HIGH_WATER = 1 << 20  # a streaming handler waits while this much of its output waits for the client's window
CALM_DOWN = b"too many new connections from this address: keep connections alive and reuse them"
MAX_MESSAGE_DETAILS = 4096  # grpc-message is cut here: the trailers fit in one frame

DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAUTHENTICATED = 4, 8, 12, 13, 16  # gRPC status codes


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


def _hpack_length(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (a string's length, not Huffman-coded)."""
    if value < 0x7F:
        return bytes((value,))
    out, value = bytearray((0x7F,)), value - 0x7F
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal_header(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal that is never indexed: no state, so it can be made once."""
    return b"\x00" + _hpack_length(len(name)) + name + _hpack_length(len(value)) + value


STATUS_200 = b"\x88"  # :status 200, index 8 of HPACK's static table
RESPONSE_HEADERS = STATUS_200 + literal_header(b"content-type", b"application/grpc") + literal_header(b"grpc-accept-encoding", b"identity,deflate,gzip")
OK_TRAILERS = literal_header(b"grpc-status", b"0")


def status_block(code: int, details: str) -> bytes:
    block = literal_header(b"grpc-status", str(code).encode())
    if details:
        block += literal_header(b"grpc-message", percent_encode(details[:MAX_MESSAGE_DETAILS]))
    return block


def percent_encode(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII but '%' as is, every other byte as %XX."""
    raw = text.encode()
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw).encode()


def parse_timeout(value: str) -> float | None:
    """grpc-timeout ("100m", "5S", ...) in seconds; None if it is not one."""
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    if len(value) < 2 or value[-1] not in units or not value[:-1].isdigit() or len(value) > 9:
        return None
    return int(value[:-1]) * units[value[-1]]


class Abort(Exception):
    """The call ends with this status (``Context.abort``, or the transport refusing it)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _code(status: grpc.StatusCode | int) -> int:
    return status if isinstance(status, int) else status.value[0]


class Context:
    """What a handler knows of its call (the part of grpc.aio's ServicerContext muxserve uses)."""

    __slots__ = ("_peer", "_metadata")

    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._peer, self._metadata = peer, metadata

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode | int, details: str = "") -> None:
        raise Abort(_code(code), details)


@dataclass(frozen=True)
class Method:
    """One RPC: its handler, how its requests are parsed and its responses serialized."""

    handler: Callable[..., Any]
    parse: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    streaming: bool


class Stream:
    __slots__ = ("id", "method", "path", "metadata", "deadline", "encoding", "buffer", "message", "requests", "queued", "withheld", "credit", "remote_closed", "task", "send_window", "recv_window", "pending", "trailers", "headers_sent", "drained", "timer", "counted", "opened", "blocked_at", "receiving", "kept")

    def __init__(self, stream_id: int, send_window: int, opened: float = 0.0) -> None:
        self.id = stream_id
        self.opened = opened  # the event loop's time when its HEADERS arrived
        self.blocked_at = 0.0  # when its DATA last waited for the client's window with none sent since
        self.receiving = 0  # bytes of a message not yet whole, held in the server's ReceivingBudget
        self.kept = 0  # bytes of a unary call's whole message, held in the budget until the call ends
        self.method: Method | None = None
        self.path = ""
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.deadline: float | None = None
        self.encoding = "identity"
        self.buffer = bytearray()  # bytes of messages not yet whole
        self.message: tuple[int, bytes] | None = None  # a unary call's request: (compressed, message)
        self.requests: asyncio.Queue[tuple[int, bytes] | None] | None = None  # a streaming call's, None at its end
        self.queued = 0  # bytes of whole requests the handler has not taken
        self.withheld = 0  # bytes received but not yet credited back to the client (while queued is high)
        self.credit = 0  # bytes taken and not yet given back to the client's window (sent once it is half used)
        self.remote_closed = False
        self.task: asyncio.Task | None = None
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW  # what the client may still send
        self.pending = bytearray()  # DATA held back by flow control
        self.trailers: bytes | None = None  # sent once pending is
        self.headers_sent = False
        self.drained: asyncio.Event | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False  # holds one of the process's max_concurrent_rpcs


class ProtocolViolation(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code


class RequestIterator:
    """A streaming call's requests, parsed as the handler takes them; taking one credits its
    bytes back to the client's window, so a handler that reads slowly slows the client down."""

    def __init__(self, connection: Http2Connection, stream: Stream) -> None:
        self.connection, self.stream = connection, stream

    def __aiter__(self) -> RequestIterator:
        return self

    async def __anext__(self) -> Any:
        stream = self.stream
        assert stream.requests is not None and stream.method is not None
        item = await stream.requests.get()
        if item is None:
            stream.requests.put_nowait(None)  # stays ended for a second reader
            raise StopAsyncIteration
        compressed, data = item
        stream.queued -= len(data) + 5
        if stream.withheld and stream.queued < STREAM_WINDOW:
            withheld, stream.withheld = stream.withheld, 0
            self.connection.credit(stream, withheld)
        return stream.method.parse(self.connection.decompress(stream, compressed, data))


class Http2Connection(asyncio.Protocol):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.buffer = bytearray()
        self.preface = False
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_LIST
        self.header_blocks: dict[bytes, list[tuple[str, str]]] = {}  # blocks that decode the same while the table stays (``_decode``)
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.headers_in_progress: tuple[int, int, bytearray] | None = None  # stream, flags, block until END_HEADERS
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.recv_window = CONNECTION_WINDOW
        self.blocked: set[int] = set()  # streams with DATA waiting for a window
        self.going_away = False
        self.reset_credit = RESETS_PER_STREAM * server.max_streams  # see RESETS_PER_STREAM
        self.closed = False
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None
        self.stall_timer: asyncio.TimerHandle | None = None
        self.last_active = self.loop.time()

    # -- connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        if self.server.connection_rate is not None and not self._admitted():
            return
        address = transport.get_extra_info("peername")
        if isinstance(address, tuple):
            self.peer = f"ipv6:[{address[0]}]:{address[1]}" if ":" in address[0] else f"ipv4:{address[0]}:{address[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.server.connections.add(self)
        transport.write(self.server.preamble)
        if self.server.handshake_timeout:
            self.handshake_timer = self.loop.call_later(self.server.handshake_timeout, self._handshake_expired)
        if self.server.idle_timeout:
            self.idle_timer = self.loop.call_later(self.server.idle_timeout, self._idle_check)

    def _admitted(self) -> bool:
        """The client address's bucket of new connections (shared with the HTTP port) has a
        token; else GOAWAY (ENHANCE_YOUR_CALM) and close, or, far past the rate, a reset."""
        transport = self.transport
        assert transport is not None and self.server.connection_rate is not None
        verdict = self.server.connection_rate.admit_transport(transport)
        if verdict is Verdict.ADMIT:
            return True
        self.closed = True
        if verdict is Verdict.REFUSE:
            transport.write(frame(SETTINGS, 0, 0) + frame(GOAWAY, 0, 0, bytes(4) + ENHANCE_YOUR_CALM.to_bytes(4, "big") + CALM_DOWN))
            transport.close()
        else:
            reset(transport)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for timer in (self.handshake_timer, self.idle_timer, self.write_timer, self.stall_timer):
            if timer is not None:
                timer.cancel()
        for stream in list(self.streams.values()):
            self._forget(stream, cancel=True)

    def _handshake_expired(self) -> None:
        if not self.preface:
            self._close()

    def _idle_check(self) -> None:
        idle = self.server.idle_timeout
        if self.streams:
            self.idle_timer = self.loop.call_later(idle, self._idle_check)
            return
        left = self.last_active + idle - self.loop.time()
        if left > 0:
            self.idle_timer = self.loop.call_later(left, self._idle_check)
        else:
            self.goaway(NO_ERROR)
            self._close()

    def goaway(self, code: int = NO_ERROR, details: str = "") -> None:
        """No new calls on this connection; the ones it has go on."""
        if not self.going_away and self.transport is not None:
            self.going_away = True
            self.transport.write(frame(GOAWAY, 0, 0, self.last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big") + details.encode()[:256]))
        if not self.streams:
            self._close()

    def _close(self) -> None:
        """Close once what is buffered is sent (the transport holds the connection open until then)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            if self.transport.get_write_buffer_size():
                self._watch_writes()

    # -- a client that does not read

    def pause_writing(self) -> None:
        if not self.closed:
            self.transport.pause_reading()  # its frames would add to what it does not read
        self._watch_writes()

    def resume_writing(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if not self.closed:
            self.transport.resume_reading()
        elif self.transport.get_write_buffer_size():  # closing: the rest gets a write timeout of its own
            self._watch_writes()

    def _watch_writes(self) -> None:
        if self.write_timer is None and self.server.write_timeout:
            self.write_timer = self.loop.call_later(self.server.write_timeout, self._write_expired)

    def _write_expired(self) -> None:
        """Nothing was read for the write timeout: reset (SO_LINGER 0), so that the kernel drops
        the unread bytes too rather than holding them behind a FIN that cannot be sent."""
        self.write_timer = None
        self.closed = True
        reset(self.transport)

    def abort_all(self) -> None:
        """Past the drain's grace: the calls still open are cancelled and the connection closed."""
        for stream in list(self.streams.values()):
            self._forget(stream, cancel=True)
        self._close()

    # -- reading frames

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buffer = self.buffer
        buffer += data
        try:
            if not self.preface:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise ProtocolViolation(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    return
                if buffer[: len(PREFACE)] != PREFACE:
                    raise ProtocolViolation(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                del buffer[: len(PREFACE)]
                self.preface = True
                if self.handshake_timer is not None:
                    self.handshake_timer.cancel()
                    self.handshake_timer = None
            at, size = 0, len(buffer)
            while size - at >= 9 and not self.closed:
                length = int.from_bytes(buffer[at : at + 3], "big")
                if length > MAX_FRAME:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, f"a frame of {length} bytes (at most {MAX_FRAME})")
                end = at + 9 + length
                if end > size:
                    break
                kind, flags = buffer[at + 3], buffer[at + 4]
                stream_id = int.from_bytes(buffer[at + 5 : at + 9], "big") & 0x7FFFFFFF
                payload = bytes(buffer[at + 9 : end])
                at = end
                self._frame(kind, flags, stream_id, payload)
            del buffer[:at]
        except ProtocolViolation as exc:
            self.goaway(exc.code, str(exc))
            self._close()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.headers_in_progress is not None and kind != CONTINUATION:
            raise ProtocolViolation(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            if self.headers_in_progress is None or self.headers_in_progress[0] != stream_id:
                raise ProtocolViolation(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            block = self.headers_in_progress[2]
            block += payload
            if len(block) > MAX_HEADER_LIST:
                raise ProtocolViolation(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                _, first_flags, _ = self.headers_in_progress
                self.headers_in_progress = None
                self._header_block(first_flags, stream_id, bytes(block))
        elif kind == SETTINGS:
            if stream_id:
                raise ProtocolViolation(PROTOCOL_ERROR, "SETTINGS on a stream")
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "PING of the wrong size")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._forget(stream, cancel=True)
                if self.loop.time() - stream.opened < PREMATURE_RESET_S:
                    self.reset_credit -= 1
                    if self.reset_credit <= 0 and not self.going_away:
                        self._rapid_reset()
        elif kind == GOAWAY:
            self.goaway(NO_ERROR)
        elif kind == PUSH_PROMISE:
            raise ProtocolViolation(PROTOCOL_ERROR, "a client cannot push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 says

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for i in range(0, len(payload), 6):
            key, value = int.from_bytes(payload[i : i + 2], "big"), int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > 0x7FFFFFFF:
                    raise ProtocolViolation(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.peer_initial_window = value - self.peer_initial_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 0xFFFFFF:
                    raise ProtocolViolation(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
        self._write(frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window += increment
            self._flush(stream)

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(flags, stream_id, block)
        else:
            self.headers_in_progress = (stream_id, flags, bytearray(block))

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        """The header block, decoded. A client sends the same block for call after call (the
        fields it repeats are references to its table): a block that left the table as it was
        decodes the same until the table changes, so it is kept (hpack's decoding in Python is
        a fifth of the frontend's CPU per call otherwise)."""
        known = self.header_blocks.get(block)
        if known is not None:
            return known
        entries = self.decoder.header_table.dynamic_entries
        before = (len(entries), entries[0] if entries else None)
        try:
            headers = self.decoder.decode(block)
        except hpack.HPACKError as exc:
            raise ProtocolViolation(COMPRESSION_ERROR, f"header block: {exc}") from None
        if len(entries) == before[0] and (entries[0] if entries else None) is before[1]:
            if len(self.header_blocks) < HEADER_BLOCKS_KEPT:
                self.header_blocks[block] = headers
        else:
            self.header_blocks.clear()  # the table changed: what was kept may decode otherwise now
        return headers

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        headers = self._decode(block)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: its side of the stream ends
            if flags & END_STREAM:
                self._remote_end(stream)
            return
        if stream_id <= self.last_stream_id or not stream_id & 1:
            if stream_id > self.last_stream_id:
                raise ProtocolViolation(PROTOCOL_ERROR, "a client's stream id must be odd")
            return  # a stream that has ended: what the client still sends for it is dropped
        self.last_stream_id = stream_id
        if self.going_away or len(self.streams) >= self.server.max_streams:
            self._write(frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4, "big")))
            return
        stream = Stream(stream_id, self.peer_initial_window, self.loop.time())
        self.streams[stream_id] = stream
        try:
            self._start_call(stream, headers)
        except Abort as exc:
            self._finish(stream, status_block(exc.code, exc.details))
            return
        if flags & END_STREAM:
            self._remote_end(stream)

    def _start_call(self, stream: Stream, headers: list[tuple[str, str]]) -> None:
        path = method = content_type = ""
        authorization: str | None = None
        metadata = []
        for name, value in headers:
            if name[0] == ":":
                if name == ":path":
                    path = value
                elif name == ":method":
                    method = value
            elif name == "content-type":
                content_type = value
            elif name == "grpc-timeout":
                timeout = parse_timeout(value)
                if timeout is not None:
                    stream.deadline = timeout
            elif name == "grpc-encoding":
                stream.encoding = value
            else:
                if name == "authorization":
                    authorization = value
                metadata.append((name, value))
        stream.path, stream.metadata = path, tuple(metadata)
        if method != "POST" or not content_type.startswith("application/grpc"):
            raise Abort(UNIMPLEMENTED, f"not a gRPC call ({method or 'no method'} {content_type or 'no content-type'})")
        target = self.server.methods.get(path)
        if target is None:
            raise Abort(UNIMPLEMENTED, f"unknown method {path}")
        if stream.encoding not in ("identity", "gzip", "deflate"):
            raise Abort(UNIMPLEMENTED, f"grpc-encoding {stream.encoding} is not supported (gzip, deflate, identity)")
        policy = self.server.policy
        if policy is not None:
            try:
                policy.check_grpc(path, authorization)
            except Unauthenticated as exc:
                raise Abort(UNAUTHENTICATED, exc.message) from None
        if self.server.active_rpcs >= self.server.max_rpcs > 0:
            raise Abort(RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
        self.server.active_rpcs += 1
        stream.counted = True
        stream.method = target
        if stream.deadline is not None:
            stream.timer = self.loop.call_later(stream.deadline, self._deadline_passed, stream)
        if target.streaming:
            stream.requests = asyncio.Queue()
            stream.task = self.loop.create_task(self._run_stream(stream, target))

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        self.recv_window -= length
        if self.recv_window < 0:
            raise ProtocolViolation(FLOW_CONTROL_ERROR, "the client sent past the connection's window")
        if self.recv_window < CONNECTION_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - self.recv_window).to_bytes(4, "big")))
            self.recv_window = CONNECTION_WINDOW
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # a stream that ended (or was refused) on our side
        stream.recv_window -= length
        if stream.recv_window < 0:
            self._finish(stream, status_block(RESOURCE_EXHAUSTED, "the client sent past the stream's window"))
            return
        buffer = stream.buffer
        buffer += self._unpad(flags, payload)
        limit = self.server.max_message
        while len(buffer) >= 5:
            size = int.from_bytes(buffer[1:5], "big")
            if size > limit:
                self._finish(stream, status_block(RESOURCE_EXHAUSTED, f"Received message larger than max ({size} vs. {limit})"))
                return
            if len(buffer) < 5 + size:
                break
            compressed = buffer[0]
            if compressed and stream.encoding == "identity":
                self._finish(stream, status_block(INTERNAL, "a compressed message without grpc-encoding"))
                return
            message = (compressed, bytes(buffer[5 : 5 + size]))  # decompressed when taken
            del buffer[: 5 + size]
            if stream.requests is not None:
                stream.requests.put_nowait(message)
                stream.queued += size + 5
            elif stream.message is not None:
                self._finish(stream, status_block(UNIMPLEMENTED, "a unary call with more than one request message"))
                return
            else:
                stream.message = message
                stream.kept = 5 + size
        budget = self.server.receiving
        # a message still arriving holds its bytes there, and a unary call's whole message until
        # the call ends (its handler holds the request until it answers)
        held = len(buffer) + stream.kept
        if budget is not None and held != stream.receiving:
            grown = held - stream.receiving
            if grown > 0:
                try:
                    budget.take(grown)
                except Overloaded as exc:
                    self._finish(stream, status_block(RESOURCE_EXHAUSTED, exc.message))
                    return
            else:
                budget.give(-grown)
            stream.receiving = held
        # what a handler has not taken holds the client back; a message still arriving does not
        if stream.queued < STREAM_WINDOW:
            withheld, stream.withheld = stream.withheld, 0
            self.credit(stream, length + withheld)
        else:
            stream.withheld += length
        if flags & END_STREAM:
            self._remote_end(stream)

    def _remote_end(self, stream: Stream) -> None:
        stream.remote_closed = True
        if stream.id not in self.streams:
            return
        if stream.requests is not None:
            stream.requests.put_nowait(None)
        elif stream.task is None:
            if stream.message is None:
                self._finish(stream, status_block(UNIMPLEMENTED, "a unary call without its request message"))
            else:
                stream.task = self.loop.create_task(self._run_unary(stream, stream.method, stream.message))
                stream.message = None

    def credit(self, stream: Stream, size: int) -> None:
        """``size`` bytes of the stream were taken: the client may send them again."""
        stream.credit += size
        if stream.recv_window <= STREAM_WINDOW // 2 and stream.credit and not stream.remote_closed and stream.id in self.streams:
            self._write(frame(WINDOW_UPDATE, 0, stream.id, stream.credit.to_bytes(4, "big")))
            stream.recv_window += stream.credit
            stream.credit = 0

    def decompress(self, stream: Stream, compressed: int, message: bytes) -> bytes:
        if not compressed:
            return message
        decoder = zlib.decompressobj(wbits=31 if stream.encoding == "gzip" else 15)
        limit = self.server.max_message
        try:
            data = decoder.decompress(message, limit + 1)
        except zlib.error as exc:
            raise Abort(INTERNAL, f"a {stream.encoding} message that does not decompress: {exc}") from None
        if len(data) > limit:
            raise Abort(RESOURCE_EXHAUSTED, f"Received message larger than max (over {limit} decompressed)")
        return data

    # -- calls

    async def _run_unary(self, stream: Stream, method: Method, message: tuple[int, bytes]) -> None:
        try:
            request = method.parse(self.decompress(stream, *message))
            response = await method.handler(request, Context(self.peer, stream.metadata))
            payload = method.serialize(response)
        except Abort as exc:
            self._finish(stream, status_block(exc.code, exc.details))
        except asyncio.CancelledError:
            pass  # the client went away, or the deadline passed: answered already, if at all
        except Exception:
            log.exception("gRPC %s failed", stream.path)
            self._finish(stream, status_block(INTERNAL, "internal error (the server log has the cause)"))
        else:
            self._answer(stream, payload)

    async def _run_stream(self, stream: Stream, method: Method) -> None:
        try:
            async for response in method.handler(RequestIterator(self, stream), Context(self.peer, stream.metadata)):
                if stream.id not in self.streams:
                    return
                self._send_message(stream, method.serialize(response))
                if len(stream.pending) > STREAM_HIGH_WATER:  # the client reads slowly: wait for it
                    stream.drained = asyncio.Event()
                    await stream.drained.wait()
        except Abort as exc:
            self._finish(stream, status_block(exc.code, exc.details))
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("gRPC %s failed", stream.path)
            self._finish(stream, status_block(INTERNAL, "internal error (the server log has the cause)"))
        else:
            self._finish(stream, OK_TRAILERS)

    def _deadline_passed(self, stream: Stream) -> None:
        stream.timer = None
        if stream.id in self.streams:
            self._finish(stream, status_block(DEADLINE_EXCEEDED, "Deadline Exceeded"), cancel=True)

    # -- writing

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _answer(self, stream: Stream, payload: bytes) -> None:
        """A unary call's response: headers, message and trailers in one write when the windows allow."""
        if stream.id not in self.streams:
            return
        size = len(payload) + 5
        if not stream.pending and size <= self.send_window and size <= stream.send_window and size <= self.peer_max_frame:
            self.send_window -= size
            stream.send_window -= size
            sid = stream.id
            self._write(b"".join((frame(HEADERS, END_HEADERS, sid, RESPONSE_HEADERS), frame(DATA, 0, sid, b"\x00" + len(payload).to_bytes(4, "big") + payload), frame(HEADERS, END_HEADERS | END_STREAM, sid, OK_TRAILERS))))
            self._answered()
            stream.headers_sent = True
            self._forget(stream, cancel=False)
            self._reset_if_open(stream)
            return
        self._send_message(stream, payload)
        self._finish(stream, OK_TRAILERS)

    def _send_message(self, stream: Stream, payload: bytes) -> None:
        if not stream.headers_sent:
            stream.headers_sent = True
            self._write(frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
        stream.pending += b"\x00" + len(payload).to_bytes(4, "big") + payload
        self._flush(stream)

    def _finish(self, stream: Stream, trailers: bytes, cancel: bool = False) -> None:
        """End the call with these trailers (with the response headers before them if none went
        out: a trailers-only response), after any DATA that still waits for a window."""
        if stream.id not in self.streams or stream.trailers is not None:
            return
        if cancel and stream.task is not None and not stream.task.done():
            stream.task.cancel()
        if not stream.headers_sent:
            stream.headers_sent = True
            stream.pending.clear()
            stream.trailers = RESPONSE_HEADERS + trailers
        else:
            stream.trailers = trailers
        self._flush(stream)

    def _flush(self, stream: Stream) -> None:
        pending = stream.pending
        sent = False
        while pending:
            size = min(len(pending), self.send_window, stream.send_window, self.peer_max_frame)
            if size <= 0:
                if sent or stream.id not in self.blocked:
                    stream.blocked_at = self.loop.time()
                self.blocked.add(stream.id)
                if self.stall_timer is None and self.server.write_timeout:
                    self.stall_timer = self.loop.call_later(self.server.write_timeout, self._stall_check)
                return
            sent = True
            self._write(frame(DATA, 0, stream.id, bytes(pending[:size])))
            del pending[:size]
            self.send_window -= size
            stream.send_window -= size
        self.blocked.discard(stream.id)
        if stream.drained is not None:
            stream.drained.set()
            stream.drained = None
        if stream.trailers is not None:
            self._write(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers))
            self._answered()
            self._forget(stream, cancel=True)
            self._reset_if_open(stream)

    def _stall_check(self) -> None:
        """A call whose answer has waited for the client's flow-control window for the write
        timeout, nothing of it sent meanwhile, is reset (CANCEL): its client reads none of it, and
        it would hold its stream and its place among the process's calls for ever."""
        self.stall_timer = None
        now, limit = self.loop.time(), self.server.write_timeout
        for stream_id in list(self.blocked):
            stream = self.streams.get(stream_id)
            if stream is None:
                self.blocked.discard(stream_id)
            elif now - stream.blocked_at >= limit:
                self._write(frame(RST_STREAM, 0, stream_id, CANCEL.to_bytes(4, "big")))
                self._forget(stream, cancel=True)
        if self.blocked and not self.closed:
            first = min(self.streams[i].blocked_at for i in self.blocked)
            self.stall_timer = self.loop.call_at(first + limit, self._stall_check)

    def _flush_blocked(self) -> None:
        for stream_id in list(self.blocked):
            stream = self.streams.get(stream_id)
            if stream is None:
                self.blocked.discard(stream_id)
            elif self.send_window > 0:
                self._flush(stream)

    def _rapid_reset(self) -> None:
        server = self.server
        self.goaway(ENHANCE_YOUR_CALM, RAPID_RESET)
        server.rapid_resets += 1
        blocked = server.connection_rate is not None and self.transport is not None and server.connection_rate.block_abuser(self.transport.get_extra_info("peername"), f"gRPC: {RAPID_RESET}")
        if not blocked and (count := server.rapid_resets_logged.due(self.loop.time(), server.rapid_resets)) is not None:
            log.warning("gRPC: sent GOAWAY to %d connection(s) (latest %s): %s", count, self.peer, RAPID_RESET)

    def _answered(self) -> None:
        if self.reset_credit < RESETS_PER_STREAM * self.server.max_streams:
            self.reset_credit += 1

    def _reset_if_open(self, stream: Stream) -> None:
        """We ended a stream the client is still sending on: tell it to stop (NO_ERROR, as gRPC does)."""
        if not stream.remote_closed:
            self._write(frame(RST_STREAM, 0, stream.id, NO_ERROR.to_bytes(4, "big")))

    def _forget(self, stream: Stream, cancel: bool) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        self.blocked.discard(stream.id)
        if stream.counted:
            stream.counted = False
            self.server.active_rpcs -= 1
        if stream.receiving:
            self.server.receiving.give(stream.receiving)  # type: ignore[union-attr]
            stream.receiving = 0
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if cancel and stream.task is not None and not stream.task.done() and stream.task is not asyncio.current_task():
            stream.task.cancel()
        if stream.drained is not None:
            stream.drained.set()
        self.last_active = self.loop.time()
        if not self.streams:
            self.server.idle.set()
            if self.going_away:
                self._close()


class GrpcServer:
    """gRPC on one listening socket (shared with the other frontends by SO_REUSEPORT): ``start``,
    and ``stop(grace)``, which sends GOAWAY and waits up to ``grace`` for the calls in flight."""

    def __init__(self, methods: dict[str, Method], listener: socket.socket, *, policy: AccessPolicy | None = None, ssl_context: ssl.SSLContext | None = None, max_message: int = 4 << 20, max_streams: int = 100, max_rpcs: int = 0, handshake_timeout: float = 0.0, idle_timeout: float = 0.0, write_timeout: float = 0.0, connection_rate: ConnectionRate | None = None, receiving: ReceivingBudget | None = None) -> None:
        self.methods = methods
        self.listener = listener
        self.policy = policy if policy is not None and policy.enabled else None
        self.ssl_context = ssl_context
        self.max_message, self.max_streams, self.max_rpcs = max_message, max_streams, max_rpcs
        self.handshake_timeout, self.idle_timeout, self.write_timeout = handshake_timeout, idle_timeout, write_timeout
        self.connection_rate = connection_rate  # new connections per client address
        self.receiving = receiving  # bytes of messages not yet whole, across the frontend's connections (HTTP bodies too)
        settings = b"".join(key.to_bytes(2, "big") + value.to_bytes(4, "big") for key, value in ((SETTINGS_MAX_CONCURRENT_STREAMS, max_streams), (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW), (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME), (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)))
        self.preamble = frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))  # what every connection is sent first
        self.connections: set[Http2Connection] = set()
        self.active_rpcs = 0
        self.rapid_resets = 0  # connections sent GOAWAY for resetting calls (RESETS_PER_STREAM)
        self.rapid_resets_logged = ThrottledCount()
        self.idle = asyncio.Event()  # set whenever a connection's last call ends
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if self.ssl_context is not None:
            extra = {"ssl": self.ssl_context, "ssl_handshake_timeout": self.handshake_timeout or None}
        self.server = await loop.create_server(lambda: Http2Connection(self), sock=self.listener, backlog=2048, **extra)

    async def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.goaway(NO_ERROR)
        await wait_while(lambda: any(c.streams for c in self.connections), self.idle, grace or 0.0)
        for connection in list(self.connections):
            connection.abort_all()


def ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS for gRPC: HTTP/2 by ALPN, as gRPC clients require."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["h2"])
    return context
