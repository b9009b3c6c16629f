"""The real `muxserve serve` process over HTTP, driven by stock tritonclient (sync, JSON and
binary data, asyncio) and by raw httpx requests: metadata, config, infer, statistics,
classification, the N=1 baseline under concurrency, bad input, /v1/classify, /docs, and the
SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from google.protobuf import json_format
from helpers import make_tiny_repository
from serving import ALL_MODELS, ECHO, MAX_BATCH, WAIT, Echo, TextSource, as_bytes, check_classification, check_outputs, inference_count, module_fixtures, queue_depth, serving, text_array
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow

TEXTS = TextSource(seed=1)


repository, server = module_fixtures("http")


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    yield c
    c.close()


@pytest.fixture
def base(server) -> str:
    return f"http://{server.http_url}"


def infer_texts(client: httpclient.InferenceServerClient, model: str, texts: list[str], binary: bool = True, **kwargs) -> httpclient.InferResult:
    tensor = httpclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(text_array(texts), binary_data=binary)
    return client.infer(model, [tensor], **kwargs)


# ---------------------------------------------------------------------------- health, metadata, config


def test_server_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "muxserve"
    assert {"classification", "binary_tensor_data", "statistics", "model_configuration"} <= set(meta["extensions"])


@pytest.mark.parametrize("model", ALL_MODELS)
def test_model_metadata_config_ready(client, model):
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model)
    assert meta["name"] == model and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
    assert meta["outputs"] == [{"name": "LOGITS", "datatype": "FP32", "shape": [-1, 2]}, {"name": "LABEL", "datatype": "BYTES", "shape": [-1, 1]}]
    config = json_format.ParseDict(client.get_model_config(model), mc.ModelConfig())
    assert config.name == model and config.max_batch_size == MAX_BATCH
    assert [i.name for i in config.input] == ["TEXT"] and config.input[0].data_type == mc.TYPE_STRING
    assert [o.name for o in config.output] == ["LOGITS", "LABEL"]
    assert config.parameters["num_instances"].string_value in {"1", "2", "5"}
    assert json_format.ParseDict(client.get_model_config(model, "1"), mc.ModelConfig()) == config


def test_unknown_model_is_not_ready(client):
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready("tiny-bert", "7")
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("no-such-model")


def test_repository_index(client, base):
    index = client.get_model_repository_index()
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == sorted((m, "1", "READY") for m in [*ALL_MODELS, WAIT])
    assert httpx.post(f"{base}/v2/repository/index", json={"ready": True}).json() == index


# ---------------------------------------------------------------------------- inference


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ALL_MODELS)
def test_infer(client, repository, model, binary):
    texts = TEXTS(5)
    before = client.get_inference_statistics(model)
    outputs = [httpclient.InferRequestedOutput("LOGITS", binary_data=binary), httpclient.InferRequestedOutput("LABEL", binary_data=binary)]
    result = infer_texts(client, model, texts, binary, outputs=outputs, request_id="req-7")
    logits, labels = result.as_numpy("LOGITS"), result.as_numpy("LABEL")
    check_outputs(model, logits, labels, 5)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == model and response["model_version"] == "1"
    if model == ECHO:
        np.testing.assert_array_equal(logits, Echo(repository).rows(texts))
    # no outputs named: every output, binary by default
    every = infer_texts(client, model, texts, binary)
    assert [o["name"] for o in every.get_response()["outputs"]] == ["LOGITS", "LABEL"]
    if model in (ECHO, "tiny-bert"):  # results of a mux model depend on the other texts of its group
        np.testing.assert_allclose(every.as_numpy("LOGITS"), logits, rtol=1e-5, atol=1e-5)
    after = client.get_inference_statistics(model)
    assert inference_count(after, model) == inference_count(before, model) + 10
    (stats,) = after["model_stats"]
    assert stats["execution_count"] >= 1 and stats["inference_stats"]["success"]["count"] >= 2


@pytest.mark.parametrize("model", ALL_MODELS)
def test_classification_extension(client, model):
    texts = TEXTS(4)
    plain = infer_texts(client, model, texts, outputs=[httpclient.InferRequestedOutput("LOGITS")]).as_numpy("LOGITS")
    for binary in (True, False):
        result = infer_texts(client, model, texts, outputs=[httpclient.InferRequestedOutput("LOGITS", binary_data=binary, class_count=2)])
        classes = result.as_numpy("LOGITS")
        assert classes.shape == (4, 2)
        if model in (ECHO, "tiny-bert"):
            check_classification(model, plain, classes, 2)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_and_response(client, base, repository, algorithm):
    texts = TEXTS(MAX_BATCH)
    outputs = [httpclient.InferRequestedOutput("LOGITS", binary_data=False), httpclient.InferRequestedOutput("LABEL", binary_data=False, class_count=3)]
    result = infer_texts(client, ECHO, texts, binary=False, outputs=outputs, request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("LOGITS"), Echo(repository).rows(texts))
    assert result.as_numpy("LABEL").shape == (MAX_BATCH, 3)
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [MAX_BATCH, 1], "data": texts}], "outputs": [{"name": "LOGITS"}, {"name": "LABEL", "parameters": {"classification": 3}}]}
    raw = httpx.post(f"{base}/v2/models/{ECHO}/infer", json=body, headers={"Accept-Encoding": algorithm})
    assert raw.status_code == 200 and raw.headers["content-encoding"] == algorithm  # the response is large enough to be compressed


async def test_asyncio_client(server):
    client = httpaio.InferenceServerClient(server.http_url)
    try:
        assert await client.is_server_ready()
        for model in ALL_MODELS:
            assert await client.is_model_ready(model)
            assert (await client.get_model_metadata(model))["name"] == model
            json_format.ParseDict(await client.get_model_config(model), mc.ModelConfig())
            tensor = httpaio.InferInput("TEXT", [3, 1], "BYTES")
            tensor.set_data_from_numpy(text_array(TEXTS(3)))
            result = await client.infer(model, [tensor])
            check_outputs(model, result.as_numpy("LOGITS"), result.as_numpy("LABEL"), 3)
            assert inference_count(await client.get_inference_statistics(model), model) >= 3
    finally:
        await client.close()


async def test_baseline_under_concurrency_equals_single_requests(server):
    """With N=1 a text's result does not depend on its batch mates: concurrent == alone."""
    texts = TEXTS(40)
    client = httpaio.InferenceServerClient(server.http_url, conn_limit=64)

    async def logits(batch: list[str]) -> np.ndarray:
        tensor = httpaio.InferInput("TEXT", [len(batch), 1], "BYTES")
        tensor.set_data_from_numpy(text_array(batch))
        return (await client.infer("tiny-bert", [tensor], outputs=[httpaio.InferRequestedOutput("LOGITS")])).as_numpy("LOGITS")

    try:
        alone = np.concatenate([await logits([t]) for t in texts])
        rng, chunks, i = random.Random(3), [], 0
        while i < len(texts):
            n = rng.randint(1, 8)
            chunks.append(texts[i : i + n])
            i += n
        together = np.concatenate(await asyncio.gather(*(logits(c) for c in chunks)))
    finally:
        await client.close()
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_long_text_is_served_truncated(client, base):
    text = "word " * 200_000  # 1 MB
    reply = httpx.post(f"{base}/v2/models/tiny-bert/infer", json={"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "data": ["short", text]}]}, timeout=60)
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["parameters"] == {"num_instances": 1, "truncated_count": 1, "truncated_indices": "1"}
    assert doc["outputs"][0]["shape"] == [2, 2]
    result = infer_texts(client, "tiny-mux2", [text])
    assert result.get_response()["parameters"]["truncated_count"] == 1
    assert result.as_numpy("LOGITS").shape == (1, 2)


# ---------------------------------------------------------------------------- bad input


def _binary_body(items: list[bytes]) -> tuple[bytes, dict[str, str]]:
    raw = b"".join(struct.pack("<I", len(x)) + x for x in items)
    header = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(items), 1], "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def _json_body(name: str = "TEXT", datatype: str = "BYTES", shape: list[int] | None = None, data: list | None = None) -> dict:
    data = ["a fine film"] if data is None else data
    return {"json": {"inputs": [{"name": name, "datatype": datatype, "shape": [len(data), 1] if shape is None else shape, "data": data}]}}


NON_UTF8_BODY, NON_UTF8_HEADERS = _binary_body([b"fine", b"\xff\xfe bad bytes"])
BAD_REQUESTS = {
    "malformed-json": ("tiny-bert", {"content": b'{"inputs": [{"name": "TEXT",'}, 400, "malformed JSON"),
    "not-an-object": ("tiny-bert", {"content": b"[1, 2]"}, 400, "JSON object"),
    "missing-text": ("tiny-bert", _json_body(name="WORDS"), 400, "TEXT"),
    "no-inputs": ("tiny-bert", {"json": {"inputs": []}}, 400, "inputs"),
    "int32-text": ("tiny-bert", _json_body(datatype="INT32", data=[1, 2]), 400, "datatype BYTES"),
    "wrong-shape": ("tiny-mux2", _json_body(shape=[2, 2], data=["a", "b", "c", "d"]), 400, "shape"),
    "shape-data-mismatch": ("tiny-mux2", _json_body(shape=[3, 1], data=["a", "b"]), 400, "3 elements"),
    "empty-batch": ("tiny-mux5", _json_body(shape=[0, 1], data=[]), 400, "empty"),
    "empty-text": ("tiny-mux5", _json_body(data=["fine", ""]), 400, "element 1 is empty"),
    "non-utf8": ("tiny-bert", {"content": NON_UTF8_BODY, "headers": NON_UTF8_HEADERS}, 400, "UTF-8"),
    "unknown-output": ("tiny-bert", {"json": {**_json_body()["json"], "outputs": [{"name": "PROBS"}]}}, 400, "unknown output"),
    "too-many-texts": ("tiny-mux2", _json_body(data=["t"] * (MAX_BATCH + 1)), 400, "max_batch_size"),
    "unknown-model": ("no-such-model", _json_body(), 404, "unknown model"),
    "unknown-version": ("tiny-bert/versions/7", _json_body(), 404, "unknown version"),
    "over-size-limit": ("tiny-bert", {"content": b"x" * (17 << 20)}, 413, "exceeds the limit"),
    "over-size-limit-chunked": ("tiny-bert", {"content": iter([b"x" * (1 << 20)] * 17)}, 413, "exceeds the limit"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_then_good_one(client, base, case):
    model, kwargs, status, message = BAD_REQUESTS[case]
    reply = httpx.post(f"{base}/v2/models/{model}/infer", timeout=60, **kwargs)
    assert reply.status_code == status, reply.text
    doc = reply.json()
    assert list(doc) == ["error"] and message in doc["error"], doc
    result = infer_texts(client, "tiny-mux2", ["still serving"])
    check_outputs("tiny-mux2", result.as_numpy("LOGITS"), result.as_numpy("LABEL"), 1)


def test_bad_request_via_tritonclient(client):
    with pytest.raises(InferenceServerException, match="max_batch_size") as info:
        infer_texts(client, "tiny-bert", TEXTS(MAX_BATCH + 1))
    assert info.value.status() == "400"
    with pytest.raises(InferenceServerException, match="UTF-8"):
        tensor = httpclient.InferInput("TEXT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b"\xc3\x28"]], dtype=object))
        client.infer("tiny-bert", [tensor])
    assert infer_texts(client, "tiny-bert", ["fine"]).as_numpy("LOGITS").shape == (1, 2)


# ---------------------------------------------------------------------------- /v1/classify, /docs


@pytest.mark.parametrize("headers", [{"Content-Type": "application/json"}, {}, {"Content-Type": "application/x-www-form-urlencoded"}], ids=["json", "no-content-type", "curl-d"])
def test_classify(client, base, headers):
    texts = TEXTS(3)
    reply = httpx.post(f"{base}/v1/classify", content=json.dumps({"model": "tiny-bert", "inputs": texts}).encode(), headers=headers)
    assert reply.status_code == 200, reply.text
    rows = reply.json()
    assert len(rows) == 3 and all(set(r) == {"label", "score", "num_instances"} and 0.5 <= r["score"] <= 1.0 and r["num_instances"] == 1 for r in rows)
    labels = infer_texts(client, "tiny-bert", texts).as_numpy("LABEL")
    assert [r["label"] for r in rows] == [as_bytes(x).decode() for x in labels[:, 0]]
    one = httpx.post(f"{base}/v1/classify", content=json.dumps({"model": "tiny-mux5", "inputs": "one text"}).encode(), headers=headers)
    assert one.status_code == 200 and len(one.json()) == 1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"model": "no-such-model", "inputs": ["a"]}', 404, "unknown model"),
        (b'{"model": "tiny-bert", "inputs": []}', 400, "non-empty"),
        (b'{"model": "tiny-bert"', 400, "invalid request"),
        (b'{"inputs": ["a"]}', 400, "model"),
        (json.dumps({"model": "tiny-bert", "inputs": ["t"] * 1025}).encode(), 413, "max_client_batch_size"),
        (b'{"model": "tiny-bert", "inputs": ["a", ""]}', 400, "inputs[1] is empty"),
    ],
)
def test_classify_errors(base, body, status, message):
    reply = httpx.post(f"{base}/v1/classify", content=body)
    assert reply.status_code == status, reply.text
    assert list(reply.json()) == ["error"] and message in reply.json()["error"]


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v3/nothing", 404), ("POST", "/v2/models/tiny-bert/nowhere", 404), ("GET", "/v1/classify", 405)])
def test_unknown_routes_answer_json_errors(base, method, path, status):
    reply = httpx.request(method, f"{base}{path}")
    assert reply.status_code == status, reply.text
    assert list(reply.json()) == ["error"] and path in reply.json()["error"]
    if status == 405:
        assert reply.headers["allow"] == "POST"


def test_docs(base):
    assert httpx.get(f"{base}/docs").status_code == 200
    spec = httpx.get(f"{base}/openapi.json").json()
    assert "/v1/classify" in spec["paths"] and "/v2/models/{model}/infer" in spec["paths"]


# ---------------------------------------------------------------------------- SIGTERM drain


def _queue_depth(base: str, model: str) -> float:
    return queue_depth(httpx.get(f"{base}/metrics").text, model)


async def test_sigterm_drains_accepted_requests(tmp_path):
    """Requests waiting in the queue when SIGTERM arrives are all answered (HTTP and gRPC);
    requests after it get 503 / UNAVAILABLE; the process exits 0."""
    model = "tiny-slow"  # a batch runs only after 3 s: every request is still queued at SIGTERM
    repository = make_tiny_repository(tmp_path / "repo", {model: 2}, engine="echo", max_batch_size=256, batch_texts=4096, max_queue_delay_us=3_000_000, max_queue_size=4096)
    echo = Echo(repository, model)
    source = TextSource(seed=5)
    with serving(repository, tmp_path / "drain.log") as server:
        base = f"http://{server.http_url}"
        batches = [source(n) for n in random.Random(5).choices(range(1, 5), k=50)]
        http = httpx.AsyncClient(base_url=base, timeout=60)
        grpc = grpcaio.InferenceServerClient(server.grpc_url)

        async def over_http(texts: list[str]) -> np.ndarray:
            reply = await http.post(f"/v2/models/{model}/infer", json={"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts), 1], "data": texts}]})
            assert reply.status_code == 200, reply.text
            return np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(texts), -1)

        async def over_grpc(texts: list[str]) -> np.ndarray:
            tensor = grpcaio.InferInput("TEXT", [len(texts), 1], "BYTES")
            tensor.set_data_from_numpy(text_array(texts))
            return (await grpc.infer(model, [tensor])).as_numpy("LOGITS")

        try:
            tasks = [asyncio.create_task((over_http if i % 2 else over_grpc)(b)) for i, b in enumerate(batches)]
            total = sum(map(len, batches))
            deadline = time.monotonic() + 10
            while await asyncio.to_thread(_queue_depth, base, model) < total and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not any(t.done() for t in tasks), "requests finished before SIGTERM: the test proves nothing"
            server.proc.terminate()
            while (await http.get("/v2/health/ready")).status_code != 503:  # the frontend has the signal
                await asyncio.sleep(0.01)
            late = await http.post(f"/v2/models/{model}/infer", json=_json_body()["json"])
            assert late.status_code == 503 and "not accepting" in late.json()["error"]
            assert (await http.get("/v2/health/ready")).status_code == 503
            with pytest.raises(InferenceServerException) as info:
                await over_grpc(["too late"])
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            results = await asyncio.gather(*tasks)
        finally:
            await http.aclose()
            await grpc.close()
        for texts, rows in zip(batches, results, strict=True):
            np.testing.assert_array_equal(rows, echo.rows(texts))
        assert server.proc.wait(30) == 0, server.log()[-3000:]
