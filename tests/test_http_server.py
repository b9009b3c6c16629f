"""muxserve's HTTP/1.1 server (``muxserve.serving.http.server``) on a loopback socket, driven with
raw bytes: what the protocol promises beyond what the serving tests reach through clients
(pipelining order, 100-continue, keep-alive rules, chunked bodies both ways, HEAD, malformed and
oversized heads, the idle timeout, an application that fails, a client that leaves)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from muxserve.serving.http.routes import ON_DISCONNECT, RESPOND
from muxserve.serving.http.server import MAX_HEAD_BYTES, HttpServer

READ_TIMEOUT = 30  # a hang fails the test instead of the suite
TCP_ESTABLISHED = 1


class App:
    """Echoes the method, path and body as JSON; ``/hold`` waits for ``release``; ``/fail``
    raises; ``/stream`` answers in chunks of unknown total length; ``/respond`` uses the
    one-write shortcut."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.gone = asyncio.Event()

    async def __call__(self, scope: dict, receive, send) -> None:
        path = scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/hold":
            scope[ON_DISCONNECT] = self.gone.set
            self.held.set()
            await self.release.wait()
        if path == "/fail":
            raise RuntimeError("the application failed")
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for piece in (b"one ", b"two ", b"three"):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        answer = json.dumps({"method": scope["method"], "path": path, "body": body.decode()}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
        if path == "/respond":
            return await scope[RESPOND](scope, 200, headers, answer)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


class BigAnswer:
    """Answers every request with 4 MiB, more than loopback's socket buffers hold."""

    async def __call__(self, scope: dict, receive, send) -> None:
        await receive()
        body = b"x" * (4 * 1024 * 1024)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def served():
    app = App()
    listener = socket.create_server(("127.0.0.1", 0))
    server = HttpServer(app, header_timeout_s=30, idle_timeout_s=30, write_timeout_s=30)
    await server.start([listener])
    yield app, server, listener.getsockname()[1]
    await server.shutdown(grace=1)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: (status, headers, body), the body by Content-Length or chunked."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), READ_TIMEOUT)
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if not size:
                break
            body += chunk[:-2]
    else:
        body = b""
    return status, headers, body


def post(path: str, body: bytes = b"", extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def still_serves(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/x", b"ok"))
    assert (await read_response(reader))[0] == 200
    writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), READ_TIMEOUT) == b""


async def test_pipelined_requests_are_answered_in_order(served):
    app, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/hold", b"first") + post("/respond", b"second") + post("/plain", b"third"))
    await asyncio.wait_for(app.held.wait(), READ_TIMEOUT)
    app.release.set()
    answers = [await read_response(reader) for _ in range(3)]
    assert [json.loads(body) for _, _, body in answers] == [
        {"method": "POST", "path": "/hold", "body": "first"},
        {"method": "POST", "path": "/respond", "body": "second"},
        {"method": "POST", "path": "/plain", "body": "third"},
    ]
    assert all(status == 200 and "date" in headers for status, headers, _ in answers)
    writer.close()


async def test_expect_100_continue_then_body(served):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == "hello"
    writer.close()


@pytest.mark.parametrize("request_bytes", [
    post("/x", b"a", "connection: close\r\n"),
    b"GET /x HTTP/1.0\r\n\r\n",
])
async def test_connection_close_and_http10_close_after_the_answer(served, request_bytes):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes)
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await closed_by_server(reader)
    writer.close()


async def test_keep_alive_serves_many_requests_on_one_connection(served):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(5):
        writer.write(post("/x", str(i).encode()))
        status, headers, body = await read_response(reader)
        assert status == 200 and "connection" not in headers and json.loads(body)["body"] == str(i)
    writer.close()


async def test_chunked_request_and_chunked_response(served):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == "abcde"
    writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["transfer-encoding"] == "chunked" and body == b"one two three"
    writer.close()


async def test_a_body_in_tiny_chunks_arrives_whole(served):
    """100,000 one-byte chunks, most read before the application asks for the body: every byte
    arrives, in order (what is held is counted as it comes, not summed per chunk, which made
    such a body cost seconds of the event loop)."""
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    text = "".join(chr(ord("a") + i % 26) for i in range(100_000))
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(b"1\r\n%s\r\n" % c.encode() for c in text) + b"0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == text
    writer.close()


async def test_head_answers_headers_without_a_body(served):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /x HTTP/1.1\r\nhost: x\r\n\r\n" + post("/after", b"z"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head
    status, _, body = await read_response(reader)  # the next response follows the head directly
    assert status == 200 and json.loads(body)["path"] == "/after"
    writer.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"NOT AN HTTP REQUEST\r\n\r\n", 400),
    (b"GET http://[ HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    (b"CONNECT host:443 HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nhost: x\r\nbig: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n", 431),
])
async def test_a_bad_head_is_refused_and_closed_while_others_are_served(served, request_bytes, status):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes)
    got, headers, body = await read_response(reader)
    assert got == status and headers["connection"] == "close" and "error" in json.loads(body)
    assert await closed_by_server(reader)
    writer.close()
    await still_serves(port)


async def test_a_failing_application_answers_500_and_the_server_goes_on(served):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/fail"))
    status, _, body = await read_response(reader)
    assert status == 500 and "server log" in json.loads(body)["error"]
    writer.close()
    await still_serves(port)


async def test_a_client_that_leaves_calls_its_requests_disconnect_hook(served):
    app, server, port = served
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/hold"))
    await asyncio.wait_for(app.held.wait(), READ_TIMEOUT)
    writer.close()
    await asyncio.wait_for(app.gone.wait(), READ_TIMEOUT)
    app.release.set()


async def test_an_idle_connection_is_closed():
    listener = socket.create_server(("127.0.0.1", 0))
    server = HttpServer(App(), header_timeout_s=30, idle_timeout_s=0.2, write_timeout_s=30)
    await server.start([listener])
    reader, writer = await asyncio.open_connection(*listener.getsockname())
    writer.write(post("/x", b"a"))
    assert (await read_response(reader))[0] == 200
    assert await closed_by_server(reader)  # nothing more sent: the idle timeout closes it
    writer.close()
    await server.shutdown(grace=1)


async def test_a_failure_of_the_server_itself_answers_500_and_is_logged(served, monkeypatch, caplog):
    from muxserve.serving.http.server import HttpConnection

    _, _, port = served
    original = HttpConnection.on_headers_complete

    def failing(self):
        if self.url == b"/server-bug":
            raise RuntimeError("a bug in the server")
        original(self)

    monkeypatch.setattr(HttpConnection, "on_headers_complete", failing)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /server-bug HTTP/1.1\r\nhost: x\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 500 and "server log" in json.loads(body)["error"]
    assert any("handling failed" in r.getMessage() for r in caplog.records)
    writer.close()
    await still_serves(port)


async def test_a_head_that_arrived_behind_an_answer_is_timed_from_that_answer():
    """Reading pauses behind a pipelined request, so its head's clock starts when the answer
    before it is written, not while the server was not reading it."""
    app = App()
    listener = socket.create_server(("127.0.0.1", 0))
    server = HttpServer(app, header_timeout_s=0.1, idle_timeout_s=30, write_timeout_s=30)
    await server.start([listener])
    address = listener.getsockname()
    reader, writer = await asyncio.open_connection(*address)
    next_request = post("/x", b"second")
    writer.write(post("/hold", b"first") + next_request[:10])
    await asyncio.wait_for(app.held.wait(), READ_TIMEOUT)
    # a head begun later on another connection timing out means this one's head timeout has passed too
    late_reader, late_writer = await asyncio.open_connection(*address)
    late_writer.write(next_request[:10])
    assert (await read_response(late_reader))[0] == 408
    app.release.set()
    writer.write(next_request[10:])
    answers = [await read_response(reader) for _ in range(2)]
    assert [(status, json.loads(body)["body"]) for status, _, body in answers] == [(200, "first"), (200, "second")]
    writer.close()
    late_writer.close()
    await server.shutdown(grace=1)


async def test_a_close_behind_responses_the_client_does_not_read_is_reset():
    """A connection closed after its answer while the client reads none of it: the transport would
    hold it open until the answer is sent; after write_timeout_s it is reset instead."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = HttpServer(BigAnswer(), header_timeout_s=30, idle_timeout_s=30, write_timeout_s=0.2)
    await server.start([listener])
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, listener.getsockname())
    lost = asyncio.Event()
    # the first byte of a request makes the connection known to the server
    client.send(b"GET /big HTTP/1.1\r\n")
    while not server.connections:
        await asyncio.sleep(0)
    (connection,) = server.connections
    connection.transport.set_write_buffer_limits(high=64 * 1024 * 1024)  # never paused: only the close is left to time out
    connection_lost = connection.connection_lost

    def on_lost(exc):
        connection_lost(exc)
        lost.set()

    connection.connection_lost = on_lost
    client.send(b"host: x\r\nconnection: close\r\n\r\n")
    await asyncio.wait_for(lost.wait(), READ_TIMEOUT)
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED
    client.close()
    await server.shutdown(grace=1)
