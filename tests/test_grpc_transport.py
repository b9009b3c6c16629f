"""muxserve's HTTP/2 transport for gRPC (``muxserve.serving.grpc.http2``) against a stock gRPC
client (grpc.aio): handlers on loopback in this test's event loop, so that a test can see what
its handler saw. Messages past every flow-control window in both directions, slow readers,
deadlines and cancels reaching the handler, limits with their status, compression, a drain
that finishes what it accepted, and a peer that does not speak HTTP/2. Then the real server on
grpcio's transport (``--grpc-transport grpcio``) with stock tritonclient."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import grpc
import hpack
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serving import ECHO, Echo, TextSource, build_repository, serving, text_array

from muxserve.serving.admission import ReceivingBudget
from muxserve.serving.grpc.http2 import (
    CANCEL,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RESETS_PER_STREAM,
    RST_STREAM,
    SETTINGS,
    STREAM_WINDOW,
    Context,
    GrpcServer,
    Method,
    frame,
)
from muxserve.serving.security import AccessPolicy

SERVICE = "/test.Service/"
TEXTS = TextSource(seed=31)


class Handlers:
    """Handlers that record what happened to them."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.taken: list[int] = []

    async def echo(self, request: bytes, context: Context) -> bytes:
        return request[::-1]

    async def meta(self, request: bytes, context: Context) -> bytes:
        return dict(context.invocation_metadata())["x-call"].encode()

    async def grow(self, request: bytes, context: Context) -> bytes:
        """A response ``int(request)`` bytes long."""
        size = int(request)
        return bytes(i % 251 for i in range(size))

    async def hold(self, request: bytes, context: Context) -> bytes:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"released"

    async def refuse(self, request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no: ünïcode % and\nnewline")
        return b""

    async def fail(self, request: bytes, context: Context) -> bytes:
        raise RuntimeError("a bug")

    async def slow_stream(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        """Reads a request only after yielding the answer to the one before, each a larger echo."""
        async for request in requests:
            self.taken.append(len(request))
            yield request * 2


def methods(h: Handlers) -> dict[str, Method]:
    unary = {"Echo": h.echo, "Meta": h.meta, "Grow": h.grow, "Hold": h.hold, "Refuse": h.refuse, "Fail": h.fail}
    table = {SERVICE + name: Method(fn, bytes, bytes, False) for name, fn in unary.items()}
    table[SERVICE + "Stream"] = Method(h.slow_stream, bytes, bytes, True)
    return table


@pytest.fixture
async def transport():
    handlers = Handlers()
    listener = socket.create_server(("127.0.0.1", 0))
    server = GrpcServer(methods(handlers), listener, max_message=8 << 20, max_streams=4, max_rpcs=6, policy=AccessPolicy("sekret", ["health"]))
    await server.start()
    yield server, handlers, f"127.0.0.1:{listener.getsockname()[1]}"
    await server.stop(0)


def channel(address: str) -> grpc.aio.Channel:
    """A channel with a connection of its own (channels to one address share one by default)."""
    return grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)])


KEY = (("authorization", "Bearer sekret"),)


async def test_messages_larger_than_every_window_both_ways(transport):
    _, _, address = transport
    async with channel(address) as ch:
        echo = ch.unary_unary(SERVICE + "Echo")
        grow = ch.unary_unary(SERVICE + "Grow")
        big = bytes(range(256)) * (3 * STREAM_WINDOW // 256 + 7)  # 3 MiB and a bit: past the 1 MiB stream window
        assert await echo(big, metadata=KEY) == big[::-1]
        assert await grow(str(5 << 20).encode(), metadata=KEY) == bytes(i % 251 for i in range(5 << 20))
        replies = await asyncio.gather(*(echo(str(i).encode() * 1000, metadata=KEY) for i in range(40)))
        assert replies == [(str(i).encode() * 1000)[::-1] for i in range(40)]  # each call its own answer


async def test_every_call_sees_its_own_headers(transport):
    """Header blocks repeat (kept decoded, ``_decode``) and change meaning when the client's
    table changes: sent again, a new value is a reference to the table's newest entry, the same
    bytes for every value. A client with an HPACK encoder (as nghttp2's, which indexes every
    field) on a raw connection; each call gets the metadata it was sent with."""
    _, _, address = transport
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    encoder = hpack.Encoder()
    writer.write(PREFACE + frame(SETTINGS, 0, 0))
    values = [f"value-{i // 2}" for i in range(40)]  # each value twice
    blocks, answers = [], []
    for i, value in enumerate(values):  # one call at a time (the server takes 4 streams at once)
        stream_id = 2 * i + 1
        fixed = [hpack.NeverIndexedHeaderTuple(k, v) for k, v in ((":path", SERVICE + "Meta"), (":authority", address), ("content-type", "application/grpc"), ("authorization", "Bearer sekret"))]
        block = encoder.encode([(":method", "POST"), (":scheme", "http"), *fixed, ("x-call", value)])  # only x-call enters the table
        blocks.append(block)
        writer.write(frame(HEADERS, END_HEADERS, stream_id, block) + frame(DATA, END_STREAM, stream_id, bytes(5)))
        answer = None
        while True:  # to the end of the call: its message, if any, then trailers with END_STREAM
            head = await reader.readexactly(9)
            payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
            if int.from_bytes(head[5:9], "big") == stream_id:
                if head[3] == DATA:
                    answer = payload[5:]
                elif head[3] == HEADERS and head[4] & END_STREAM:
                    break
        answers.append(answer)
    assert blocks[3] == blocks[5]  # value-1 and value-2, each sent the second time: the same bytes
    writer.close()
    assert answers == [v.encode() for v in values]


async def test_a_stream_of_messages_past_its_window_read_slowly(transport):
    _, handlers, address = transport
    messages = [bytes([i]) * 300_000 for i in range(12)]  # 3.6 MB sent, 7.2 MB answered

    async def requests():
        for m in messages:
            yield m

    async with channel(address) as ch:
        call = ch.stream_stream(SERVICE + "Stream")(requests(), metadata=KEY)
        replies = [r async for r in call]
        assert await call.code() == grpc.StatusCode.OK
    assert replies == [m * 2 for m in messages]
    assert handlers.taken == [len(m) for m in messages]


async def test_deadline_and_cancel_reach_the_handler(transport):
    _, handlers, address = transport
    async with channel(address) as ch:
        hold = ch.unary_unary(SERVICE + "Hold")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await hold(b"", metadata=KEY, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await handlers.cancelled.wait()
        handlers.started.clear()
        handlers.cancelled.clear()
        call = hold(b"", metadata=KEY)
        await handlers.started.wait()
        call.cancel()
        await handlers.cancelled.wait()
        assert await ch.unary_unary(SERVICE + "Echo")(b"abc", metadata=KEY) == b"cba"


async def test_statuses(transport):
    _, _, address = transport
    async with channel(address) as ch:
        cases = [
            (SERVICE + "Refuse", b"", KEY, grpc.StatusCode.INVALID_ARGUMENT, "no: ünïcode % and\nnewline"),
            (SERVICE + "Fail", b"", KEY, grpc.StatusCode.INTERNAL, "server log"),
            (SERVICE + "Nope", b"", KEY, grpc.StatusCode.UNIMPLEMENTED, "unknown method /test.Service/Nope"),
            (SERVICE + "Echo", b"x", (), grpc.StatusCode.UNAUTHENTICATED, ""),
            (SERVICE + "Echo", b"x" * (9 << 20), KEY, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ]
        for path, body, metadata, code, details in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(path)(body, metadata=metadata)
            assert info.value.code() == code and details in info.value.details(), (path, info.value)
        assert await ch.unary_unary(SERVICE + "Echo")(b"still", metadata=KEY) == b"llits"


async def test_compressed_requests(transport):
    _, _, address = transport
    body = b"a compressible text " * 10_000
    for algorithm in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        async with grpc.aio.insecure_channel(address, compression=algorithm) as ch:
            assert await ch.unary_unary(SERVICE + "Echo")(body, metadata=KEY) == body[::-1]
    # 64 MiB of zeros travel as 64 KB: the server inflates no more than max_message of it
    async with grpc.aio.insecure_channel(address, compression=grpc.Compression.Gzip, options=[("grpc.max_send_message_length", 128 << 20)]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(SERVICE + "Echo")(b"\0" * (64 << 20), metadata=KEY)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "decompressed" in info.value.details()


async def test_limits_on_streams_and_calls(transport):
    server, handlers, address = transport
    async with channel(address) as ch:
        hold = ch.unary_unary(SERVICE + "Hold")
        held = [asyncio.ensure_future(hold(b"", metadata=KEY)) for _ in range(6)]  # 4 streams a connection: the client queues 2
        while server.active_rpcs < 4:
            await asyncio.sleep(0.01)
        async with channel(address) as other:  # a second connection: 2 more calls reach max_rpcs = 6
            more = [asyncio.ensure_future(other.unary_unary(SERVICE + "Hold")(b"", metadata=KEY)) for _ in range(2)]
            while server.active_rpcs < 6:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await other.unary_unary(SERVICE + "Echo")(b"one too many", metadata=KEY)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            handlers.release.set()
            assert await asyncio.gather(*held, *more) == [b"released"] * 8
    assert server.active_rpcs == 0


async def test_calls_reset_before_their_answer_again_and_again_get_goaway(transport):
    """HTTP/2 rapid reset: a client that starts calls and resets each at once never meets the
    stream limit. Past its credit of resets (RESETS_PER_STREAM per stream, one more for each
    call answered) it is sent GOAWAY (ENHANCE_YOUR_CALM) and closed; a call answered in between
    earns one back; other connections are served."""
    server, handlers, address = transport
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "Hold"), (":authority", address), ("content-type", "application/grpc"), ("authorization", "Bearer sekret")])
    echo = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "Echo"), (":authority", address), ("content-type", "application/grpc"), ("authorization", "Bearer sekret")])

    def reset_call(stream_id: int) -> bytes:
        return frame(HEADERS, END_HEADERS, stream_id, block) + frame(DATA, END_STREAM, stream_id, bytes(5)) + frame(RST_STREAM, 0, stream_id, (8).to_bytes(4, "big"))

    credit = RESETS_PER_STREAM * server.max_streams
    writer.write(PREFACE + frame(SETTINGS, 0, 0) + b"".join(reset_call(2 * i + 1) for i in range(credit - 1)))
    # one call answered (its own HPACK context: a fresh encoder's block indexes nothing new)
    writer.write(frame(HEADERS, END_HEADERS, 2 * credit + 1, echo) + frame(DATA, END_STREAM, 2 * credit + 1, bytes(5)))
    frames = []
    while not any(kind == HEADERS and flags & END_STREAM for kind, flags, _, _ in frames):
        head = await asyncio.wait_for(reader.readexactly(9), 30)
        frames.append((head[3], head[4], int.from_bytes(head[5:9], "big"), await reader.readexactly(int.from_bytes(head[:3], "big"))))
    writer.write(reset_call(2 * credit + 3))  # the credit it earned: still no GOAWAY
    writer.write(reset_call(2 * credit + 5))  # now past it
    rest = await asyncio.wait_for(reader.read(), 30)  # to the end: the server closes
    goaways = [kind for kind, *_ in frames if kind == GOAWAY]
    assert not goaways and frames[-1][2] == 2 * credit + 1
    at = rest.index(bytes((GOAWAY, 0)) + bytes(4)) - 3  # length, type, flags, stream 0
    payload = rest[at + 9 : at + 9 + int.from_bytes(rest[at : at + 3], "big")]
    assert int.from_bytes(payload[:4], "big") == 2 * credit + 5 and int.from_bytes(payload[4:8], "big") == ENHANCE_YOUR_CALM
    assert b"reset as soon as they were started" in payload
    writer.close()
    async with channel(address) as ch:
        assert await ch.unary_unary(SERVICE + "Echo")(b"ok", metadata=KEY) == b"ko"


async def test_calls_cancelled_after_they_ran_a_while_are_not_held_against_the_client(transport, monkeypatch):
    """A client's own deadlines and cancels come after a call has run for a while: only resets
    within PREMATURE_RESET_S of the call's start count (here none: the threshold is 0), so a
    client that cancels every call it makes keeps its connection."""
    from muxserve.serving.grpc import http2

    monkeypatch.setattr(http2, "PREMATURE_RESET_S", 0.0)
    server, _, address = transport
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    encoder = hpack.Encoder()
    block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "Hold"), (":authority", address), ("content-type", "application/grpc"), ("authorization", "Bearer sekret")])
    calls = 2 * RESETS_PER_STREAM * server.max_streams
    writer.write(PREFACE + frame(SETTINGS, 0, 0) + b"".join(frame(HEADERS, END_HEADERS, s, block) + frame(DATA, END_STREAM, s, bytes(5)) + frame(RST_STREAM, 0, s, (8).to_bytes(4, "big")) for s in range(1, 2 * calls, 2)))
    echo = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "Echo"), (":authority", address), ("content-type", "application/grpc"), ("authorization", "Bearer sekret")])
    last = 2 * calls + 1
    writer.write(frame(HEADERS, END_HEADERS, last, echo) + frame(DATA, END_STREAM, last, b"\x00\x00\x00\x00\x02ok"))
    frames = []
    while not any(stream == last and kind == HEADERS and flags & END_STREAM for kind, flags, stream, _ in frames):
        head = await asyncio.wait_for(reader.readexactly(9), 30)
        frames.append((head[3], head[4], int.from_bytes(head[5:9], "big"), await reader.readexactly(int.from_bytes(head[:3], "big"))))
    assert GOAWAY not in [kind for kind, *_ in frames]
    assert [payload[5:] for kind, _, stream, payload in frames if kind == DATA and stream == last] == [b"ko"]
    writer.close()


async def test_drain_finishes_accepted_calls_and_takes_no_new_ones(transport):
    server, handlers, address = transport
    async with channel(address) as ch:
        call = asyncio.ensure_future(ch.unary_unary(SERVICE + "Hold")(b"", metadata=KEY))
        await handlers.started.wait()
        stopping = asyncio.ensure_future(server.stop(30))
        await asyncio.sleep(0)
        handlers.release.set()
        assert await call == b"released"
        await stopping
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=2).close()


async def test_a_peer_that_does_not_speak_http2_is_closed(transport):
    _, _, address = transport
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await reader.read()  # the server's SETTINGS, then GOAWAY, then the end of the stream
    assert data[3] == 4 and b"preface" in data
    writer.close()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x01\x05\x00\x00\x00\x01" + b"\xff\xff\xff\xff")  # HEADERS with a block that is not HPACK
    assert b"header block" in await reader.read()
    writer.close()
    async with channel(address) as ch:
        assert await ch.unary_unary(SERVICE + "Echo")(b"ok", metadata=KEY) == b"ko"


async def test_a_client_that_reads_nothing_is_reset():
    """A client that sends PINGs (or calls) and reads none of the answers: the server stops
    reading its frames once its answers back up, and resets it after the write timeout, rather
    than buffering answers for it without end."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = GrpcServer(methods(Handlers()), listener, write_timeout=0.2)
    await server.start()
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, listener.getsockname())
    await loop.sock_sendall(client, PREFACE + frame(SETTINGS, 0, 0))
    while not server.connections:
        await asyncio.sleep(0)
    (connection,) = server.connections
    lost = asyncio.Event()
    connection_lost = connection.connection_lost

    def on_lost(exc):
        connection_lost(exc)
        lost.set()

    connection.connection_lost = on_lost
    pings = frame(PING, 0, 0, bytes(8)) * 1024

    async def flood() -> None:
        with contextlib.suppress(OSError):
            while True:
                await loop.sock_sendall(client, pings)

    flooding = asyncio.ensure_future(flood())
    await asyncio.wait_for(lost.wait(), 30)
    flooding.cancel()
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 1  # not ESTABLISHED: reset
    client.close()
    await server.stop(0)


async def test_calls_whose_answers_wait_on_a_window_never_opened_are_reset():
    """A client that opens no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE 0, no
    WINDOW_UPDATE): its calls' answers cannot be sent, and each would hold its place among the
    process's calls for ever (max_rpcs 2 here: every other client refused). After the write
    timeout each is reset (CANCEL), and the next client is served."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = GrpcServer(methods(Handlers()), listener, max_rpcs=2, write_timeout=0.2)
    await server.start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    reader, writer = await asyncio.open_connection(*listener.getsockname())
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "Echo"), (":authority", address), ("content-type", "application/grpc")])
    no_window = frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + (0).to_bytes(4, "big"))  # SETTINGS_INITIAL_WINDOW_SIZE = 0
    writer.write(PREFACE + no_window + b"".join(frame(HEADERS, END_HEADERS, s, block) + frame(DATA, END_STREAM, s, b"\x00\x00\x00\x00\x02ok") for s in (1, 3)))
    reset = set()
    while reset != {1, 3}:
        head = await asyncio.wait_for(reader.readexactly(9), 30)
        payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
        if head[3] == RST_STREAM:
            assert int.from_bytes(payload, "big") == CANCEL
            reset.add(int.from_bytes(head[5:9], "big"))
    assert server.active_rpcs == 0
    async with channel(address) as ch:
        assert await ch.unary_unary(SERVICE + "Echo")(b"ok") == b"ko"
    writer.close()
    await server.stop(0)


async def test_messages_still_arriving_share_the_receiving_budget():
    """Bytes of messages not yet whole are held in the frontend's budget (max_receiving_bytes,
    shared with HTTP bodies): a call whose message would pass it gets RESOURCE_EXHAUSTED while
    the one before it, completed, is answered, and every byte is given back."""
    budget = ReceivingBudget(50_000)
    listener = socket.create_server(("127.0.0.1", 0))
    server = GrpcServer(methods(Handlers()), listener, receiving=budget)
    await server.start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    reader, writer = await asyncio.open_connection(*listener.getsockname())
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "Echo"), (":authority", address), ("content-type", "application/grpc")])
    message = bytes(range(256)) * 160  # 40,960 bytes: its answer fits the client's first window

    def framed(stream_id: int, data: bytes, end: bool = False) -> bytes:
        return frame(DATA, END_STREAM if end else 0, stream_id, data)

    prefixed = b"\x00" + len(message).to_bytes(4, "big") + message
    writer.write(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, block) + framed(1, prefixed[:30_000]))
    writer.write(frame(HEADERS, END_HEADERS, 3, block) + framed(3, prefixed[:25_000]))  # 55,000 arriving: past it

    async def until_end_of(stream_id: int) -> list[tuple[int, bytes]]:
        seen = []
        while True:
            head = await asyncio.wait_for(reader.readexactly(9), 30)
            payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
            if int.from_bytes(head[5:9], "big") == stream_id:
                seen.append((head[3], payload))
                if head[3] == HEADERS and head[4] & END_STREAM:
                    return seen

    trailers = dict(decoder.decode((await until_end_of(3))[-1][1]))
    assert trailers["grpc-status"] == "8" and "max_receiving_bytes" in trailers["grpc-message"]
    assert budget.held == 30_000
    writer.write(framed(1, prefixed[30_000:], end=True))
    answer = b"".join(payload for kind, payload in await until_end_of(1) if kind == DATA)
    assert answer[5:] == message[::-1] and budget.held == 0
    writer.close()
    await server.stop(0)


async def test_a_unary_message_stays_in_the_receiving_budget_until_its_answer():
    """A unary call's handler holds its request until it answers: the message's bytes stay in
    the budget until the call ends, and a call that would pass the budget meanwhile gets
    RESOURCE_EXHAUSTED."""
    handlers = Handlers()
    budget = ReceivingBudget(50_000)
    listener = socket.create_server(("127.0.0.1", 0))
    server = GrpcServer(methods(handlers), listener, receiving=budget)
    await server.start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    async with channel(address) as ch:
        held = asyncio.ensure_future(ch.unary_unary(SERVICE + "Hold")(b"h" * 30_000))
        await handlers.started.wait()
        assert budget.held == 30_005  # the whole message and its prefix, while its handler runs
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ch.unary_unary(SERVICE + "Echo")(b"e" * 25_000)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_receiving_bytes" in refused.value.details()
        handlers.release.set()
        assert await held == b"released"
        assert await ch.unary_unary(SERVICE + "Echo")(b"e" * 25_000) == b"e" * 25_000
        assert budget.held == 0
    await server.stop(0)


def test_the_server_on_grpcio(tmp_path):
    """``--grpc-transport grpcio``: the same service on grpc.aio, for stock tritonclient."""
    repository = build_repository(tmp_path / "repo")
    texts = TEXTS(5)
    with serving(repository, tmp_path / "grpcio-server.log", "--grpc-transport", "grpcio") as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            assert client.is_server_ready()
            tensor = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
            tensor.set_data_from_numpy(text_array(texts))
            np.testing.assert_array_equal(client.infer(ECHO, [tensor]).as_numpy("LOGITS"), Echo(repository).rows(texts))
