"""Limits and faults against the real server process, started with small limits: bad inputs are
refused before they cost anything (huge element counts, empty texts, malformed JSON and
protobuf), each limit answers with its own status (413, 429 + Retry-After, RESOURCE_EXHAUSTED,
408), a failing forward pass fails only its own requests and tells callers nothing internal,
slow clients are closed on their own timeouts, and well-behaved callers are served throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import socket
import struct
import time

import grpc
import hpack
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from helpers import make_tiny_repository
from serving import ECHO, MAX_BATCH, Echo, TextSource, as_bytes, build_repository, queue_depth, serving, text_array
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from muxserve.bench.run import parse_counts
from muxserve.serving.codecs import BytesTensorWalk, decode_bytes_tensor
from muxserve.serving.connection_rate import MAX_ADDRESSES, ConnectionRate, Verdict, client_key
from muxserve.serving.errors import BadRequest
from muxserve.serving.grpc.http2 import DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PREFACE, RESETS_PER_STREAM, RST_STREAM, SETTINGS, frame
from muxserve.serving.grpc.tarpit import FREE_MALFORMED, PENALTY_S, MalformedPenalty
from muxserve.serving.settings import Settings
from muxserve.serving.syn_filter import attach, listening_sockets, save_syns, saved_syn_source, syn_filter_program

pytestmark = pytest.mark.slow

ADMIT, REFUSE, RESET = Verdict.ADMIT, Verdict.REFUSE, Verdict.RESET

HOLD = "tiny-hold"  # echo, batches run 1 s after their first text: requests stay in flight
STEP = "tiny-step"  # echo, 200 ms batching delay
TEXTS = TextSource(seed=20)
LIMITS = {
    "--max-texts-in-flight": 48, "--max-tensor-elements": 1000, "--max-client-batch-size": 40, "--max-stream-inflight": 4,
    "--max-concurrent-rpcs": 6, "--header-timeout-s": 1, "--body-timeout-s": 1, "--write-timeout-s": 1,
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = build_repository(tmp_path_factory.mktemp("limits-repo"))
    make_tiny_repository(root, {HOLD: 2}, engine="echo", max_batch_size=MAX_BATCH, batch_texts=4096, max_queue_delay_us=1_000_000)
    make_tiny_repository(root, {STEP: 2}, engine="echo", max_batch_size=MAX_BATCH, batch_texts=4096, max_queue_delay_us=200_000)
    return root


@pytest.fixture(scope="module")
def server(repository):
    args = [str(x) for kv in LIMITS.items() for x in kv] + ["--max-batch-tokens", "0"]  # fixed batches: HOLD holds all it gets
    with serving(repository, repository.parent / "limits-server.log", *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def echo(repository):
    return Echo(repository)


@pytest.fixture
def base(server) -> str:
    return f"http://{server.http_url}"


def infer_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts), 1], "data": texts}]}


def binary_body(shape: list[int], items: list[bytes] | bytes) -> tuple[bytes, dict[str, str]]:
    raw = items if isinstance(items, bytes) else b"".join(struct.pack("<I", len(x)) + x for x in items)
    header = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def text_input(texts: list[str], module=grpcclient):
    tensor = module.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(text_array(texts))
    return tensor


def counts(base: str, model: str) -> dict:
    return parse_counts(httpx.get(f"{base}/metrics").text, model)


def served_well(base: str, echo: Echo) -> None:
    """A well-behaved caller gets its own answer."""
    texts = TEXTS(3)
    reply = httpx.post(f"{base}/v2/models/{ECHO}/infer", json=infer_body(texts), timeout=60)
    assert reply.status_code == 200, reply.text
    rows = np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
    np.testing.assert_array_equal(rows, echo.rows(texts))


def wait_for_queue(base: str, model: str, texts: int) -> None:
    """Until ``texts`` texts of ``model`` wait in its queue (the condition, not a sleep)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if queue_depth(httpx.get(f"{base}/metrics").text, model) >= texts:
            return
    raise AssertionError(f"{texts} texts never queued for {model}")


# ---------------------------------------------------------------------------- bad inputs


ONE_BYTE_TEXTS = b"\x01\x00\x00\x00x" * 2_000_000  # 2,000,000 one-byte texts in 10 MB


@pytest.mark.parametrize(
    ("shape", "status", "message"),
    [([1, 1], 400, "more elements than the 1"), ([2_000_000, 1], 413, "max_tensor_elements"), ([MAX_BATCH + 1, 1], 400, "max_batch_size")],
    ids=["small-shape-huge-buffer", "huge-shape", "over-max-batch"],
)
def test_huge_element_counts_are_refused_and_counted(base, echo, shape, status, message):
    before = counts(base, ECHO)
    body, headers = binary_body(shape, ONE_BYTE_TEXTS)
    reply = httpx.post(f"{base}/v2/models/{ECHO}/infer", content=body, headers=headers, timeout=60)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]
    after = counts(base, ECHO)
    assert after["failure:bad_request"] - before["failure:bad_request"] == 1
    served_well(base, echo)


def _binary_head(model: str, body: bytes, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()


PAST_ITS_SIZE = struct.pack("<I", 20_000_000) + bytes(len(ONE_BYTE_TEXTS) - 4)  # one prefix that points past binary_data_size


@pytest.mark.parametrize(
    ("shape", "tail", "status", "message"),
    [
        ([1, 1], ONE_BYTE_TEXTS, b"400", "more elements than the 1 its shape declares"),
        ([1, 1], PAST_ITS_SIZE, b"400", "element runs past the end of the buffer"),
        ([MAX_BATCH + 1, 1], ONE_BYTE_TEXTS, b"400", "max_batch_size"),
        ([2_000_000, 1], ONE_BYTE_TEXTS, b"413", "max_tensor_elements"),
    ],
    ids=["more-elements", "prefix-past-its-size", "over-max-batch", "huge-shape"],
)
def test_a_binary_request_is_refused_from_the_start_of_its_body(server, base, echo, shape, tail, status, message):
    """A 10 MB binary request whose client sends its head, JSON header and first 4 KB of the
    binary tail and then nothing: the answer it would get once read comes from what arrived
    (not the 408 of the 1-s body timeout), the connection is closed (the rest of the body,
    sent then, is refused by the server's kernel), and the refusal is counted as the model's
    bad request."""
    before = counts(base, ECHO)
    body, headers = binary_body(shape, tail)
    sent = int(headers["Inference-Header-Content-Length"]) + 4096
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(_binary_head(ECHO, body, headers) + body[:sent])
        reply = _read_all(sock)  # until the server closes the connection
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            sock.sendall(body[sent:])  # more than the socket buffers hold: the reset comes first
    assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply[:300]
    assert message.encode() in reply
    assert b"\r\nconnection: close\r\n" in reply.lower()
    assert counts(base, ECHO)["failure:bad_request"] - before["failure:bad_request"] == 1
    served_well(base, echo)


def test_a_large_binary_request_sent_in_pieces_is_served(server, echo):
    """A binary request of 10 MB (one long text, cut to max_text_chars by the server, among
    short ones) arrives in many pieces: its length prefixes are followed as they arrive, and
    it is read in full and served."""
    texts = ["a long text " * 850_000, *TEXTS(2)]
    body, headers = binary_body([3, 1], [t.encode() for t in texts])
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(_binary_head(ECHO, body, {**headers, "Connection": "close"}) + body)
        reply = _read_all(sock)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), reply[:300]
    rows = np.array(json.loads(payload)["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
    np.testing.assert_array_equal(rows, echo.rows(texts))


def test_bytes_tensor_walk_refuses_what_decoding_refuses():
    """Fed in pieces of any size, the walk refuses a BYTES tensor with the message
    ``decode_bytes_tensor`` gives it, and passes every tensor that decodes."""
    rng = random.Random(20)
    for _ in range(5000):
        items = [bytes(rng.randint(0, 3)) for _ in range(rng.randint(0, 5))]
        buffer = b"".join(struct.pack("<I", len(x)) + x for x in items)
        buffer = buffer[: rng.randint(0, len(buffer))] + bytes(rng.choice([0, 0, rng.randint(1, 6)]))
        count = rng.randint(0, 6)
        try:
            decode_bytes_tensor(buffer, count)
            expected = None
        except BadRequest as exc:
            expected = exc.message
        at = 0
        try:
            walk = BytesTensorWalk(len(buffer), count)
            while not walk.done:
                assert at < len(buffer), "every byte fed and still undecided"
                step = rng.randint(1, 7)
                walk.feed(memoryview(buffer)[at : at + step])
                at += step
            assert expected is None, (buffer, count)
        except BadRequest as exc:
            assert exc.message == expected, (buffer, count)


def test_huge_element_counts_over_grpc(server, client):
    with grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=service_pb2.ModelInferRequest.SerializeToString, response_deserializer=service_pb2.ModelInferResponse.FromString)
        raw = service_pb2.ModelInferRequest(model_name=ECHO, raw_input_contents=[ONE_BYTE_TEXTS])
        raw.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        typed = service_pb2.ModelInferRequest(model_name=ECHO)
        typed.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.extend([b"x"] * 200_000)
        huge = service_pb2.ModelInferRequest(model_name=ECHO)
        huge.inputs.add(name="TEXT", datatype="BYTES", shape=[2_000_000, 1]).contents.bytes_contents.append(b"x")
        for request, message in [(raw, "more elements than the 1"), (typed, "more than the 1"), (huge, "max_tensor_elements")]:
            with pytest.raises(grpc.RpcError) as info:
                infer(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
    assert client.infer(ECHO, [text_input(["fine"])]).as_numpy("LOGITS").shape == (1, 3)


def test_malformed_json_counts_as_a_failure_of_its_model(base, client):
    before, stats_before = counts(base, "tiny-bert"), client.get_inference_statistics("tiny-bert", as_json=True)
    reply = httpx.post(f"{base}/v2/models/tiny-bert/infer", content=b'{"inputs": [{"name": "TEXT",')
    assert reply.status_code == 400 and "malformed JSON" in reply.json()["error"]
    after, stats_after = counts(base, "tiny-bert"), client.get_inference_statistics("tiny-bert", as_json=True)
    assert after["failure:bad_request"] - before["failure:bad_request"] == 1
    fail = [int(m["inference_stats"]["fail"].get("count", 0)) for m in (stats_before["model_stats"][0], stats_after["model_stats"][0])]
    assert fail[1] - fail[0] == 1


@pytest.mark.parametrize("texts", [[""], ["fine", "   "]], ids=["empty", "blank"])
def test_empty_texts_are_refused(base, client, texts):
    where = len(texts) - 1
    reply = httpx.post(f"{base}/v2/models/tiny-bert/infer", json=infer_body(texts))
    assert reply.status_code == 400 and f"element {where} is empty" in reply.json()["error"]
    body, headers = binary_body([len(texts), 1], [t.encode() for t in texts])
    reply = httpx.post(f"{base}/v2/models/tiny-bert/infer", content=body, headers=headers)
    assert reply.status_code == 400 and f"element {where} is empty" in reply.json()["error"]
    reply = httpx.post(f"{base}/v1/classify", json={"model": "tiny-bert", "inputs": texts})
    assert reply.status_code == 400 and f"inputs[{where}] is empty" in reply.json()["error"]
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny-bert", [text_input(texts)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "is empty" in info.value.message()


def test_classify_splits_a_client_batch_into_model_batches(base, client):
    texts = TEXTS(LIMITS["--max-client-batch-size"])  # 40 texts; the model takes 16 per batch
    reply = httpx.post(f"{base}/v1/classify", json={"model": "tiny-bert", "inputs": texts}, timeout=60)
    assert reply.status_code == 200, reply.text
    rows = reply.json()
    logits = np.concatenate([client.infer("tiny-bert", [text_input(texts[i : i + MAX_BATCH])]).as_numpy("LOGITS") for i in range(0, len(texts), MAX_BATCH)])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert [r["label"] for r in rows] == [["negative", "positive"][i] for i in logits.argmax(1)]
    np.testing.assert_allclose([r["score"] for r in rows], probs.max(1), rtol=1e-4)
    reply = httpx.post(f"{base}/v1/classify", json={"model": "tiny-bert", "inputs": TEXTS(41)})
    assert reply.status_code == 413 and "max_client_batch_size" in reply.json()["error"]


def test_malformed_protobuf_is_invalid_argument(server, base, echo):
    with grpc.insecure_channel(server.grpc_url) as channel:
        unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            unary(b"\xff\xff\xff\xff not a protobuf")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed ModelInferRequest" in info.value.details()
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([b"\xff\xff\xff\xff not a protobuf"])))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in info.value.details()
    served_well(base, echo)


def test_a_malformed_protobuf_flood_is_held_back_while_others_are_served(server, base, echo):
    """A connection that keeps sending messages that are not protobuf gets its refusals late
    (the tarpit): every one is still INVALID_ARGUMENT, and a well-behaved caller is served
    while they wait."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(FREE_MALFORMED):
            with pytest.raises(grpc.RpcError) as info:
                unary(b"\xff\xff\xff\xff not a protobuf")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        held = [unary.future(b"\xff\xff\xff\xff not a protobuf") for _ in range(4)]
        served_well(base, echo)
        for call in held:
            assert call.exception().code() == grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_penalty_counts_per_peer():
    penalty = MalformedPenalty()
    assert [penalty.delay("ipv4:127.0.0.1:1") for _ in range(FREE_MALFORMED)] == [0.0] * FREE_MALFORMED
    assert penalty.delay("ipv4:127.0.0.1:1") == PENALTY_S
    assert penalty.delay("ipv4:127.0.0.1:2") == 0.0  # another connection


# ---------------------------------------------------------------------------- limits with their status


async def test_texts_in_flight_limit_answers_429_and_resource_exhausted(server, repository, base, echo):
    before = counts(base, HOLD)
    batches = [TEXTS(8) for _ in range(6)]  # 48 texts: the limit
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        held = [asyncio.create_task(http.post(f"/v2/models/{HOLD}/infer", json=infer_body(b))) for b in batches]
        await asyncio.to_thread(wait_for_queue, base, HOLD, 48)
        late = await http.post(f"/v2/models/{HOLD}/infer", json=infer_body(["one too many"]))
        assert late.status_code == 429 and late.headers["retry-after"] == "1"
        assert "texts in flight" in late.json()["error"]
        grpc_client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as info:
                await grpc_client.infer(HOLD, [text_input(["one too many"], grpcaio)])
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        finally:
            await grpc_client.close()
        for texts, reply in zip(batches, await asyncio.gather(*held), strict=True):
            assert reply.status_code == 200, reply.text
            np.testing.assert_array_equal(np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(8, -1), Echo(repository, HOLD).rows(texts))
    after = counts(base, HOLD)
    assert after["failure:overloaded"] - before["failure:overloaded"] == 2
    served_well(base, echo)


async def test_queue_wait_bound_refuses_at_once_per_model_and_recovers(repository, tmp_path):
    """With --max-queue-wait-s, a request that would wait past the bound is refused at once
    (429 + Retry-After / RESOURCE_EXHAUSTED) and counted; the accepted ones get their own rows;
    another model's requests are not held up by this one's queue; once the held texts are
    answered, the model accepts again. HOLD answers nothing for 1 s, so once its first texts
    are queued the wait it predicts is past a 1 ms bound."""
    hold = Echo(repository, HOLD)
    with serving(repository, tmp_path / "wait-bound.log", "--max-queue-wait-s", "0.001", "--max-batch-tokens", "0") as server:
        base = f"http://{server.http_url}"
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            first = TEXTS(4)
            held = asyncio.create_task(http.post(f"/v2/models/{HOLD}/infer", json=infer_body(first)))
            await asyncio.to_thread(wait_for_queue, base, HOLD, 4)
            late = await http.post(f"/v2/models/{HOLD}/infer", json=infer_body(["one too late"]))
            assert late.status_code == 429 and late.headers["retry-after"] == "1"
            assert "max_queue_wait_s" in late.json()["error"]
            grpc_client = grpcaio.InferenceServerClient(server.grpc_url)
            try:
                with pytest.raises(InferenceServerException) as info:
                    await grpc_client.infer(HOLD, [text_input(["one too late"], grpcaio)])
                assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            finally:
                await grpc_client.close()
            await asyncio.to_thread(served_well, base, Echo(repository))  # its own queue
            reply = await held
            assert reply.status_code == 200, reply.text
            np.testing.assert_array_equal(np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(4, -1), hold.rows(first))
            again = TEXTS(2)
            reply = await http.post(f"/v2/models/{HOLD}/infer", json=infer_body(again))
            assert reply.status_code == 200, reply.text
            np.testing.assert_array_equal(np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, -1), hold.rows(again))
        after = counts(base, HOLD)
    assert after["failure:overloaded"] == 2 and after["success"] == 2


async def test_concurrent_rpc_limit(server, base):
    grpc_client = grpcaio.InferenceServerClient(server.grpc_url)
    try:
        held = [asyncio.create_task(grpc_client.infer(HOLD, [text_input([t], grpcaio)])) for t in TEXTS(LIMITS["--max-concurrent-rpcs"])]
        await asyncio.to_thread(wait_for_queue, base, HOLD, len(held))
        with pytest.raises(InferenceServerException) as info:
            await grpc_client.infer(HOLD, [text_input(["one rpc too many"], grpcaio)])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        for result in await asyncio.gather(*held):
            assert result.as_numpy("LOGITS").shape == (1, 3)
    finally:
        await grpc_client.close()


def test_stream_serves_a_bounded_number_of_requests_at_once(repository, base, client):
    """20 requests sent at once on one stream: at most 4 (max_stream_inflight) are in the
    server at a time, so no forward pass holds more than 4 texts; each gets its own answer."""
    echo = Echo(repository, STEP)
    sent = {str(i): TEXTS(1) for i in range(20)}
    results: dict[str, np.ndarray] = {}
    errors = []

    def callback(result, error):
        if error is not None:
            errors.append(error)
        else:
            results[result.get_response().id] = result.as_numpy("LOGITS")

    before = httpx.get(f"{base}/metrics").text
    client.start_stream(callback=callback)
    for rid, texts in sent.items():
        client.async_stream_infer(STEP, [text_input(texts)], request_id=rid)
    client.stop_stream()  # waits for every response
    assert not errors and set(results) == set(sent)
    for rid, texts in sent.items():
        np.testing.assert_array_equal(results[rid], echo.rows(texts))
    after = httpx.get(f"{base}/metrics").text
    assert batches_over(after, STEP, 4) == batches_over(before, STEP, 4)


def batches_over(metrics_text: str, model: str, texts: int) -> float:
    """Forward passes of ``model`` with more than ``texts`` texts so far."""
    total = within = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("muxserve_batch_texts_") and f'model="{model}"' in line:
            if line.startswith("muxserve_batch_texts_count"):
                total = float(line.split()[-1])
            elif f'le="{float(texts)}"' in line:
                within = float(line.split()[-1])
    return total - within


# ---------------------------------------------------------------------------- faults


async def test_failing_forward_pass_fails_only_its_requests(server, base, echo):
    """A text with [MASK] makes the echo engine's pass raise: the requests in that pass get 500
    / INTERNAL with no internal detail, requests in other passes meanwhile get their answers."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        doomed = [asyncio.create_task(http.post(f"/v2/models/{STEP}/infer", json=infer_body(t))) for t in (["[MASK] fails"], TEXTS(2))]
        others = [TEXTS(2) for _ in range(10)]
        replies = await asyncio.gather(*(http.post(f"/v2/models/{ECHO}/infer", json=infer_body(t)) for t in others))
        for texts, reply in zip(others, replies, strict=True):
            assert reply.status_code == 200
            np.testing.assert_array_equal(np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, -1), echo.rows(texts))
        for reply in await asyncio.gather(*doomed):
            assert reply.status_code == 500
            error = reply.json()["error"]
            assert "forward pass failed" in error and "MASK" not in error and "RuntimeError" not in error
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer(STEP, [text_input(["[MASK] fails"])])
    assert info.value.status() == "StatusCode.INTERNAL" and "MASK" not in info.value.message()
    assert as_bytes(grpc_client.infer(STEP, [text_input(["fine"])]).as_numpy("LABEL")[0, 0]) == b"negative"
    grpc_client.close()
    assert "a text holds [MASK]" in server.log()  # the cause is in the log


# ---------------------------------------------------------------------------- slow clients


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slowloris_and_slow_bodies_time_out_while_others_are_served(server, base, echo):
    heads = []
    for i in range(20):
        sock = socket.create_connection(("127.0.0.1", server.http_port))
        sock.sendall(b"POST /v2/models/tiny-echo/infer HTTP/1.1\r\nHost: x\r\nContent-Le"[: 10 + i])  # and never the rest
        heads.append(sock)
    silent = socket.create_connection(("127.0.0.1", server.http_port))  # sends nothing at all
    body = socket.create_connection(("127.0.0.1", server.http_port))
    body.sendall(b"POST /v2/models/tiny-echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
    for _ in range(5):
        served_well(base, echo)
    for sock in [*heads, silent]:
        assert _read_all(sock).startswith(b"HTTP/1.1 408 ")
        sock.close()
    reply = _read_all(body)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in reply
    assert b"\r\nconnection: close\r\n" in reply.lower()  # and closed, not kept alive with half a body on it
    body.close()
    served_well(base, echo)


# ---------------------------------------------------------------------------- memory without scrapes


def test_throughput_window_stays_bounded_without_scrapes(monkeypatch):
    """100,000 requests over 100 s and no /metrics scrape: the sliding window keeps one bin per
    THROUGHPUT_BIN_S of the last THROUGHPUT_WINDOW_S, not one entry per request."""
    from muxserve.serving.observability import metrics

    monitor = metrics.ModelMonitor(metrics.Metrics(), "m", "1", 1)
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    for _ in range(100_000):
        now[0] += 0.001
        monitor.request_succeeded(1, 0.001)
    assert len(monitor._recent) <= metrics.THROUGHPUT_WINDOW_S / metrics.THROUGHPUT_BIN_S + 2
    assert monitor.throughput() == pytest.approx(1000.0, rel=0.02)


TCP_ESTABLISHED = 1


def test_a_reader_that_stops_reading_is_reset(server, base, echo):
    """Requests pipelined on one connection whose client reads nothing: once the server's send
    buffer stays full for write_timeout_s, the connection is reset (its unread responses
    dropped), with no error in the server's log; everyone else is served meanwhile."""
    tracebacks = server.log().count("Traceback")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.http_port))
    sock.setblocking(False)
    request = f"GET /v2/models/{ECHO}/config HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 100
    try:
        while True:
            sock.send(request)
    except BlockingIOError:
        pass  # the server reads no more of them until it can write
    deadline = time.monotonic() + 120
    while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED and time.monotonic() < deadline:
        served_well(base, echo)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED
    sock.close()
    served_well(base, echo)
    assert server.log().count("Traceback") == tracebacks


def test_disconnect_storm(server, base, echo):
    """100 clients send a request and reset their connection at once: the server logs no error,
    stays up, and a well-behaved caller is served throughout."""
    tracebacks = server.log().count("Traceback")
    body = json.dumps(infer_body(["gone before the answer"])).encode()
    request = f"POST /v2/models/{STEP}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    for i in range(100):
        sock = socket.create_connection(("127.0.0.1", server.http_port))
        sock.sendall(request)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        if i % 20 == 0:
            served_well(base, echo)
    served_well(base, echo)
    assert server.log().count("Traceback") == tracebacks


def _connect_from(address: str, port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), source_address=(address, 0))


def _get(sock: socket.socket, path: str) -> bytes:
    """One GET on a kept-alive connection: the response's status line."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0]


def test_new_connections_past_an_address_rate_are_refused_at_once(repository, tmp_path):
    """One address opens connections past --client-connection-burst (the rate refills nothing
    within the test): each one past it is answered 429 and closed before the server reads a
    byte of it (on the gRPC port: GOAWAY and the close), while the connections it was allowed
    stay served and another address's client is served."""
    burst = 20
    with serving(repository, tmp_path / "connection-rate.log", "--client-connection-rate", "0.0001", "--client-connection-burst", str(burst)) as server:
        kept = [_connect_from("127.0.0.2", server.http_port) for _ in range(burst)]
        assert _get(kept[0], "/v2/health/live") == b"HTTP/1.1 200 OK"
        for _ in range(3):
            refused = _connect_from("127.0.0.2", server.http_port)
            reply = _read_all(refused)  # sends nothing: the refusal comes unasked, then the close
            assert reply.startswith(b"HTTP/1.1 429 ") and b"retry-after: 1" in reply and b"keep connections alive" in reply
            refused.close()
        refused = _connect_from("127.0.0.2", server.grpc_port)  # one budget for both ports
        reply = _read_all(refused)  # SETTINGS, GOAWAY with ENHANCE_YOUR_CALM, the close
        assert reply[3] == 4 and b"keep connections alive" in reply
        refused.close()
        with grpcclient.InferenceServerClient(server.grpc_url) as client:  # from 127.0.0.1: served
            assert client.is_server_live()
        other = _connect_from("127.0.0.3", server.http_port)
        assert _get(other, "/v2/health/live") == b"HTTP/1.1 200 OK"
        for sock in kept:  # kept alive: still served
            assert _get(sock, "/v2/health/ready") == b"HTTP/1.1 200 OK"
        for sock in [*kept, other]:
            sock.close()
        assert "refused 1 new connections (latest from 127.0.0.2)" in server.log()


def test_one_clients_burst_of_connections_does_not_take_every_open_file(repository, tmp_path):
    """Started under a soft limit of 256 open files (a hard limit well above it), the server
    raises its soft limit to the hard one, so a client holding 400 idle connections (well within
    its burst) leaves the frontend files to serve another client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit on open files ({hard}) leaves nothing to raise")
    with contextlib.ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))  # the server inherits it
        try:
            server = stack.enter_context(serving(repository, tmp_path / "open-files.log"))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        held = [_connect_from("127.0.0.8", server.http_port) for _ in range(400)]
        assert _get(held[-1], "/v2/health/live") == b"HTTP/1.1 200 OK"  # the last one was taken up too
        assert httpx.get(f"http://{server.http_url}/v2/health/ready", timeout=30).status_code == 200
        for sock in held:
            sock.close()


def test_connection_rate_buckets():
    """A bucket per address: a burst, then the rate; IPv6 by /64, IPv4 seen through a
    dual-stack socket as IPv4; the addresses remembered are bounded."""
    now = [0.0]
    rate = ConnectionRate(per_second=10, burst=3, clock=lambda: now[0])
    a, b = ("10.0.0.1", 5000), ("10.0.0.2", 5000)
    assert [rate.admit(a) for _ in range(4)] == [ADMIT, ADMIT, ADMIT, REFUSE]
    assert rate.admit(b) is ADMIT
    now[0] += 0.1  # one token back
    assert [rate.admit(a), rate.admit(a)] == [ADMIT, REFUSE]
    now[0] += 10.0  # never more than the burst
    assert [rate.admit(a) for _ in range(4)] == [ADMIT, ADMIT, ADMIT, REFUSE]
    assert rate.refused == 3
    assert [rate.admit(a) for _ in range(3)] == [REFUSE] * 3  # no blocklist: 429 however far over
    assert client_key(("2001:db8::1", 1, 0, 0)) == client_key(("2001:db8::ffff:2", 2, 0, 0)) == "2001:db8::/64"
    assert client_key(("2001:db8:0:1::1", 1, 0, 0)) != client_key(("2001:db8::1", 1, 0, 0))
    assert client_key(("::ffff:10.0.0.1", 1, 0, 0)) == "10.0.0.1"
    assert client_key(None) is None and rate.admit(None) is RESET  # reset before it was made: closed, not counted
    for i in range(MAX_ADDRESSES + 10):
        rate.admit((f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1))
    assert len(rate._buckets) == MAX_ADDRESSES


class _Blocklist:
    """What ``ConnectionRate`` asks of a ``SynBlocklist``, without sockets or an event loop."""

    enabled = True

    def __init__(self) -> None:
        self.blocks: list[tuple[str, float]] = []

    def block(self, key: str, seconds: float) -> bool:
        self.blocks.append((key, seconds))
        return True

    def is_blocked(self, key: str) -> bool:
        return any(k == key for k, _ in self.blocks)


def test_an_address_far_past_its_rate_is_blocked_then_gets_the_rate_without_a_burst():
    """Just past its rate, an address gets 429s; once it has been refused more than a burst's
    worth beyond what the rate refills, it is blocked (reset, and handed to the kernel's
    filter); after the block it gets the rate, but no burst, and no 429s before the next
    block."""
    now = [0.0]
    blocklist = _Blocklist()
    rate = ConnectionRate(per_second=8, burst=3, clock=lambda: now[0], blocklist=blocklist, block_s=2.0)
    a = ("10.0.0.1", 5000)
    assert [rate.admit(a) for _ in range(7)] == [ADMIT] * 3 + [REFUSE] * 3 + [RESET]
    assert blocklist.blocks == [("10.0.0.1", 2.0)] and rate.blocked == 1
    assert rate.admit(a) is RESET  # still arriving from the accept queue: reset, nothing written
    assert rate.admit(("10.0.0.2", 1)) is ADMIT
    blocklist.blocks.clear()
    now[0] += 2.0  # the block over, nothing refilled yet: the next refusal blocks again
    assert rate.admit(a) is RESET and blocklist.blocks == [("10.0.0.1", 2.0)]
    blocklist.blocks.clear()
    now[0] += 2.0 + 0.25  # the block over, and a quarter of a second's rate since: 2 of each
    assert [rate.admit(a) for _ in range(5)] == [ADMIT, ADMIT, REFUSE, REFUSE, RESET]
    blocklist.blocks.clear()
    now[0] += 10.0  # a client back within its rate has its burst again
    assert [rate.admit(a) for _ in range(4)] == [ADMIT, ADMIT, ADMIT, REFUSE]


def _connection_from(address: str, port: int, family: int = socket.AF_INET) -> socket.socket | None:
    """A connection from ``address``, or None when the server's kernel dropped its SYN (on
    loopback the SYN-ACK comes within microseconds, or only with the first retransmission, a
    second later)."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    try:
        return socket.create_connection((host, port), timeout=0.5, source_address=(address, 0))
    except TimeoutError:
        return None


def _connects(address: str, port: int, family: int = socket.AF_INET) -> bool:
    sock = _connection_from(address, port, family)
    if sock is not None:
        sock.close()
    return sock is not None


def test_syn_filter_drops_the_blocked_addresses_only():
    """The filter on a dual-stack listener: the SYNs of blocked IPv4 addresses and IPv6 /64s
    are dropped, every other address connects, and swapping the program unblocks."""
    listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = listener.getsockname()[1]
    (found,) = listening_sockets(port)
    attach(found, syn_filter_program(["127.0.0.2", "::/64"]))
    assert [_connects("127.0.0.2", port), _connects("127.0.0.3", port), _connects("::1", port, socket.AF_INET6)] == [False, True, False]
    attach(listener, syn_filter_program(["2001:db8::/64"]))
    assert [_connects("127.0.0.2", port), _connects("::1", port, socket.AF_INET6)] == [True, True]
    found.close()
    listener.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_connection_reset_before_it_is_taken_up_is_counted_by_its_syn():
    """A connection its client reset before the server took it up has no peer name any more;
    the SYN the listener kept still gives its address (IPv4, and IPv6 on a dual-stack socket)."""
    listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    save_syns(listener)
    port = listener.getsockname()[1]
    for host, source in (("127.0.0.1", "127.0.0.9"), ("::1", "::1")):
        client = socket.create_connection((host, port), source_address=(source, 0))
        _reset(client)
        accepted = listener.accept()[0]
        with pytest.raises(OSError):
            accepted.getpeername()
        assert saved_syn_source(accepted) == (source, 0)
        accepted.close()
    listener.close()


def test_an_address_far_past_its_rate_is_dropped_by_the_kernel_on_both_ports(repository, tmp_path):
    """An address that goes on opening connections well past its 429s is blocked: its new
    connections to the HTTP and the gRPC port are dropped by the kernel (their SYNs go
    unanswered), while its open connections and every other address are served; when the
    block is over it connects again, with no burst and no 429s left: one connection past the
    rate blocks it again."""
    burst = 20  # the launcher's readiness polls come from 127.0.0.1, each on a new connection
    with serving(repository, tmp_path / "connection-block.log", "--client-connection-rate", "0.0001", "--client-connection-burst", str(burst), "--client-connection-block-s", "2") as server:
        kept = [_connect_from("127.0.0.4", server.http_port) for _ in range(burst)]
        assert _get(kept[0], "/v2/health/live") == b"HTTP/1.1 200 OK"
        for _ in range(burst):  # just past the rate: told why
            assert _read_all(_connect_from("127.0.0.4", server.http_port)).startswith(b"HTTP/1.1 429 ")
        last = _connect_from("127.0.0.4", server.http_port)  # far past it: reset, nothing written
        with pytest.raises(ConnectionResetError):
            _read_all(last)
        assert not _connects("127.0.0.4", server.http_port)
        assert not _connects("127.0.0.4", server.grpc_port)
        assert _connects("127.0.0.5", server.http_port) and _connects("127.0.0.5", server.grpc_port)
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            assert client.is_server_live()
        for sock in kept:  # its connections made before the block: still served
            assert _get(sock, "/v2/health/ready") == b"HTTP/1.1 200 OK"
            sock.close()
        while True:  # until the block ends (2 s); then the rate with no burst and no 429s left: reset, blocked again
            try:
                again = _connection_from("127.0.0.4", server.http_port)
            except ConnectionResetError:
                break  # reset by the server before connect() had returned here (a busy machine)
            if again is not None:
                with pytest.raises(ConnectionResetError):
                    _read_all(again)
                break
        assert not _connects("127.0.0.4", server.http_port)
        assert "blocking new connections from 127.0.0.4 for 2 s (1 blocks since the last line)" in server.log()  # the next within 10 s: not logged
        # a storm of connections reset as soon as they are made is counted too, and blocked
        blocked = False
        for _ in range(10_000):
            try:
                sock = _connection_from("127.0.0.6", server.http_port)
            except ConnectionResetError:  # the port reused while the server's end of it still closes
                continue
            if sock is None:
                blocked = True
                break
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # the server may have refused it first
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            _reset(sock)
        assert blocked
        assert _connects("127.0.0.5", server.http_port)
        # HTTP/2 rapid reset (gRPC calls started and reset at once, past the connection's credit):
        # GOAWAY on that connection, and its address blocked on both ports, like one far past its rate
        sock = _connect_from("127.0.0.7", server.grpc_port)
        sock.sendall(_rapid_reset_calls(server.grpc_url, RESETS_PER_STREAM * Settings().max_concurrent_streams))  # the last one is past the credit
        reply = _read_all(sock)
        assert bytes((GOAWAY, 0, 0, 0, 0, 0)) in reply and b"reset as soon as they were started" in reply
        sock.close()
        assert not _connects("127.0.0.7", server.grpc_port) and not _connects("127.0.0.7", server.http_port)
        assert _connects("127.0.0.5", server.grpc_port)
        # (its log line falls within 10 s of the block above: counted into the next one, not written)


def _rapid_reset_calls(authority: str, calls: int) -> bytes:
    """The HTTP/2 preface, then ``calls`` ModelInfer calls, each reset as soon as it is sent."""
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"), (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")])
    calls_bytes = b"".join(frame(HEADERS, END_HEADERS, s, block) + frame(DATA, END_STREAM, s, bytes(5)) + frame(RST_STREAM, 0, s, (8).to_bytes(4, "big")) for s in range(1, 2 * calls, 2))
    return PREFACE + frame(SETTINGS, 0, 0) + calls_bytes


# ---------------------------------------------------------------------------- SIGTERM under load


async def test_sigterm_under_load_loses_no_accepted_request(repository, tmp_path):
    """32 callers (half HTTP, half gRPC) send without pause while the server gets SIGTERM.
    Every request gets its own answer or is refused: 503 / UNAVAILABLE, or its connection is
    refused or closed before the server read it. None fails after being accepted, none gets
    another's answer, and requests in flight at SIGTERM are answered."""
    echo = Echo(repository, STEP)
    outcomes: dict[str, int] = {"ok": 0, "ok_across_sigterm": 0, "refused": 0, "closed": 0}
    lost: list[str] = []
    sigterm = asyncio.Event()
    enough = asyncio.Event()
    source = TextSource(seed=99)

    with serving(repository, tmp_path / "sigterm-load.log") as server:
        base = f"http://{server.http_url}"

        def answered(texts: list[str], rows: np.ndarray, sent_before_sigterm: bool) -> None:
            if not np.array_equal(rows, echo.rows(texts)):
                lost.append(f"wrong rows for {texts}")
                return
            outcomes["ok"] += 1
            outcomes["ok_across_sigterm"] += sent_before_sigterm and sigterm.is_set()
            if outcomes["ok"] >= 100:
                enough.set()

        async def http_caller(seed: int) -> None:
            rng = np.random.default_rng(seed)
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                while True:
                    texts, before = source(int(rng.integers(1, 5))), not sigterm.is_set()
                    try:
                        reply = await http.post(f"/v2/models/{STEP}/infer", json=infer_body(texts))
                    except (httpx.ConnectError, httpx.RemoteProtocolError):
                        outcomes["closed"] += 1
                        return
                    except httpx.HTTPError as exc:
                        lost.append(f"HTTP {type(exc).__name__}")
                        return
                    if reply.status_code == 503:
                        outcomes["refused"] += 1
                        return
                    if reply.status_code != 200:
                        lost.append(f"HTTP {reply.status_code}: {reply.text}")
                        return
                    answered(texts, np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(texts), -1), before)

        async def grpc_caller(seed: int) -> None:
            rng = np.random.default_rng(seed)
            client = grpcaio.InferenceServerClient(server.grpc_url)
            try:
                while True:
                    texts, before = source(int(rng.integers(1, 5))), not sigterm.is_set()
                    try:
                        result = await client.infer(STEP, [text_input(texts, grpcaio)])
                    except InferenceServerException as exc:
                        if exc.status() == "StatusCode.UNAVAILABLE":
                            outcomes["refused"] += 1
                        else:
                            lost.append(f"gRPC {exc.status()}: {exc.message()}")
                        return
                    answered(texts, result.as_numpy("LOGITS"), before)
            finally:
                await client.close()

        callers = [asyncio.create_task(http_caller(i)) for i in range(16)] + [asyncio.create_task(grpc_caller(100 + i)) for i in range(16)]
        await asyncio.wait_for(enough.wait(), 120)
        await asyncio.to_thread(wait_for_queue, base, STEP, 1)  # requests are in flight now
        sigterm.set()
        server.proc.terminate()
        await asyncio.wait_for(asyncio.gather(*callers), 120)
    assert lost == []
    assert outcomes["ok_across_sigterm"] > 0, outcomes  # in flight at SIGTERM, and answered
    assert outcomes["refused"] + outcomes["closed"] == 32, outcomes  # every caller was stopped, none by a failure
