"""The real `muxserve serve` process over gRPC, driven by stock tritonclient (sync, streaming,
asyncio): metadata, config, infer, statistics, classification, streams, exact routing of 500
concurrent requests over HTTP and gRPC together, bad input with the right status codes."""

from __future__ import annotations

import asyncio
import queue
import random
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from serving import ALL_MODELS, ECHO, MAX_BATCH, WAIT, Echo, TextSource, check_classification, check_outputs, inference_count, module_fixtures, queue_depth, text_array
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow

TEXTS = TextSource(seed=2)


repository, server = module_fixtures("grpc")


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def echo(repository):
    return Echo(repository)


def text_input(texts: list[str], module: Any = grpcclient) -> Any:
    tensor = module.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(text_array(texts))
    return tensor


def stats(client: grpcclient.InferenceServerClient, model: str) -> dict:
    return client.get_inference_statistics(model, as_json=True)


def good_request_works(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("tiny-mux2", [text_input(["still serving"])])
    check_outputs("tiny-mux2", result.as_numpy("LOGITS"), result.as_numpy("LABEL"), 1)


# ---------------------------------------------------------------------------- health, metadata, config


def test_server_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "muxserve" and meta.version
    assert {"classification", "statistics", "model_configuration"} <= set(meta.extensions)


@pytest.mark.parametrize("model", ALL_MODELS)
def test_model_metadata_config_ready(client, model):
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model, as_json=True)
    assert meta["name"] == model and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1", "1"]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [("LOGITS", "FP32", ["-1", "2"]), ("LABEL", "BYTES", ["-1", "1"])]
    config = client.get_model_config(model).config
    assert isinstance(config, mc.ModelConfig)
    assert config.name == model and config.max_batch_size == MAX_BATCH
    assert [i.name for i in config.input] == ["TEXT"] and config.input[0].data_type == mc.TYPE_STRING
    assert [o.name for o in config.output] == ["LOGITS", "LABEL"]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert client.get_model_config(model, "1").config == config


def test_unknown_model(client):
    assert not client.is_model_ready("no-such-model")
    for call in (lambda: client.get_model_metadata("no-such-model"), lambda: client.get_model_config("no-such-model"), lambda: client.get_model_metadata("tiny-bert", "7"), lambda: client.get_inference_statistics("no-such-model")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.NOT_FOUND" and "unknown" in info.value.message()


def test_repository_index(client):
    index = client.get_model_repository_index(as_json=True)["models"]
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == sorted((m, "1", "READY") for m in [*ALL_MODELS, WAIT])


# ---------------------------------------------------------------------------- inference


@pytest.mark.parametrize("model", ALL_MODELS)
def test_infer(client, echo, model):
    texts = TEXTS(6)
    before = stats(client, model)
    result = client.infer(model, [text_input(texts)], outputs=[grpcclient.InferRequestedOutput("LOGITS"), grpcclient.InferRequestedOutput("LABEL")], request_id="r-1")
    logits, labels = result.as_numpy("LOGITS"), result.as_numpy("LABEL")
    check_outputs(model, logits, labels, 6)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r-1", model, "1")
    if model == ECHO:
        np.testing.assert_array_equal(logits, echo.rows(texts))
    every = client.infer(model, [text_input(texts)])  # no outputs named: all of them
    assert [o.name for o in every.get_response().outputs] == ["LOGITS", "LABEL"]
    if model in (ECHO, "tiny-bert"):
        np.testing.assert_allclose(every.as_numpy("LOGITS"), logits, rtol=1e-5, atol=1e-5)
    after = stats(client, model)
    assert inference_count(after, model) == inference_count(before, model) + 12
    assert int(after["model_stats"][0]["execution_count"]) >= 1


@pytest.mark.parametrize("model", ALL_MODELS)
def test_classification_extension(client, model):
    texts = TEXTS(4)
    plain = client.infer(model, [text_input(texts)], outputs=[grpcclient.InferRequestedOutput("LOGITS")]).as_numpy("LOGITS")
    classes = client.infer(model, [text_input(texts)], outputs=[grpcclient.InferRequestedOutput("LOGITS", class_count=2)]).as_numpy("LOGITS")
    assert classes.shape == (4, 2)
    if model in (ECHO, "tiny-bert"):
        check_classification(model, plain, classes, 2)


def test_compressed_messages(client, echo):
    texts = TEXTS(MAX_BATCH)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(ECHO, [text_input(texts)], compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("LOGITS"), echo.rows(texts))


def test_long_text_is_served_truncated(client):
    result = client.infer("tiny-bert", [text_input(["short", "word " * 200_000])])  # 1 MB
    params = result.get_response().parameters
    assert params["truncated_count"].int64_param == 1 and params["truncated_indices"].string_param == "1"
    assert result.as_numpy("LOGITS").shape == (2, 2)


def test_typed_contents_instead_of_raw(server, echo):
    """Stock clients send raw_input_contents; typed `contents` is valid KServe too."""
    texts = TEXTS(3)
    request = service_pb2.ModelInferRequest(model_name=ECHO)
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[3, 1])
    tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    with grpc.insecure_channel(server.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert [o.name for o in response.outputs] == ["LOGITS", "LABEL"]
    logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))
    np.testing.assert_array_equal(logits, echo.rows(texts))


# ---------------------------------------------------------------------------- streaming


def test_stream_fills_groups_together_and_survives_errors(client, repository):
    """Requests of one stream run concurrently (they share forward passes), each response comes
    back with its own id and rows, and a bad request answers an error without ending the stream."""
    echo = Echo(repository, WAIT)
    answers: queue.Queue = queue.Queue()
    sent: dict[str, list[str]] = {}
    before = stats(client, WAIT)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, n in enumerate(random.Random(7).choices(range(1, 5), k=30)):
            sent[f"s{i}"] = TEXTS(n)
            client.async_stream_infer(WAIT, [text_input(sent[f"s{i}"])], request_id=f"s{i}")
            if i == 10:
                client.async_stream_infer("no-such-model", [text_input(["x"])], request_id="bad-model")
                client.async_stream_infer(WAIT, [text_input(["t"] * (MAX_BATCH + 1))], request_id="bad-batch")
        got, errors = {}, []
        for _ in range(len(sent) + 2):
            result, error = answers.get(timeout=60)
            if error is not None:
                errors.append(error.message())
            else:
                got[result.get_response().id] = result.as_numpy("LOGITS")
    finally:
        client.stop_stream()
    assert sorted(errors) == sorted([f"unknown model: '{'no-such-model'}'", f"batch of {MAX_BATCH + 1} texts exceeds max_batch_size {MAX_BATCH} of model '{WAIT}'"])
    assert set(got) == set(sent)
    for rid, texts in sent.items():
        np.testing.assert_array_equal(got[rid], echo.rows(texts))
    after = stats(client, WAIT)
    executions = int(after["model_stats"][0]["execution_count"]) - int(before["model_stats"][0].get("execution_count", 0))
    assert inference_count(after, WAIT) - inference_count(before, WAIT) == sum(map(len, sent.values()))
    assert executions < len(sent) / 2, f"{executions} forward passes for {len(sent)} requests of one stream: not batched together"


@pytest.mark.parametrize("model", ALL_MODELS)
def test_stream_every_model(client, model):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(4):
            client.async_stream_infer(model, [text_input(TEXTS(2))], request_id=str(i), outputs=[grpcclient.InferRequestedOutput("LOGITS"), grpcclient.InferRequestedOutput("LABEL")])
        ids = set()
        for _ in range(4):
            result, error = answers.get(timeout=60)
            assert error is None, error
            check_outputs(model, result.as_numpy("LOGITS"), result.as_numpy("LABEL"), 2)
            ids.add(result.get_response().id)
        assert ids == {"0", "1", "2", "3"}
    finally:
        client.stop_stream()


async def test_asyncio_client_and_stream(server, echo):
    client = grpcaio.InferenceServerClient(server.grpc_url)
    try:
        assert await client.is_server_ready()
        for model in ALL_MODELS:
            assert await client.is_model_ready(model)
            assert (await client.get_model_config(model)).config.name == model
            result = await client.infer(model, [text_input(TEXTS(3), grpcaio)])
            check_outputs(model, result.as_numpy("LOGITS"), result.as_numpy("LABEL"), 3)
        sent = {str(i): TEXTS(1 + i % 3) for i in range(12)}

        async def requests():
            for rid, texts in sent.items():
                yield {"model_name": ECHO, "inputs": [text_input(texts, grpcaio)], "request_id": rid}

        got = {}
        async for result, error in client.stream_infer(requests()):  # ends after the client half-closes
            assert error is None, error
            got[result.get_response().id] = result.as_numpy("LOGITS")
        assert set(got) == set(sent)
        for rid, texts in sent.items():
            np.testing.assert_array_equal(got[rid], echo.rows(texts))
    finally:
        await client.close()


async def test_clients_that_go_away(server, client):
    """A caller that gives up (deadline, timeout, cancelled stream) crashes nothing: the server
    logs no traceback and serves the next request; the abandoned texts are not counted."""
    tracebacks = server.log().count("Traceback")
    before = inference_count(stats(client, WAIT), WAIT)
    grpc_client = grpcaio.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            await grpc_client.infer(WAIT, [text_input(["gone"], grpcaio)], client_timeout=0.02)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        await grpc_client.close()
    async with httpx.AsyncClient(base_url=f"http://{server.http_url}") as http:
        with pytest.raises(httpx.TimeoutException):
            await http.post(f"/v2/models/{WAIT}/infer", json={"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["gone"]}]}, timeout=0.02)
    client.start_stream(callback=lambda result, error: None)
    for i in range(5):
        client.async_stream_infer(WAIT, [text_input(["gone"] * 3)], request_id=str(i))
    client.stop_stream(cancel_requests=True)
    async with httpx.AsyncClient(base_url=f"http://{server.http_url}") as http:
        while queue_depth((await http.get("/metrics")).text, WAIT):  # every cancel has reached the queue (or the texts ran: counted below)
            await asyncio.sleep(0.01)
    good_request_works(client)
    result = client.infer(WAIT, [text_input(["still here"])])
    assert result.as_numpy("LOGITS").shape == (1, 3)
    # the abandoned calls are cancelled, gRPC and HTTP alike: their texts are skipped, not computed
    assert inference_count(stats(client, WAIT), WAIT) - before == 1
    assert server.log().count("Traceback") == tracebacks, server.log()[-3000:]


# ---------------------------------------------------------------------------- routing


async def test_routing_is_exact_under_concurrency(server, echo):
    """500 concurrent requests of 1-8 distinct texts, half over HTTP (asyncio), half over gRPC
    (asyncio): each gets back exactly the echo of its own texts, in order."""
    rng = random.Random(11)
    batches = [TEXTS(rng.randint(1, 8)) for _ in range(500)]
    http = httpaio.InferenceServerClient(server.http_url, conn_limit=100)
    grpc_client = grpcaio.InferenceServerClient(server.grpc_url)

    async def over_http(texts: list[str]) -> np.ndarray:
        return (await http.infer(ECHO, [text_input(texts, httpaio)], outputs=[httpaio.InferRequestedOutput("LOGITS")])).as_numpy("LOGITS")

    async def over_grpc(texts: list[str]) -> np.ndarray:
        return (await grpc_client.infer(ECHO, [text_input(texts, grpcaio)], outputs=[grpcaio.InferRequestedOutput("LOGITS")])).as_numpy("LOGITS")

    try:
        results = await asyncio.gather(*((over_http if i % 2 else over_grpc)(b) for i, b in enumerate(batches)))
    finally:
        await http.close()
        await grpc_client.close()
    for texts, rows in zip(batches, results, strict=True):
        np.testing.assert_array_equal(rows, echo.rows(texts))


# ---------------------------------------------------------------------------- bad input


def _infer_input(name: str, shape: list[int], datatype: str, data: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(data)
    return tensor


BAD_INFERS = {
    "missing-text": ("tiny-bert", lambda: [_infer_input("WORDS", [1, 1], "BYTES", text_array(["a"]))], None, "INVALID_ARGUMENT", "named 'TEXT'"),
    "int32-text": ("tiny-bert", lambda: [_infer_input("TEXT", [2, 1], "INT32", np.array([[1], [2]], dtype=np.int32))], None, "INVALID_ARGUMENT", "datatype BYTES"),
    "wrong-shape": ("tiny-mux2", lambda: [_infer_input("TEXT", [2, 2], "BYTES", text_array(list("abcd")).reshape(2, 2))], None, "INVALID_ARGUMENT", "shape"),
    "empty-batch": ("tiny-mux5", lambda: [_infer_input("TEXT", [0, 1], "BYTES", np.empty((0, 1), dtype=object))], None, "INVALID_ARGUMENT", "empty"),
    "non-utf8": ("tiny-bert", lambda: [_infer_input("TEXT", [2, 1], "BYTES", np.array([[b"ok"], [b"\xff\xfe"]], dtype=object))], None, "INVALID_ARGUMENT", "UTF-8"),
    "unknown-output": ("tiny-bert", lambda: [text_input(["a"])], [grpcclient.InferRequestedOutput("PROBS")], "INVALID_ARGUMENT", "unknown output"),
    "too-many-texts": ("tiny-mux2", lambda: [text_input(["t"] * (MAX_BATCH + 1))], None, "INVALID_ARGUMENT", "max_batch_size"),
    "unknown-model": ("no-such-model", lambda: [text_input(["a"])], None, "NOT_FOUND", "unknown model"),
    "over-size-limit": ("tiny-bert", lambda: [text_input(["x" * (17 << 20)])], None, "RESOURCE_EXHAUSTED", "larger than max"),
}


@pytest.mark.parametrize("case", list(BAD_INFERS))
def test_bad_infer_then_good_one(client, case):
    model, inputs, outputs, code, message = BAD_INFERS[case]
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs(), outputs=outputs)
    assert info.value.status() == f"StatusCode.{code}"
    assert message in info.value.message()
    good_request_works(client)


def test_unknown_version(client):
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny-bert", [text_input(["a"])], model_version="7")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "unknown version 7" in info.value.message()
    good_request_works(client)


def test_malformed_messages(server, client):
    with grpc.insecure_channel(server.grpc_url) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff\xff not a protobuf")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="tiny-bert", raw_input_contents=[b"", b""])
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in info.value.details()
        request = service_pb2.ModelInferRequest(model_name="tiny-bert", raw_input_contents=[b"\x09\x00\x00\x00abc"])
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed BYTES" in info.value.details()
    good_request_works(client)


def test_model_control_is_off_by_default(client):
    """Load/unload need --model-control-mode explicit (tests/test_model_control.py)."""
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as info:
            call("tiny-bert")
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION" and "model control is disabled in model control mode 'none'" in info.value.message()
    good_request_works(client)


def test_unsupported_rpcs_are_unimplemented(client):
    calls = {
        "SystemSharedMemoryStatus": client.get_system_shared_memory_status,
        "CudaSharedMemoryStatus": client.get_cuda_shared_memory_status,
        "TraceSetting": client.get_trace_settings,
        "LogSettings": client.get_log_settings,
    }
    for rpc, call in calls.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.UNIMPLEMENTED", rpc
        assert rpc in info.value.message() and "not supported" in info.value.message()
    good_request_works(client)
