"""HTTP adapter (FastAPI): KServe v2 as Triton speaks it, ``/v1/classify``, ``/metrics``.

A thin layer: decode the wire format into ``muxserve.serving.types``, call the data plane, encode the
answer. Includes Triton's binary tensor data extension (``Inference-Header-Content-Length``)
and gzip/deflate bodies, which tritonclient's HTTP client uses.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from muxserve.serving.codecs import decode_raw, element_count, encode_raw, flatten_json_data, json_data
from muxserve.serving.dataplane import DataPlane, Declared
from muxserve.serving.errors import BadRequest, ClientClosed, PayloadTooLarge, RequestTimeout, ServingError, Unauthenticated
from muxserve.serving.observability.stats import statistics_json
from muxserve.serving.security import AccessPolicy
from muxserve.serving.types import InferRequest, InferResponse, InputTensor, RequestedOutput

HEADER_LENGTH = "Inference-Header-Content-Length"
T = TypeVar("T")
log = logging.getLogger("muxserve")


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(status: int, message: str, retry_after: int | None = None) -> ORJSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return ORJSONResponse({"error": message}, status_code=status, headers=headers)


class ClassifyRequest(BaseModel):
    model: str = Field(description="model name, e.g. sst2-mux5")
    inputs: list[str] | str = Field(description="one text or a list of texts")
    parameters: dict[str, Any] | None = Field(None, description='as KServe v2 request parameters: {"max_num_instances": 1} (a family serves at N=1), {"ensemble": true} (ensembled prediction)')


class ClassifyResult(BaseModel):
    label: str
    score: float
    num_instances: int = Field(description="the mux width N that served this text")


# ---------------------------------------------------------------------------- body codec


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused with 413 past ``limit`` (before and after decompression) and
    with 408 if it takes longer than ``timeout`` seconds to arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        body = await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request body did not arrive within {timeout:g} s") from None
    encoding = request.headers.get("content-encoding", "").lower()
    if encoding in ("gzip", "deflate"):
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
            body = d.decompress(body, limit + 1)
        except zlib.error as exc:
            raise BadRequest(f"cannot decompress {encoding} body: {exc}") from None
        if len(body) > limit:
            raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
    elif encoding not in ("", "identity"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
    return body


def parse_infer_request(model: str, version: str, body: bytes, header_length: str | None, check: Callable[[Sequence[Declared]], None] | None = None) -> tuple[InferRequest, bool]:
    """JSON (+ binary tail) -> InferRequest; also whether outputs default to binary.
    ``check`` sees every input's declaration (name, datatype, shape) before any is decoded."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"invalid {HEADER_LENGTH}: {header_length!r} for a body of {len(body)} bytes")
        json_part, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    else:
        json_part, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON in request body: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("request must have a non-empty 'inputs' list")
    declared: list[Declared] = []
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise BadRequest(f"input {i} must be an object with a 'name'")
        name, datatype, shape = raw["name"], raw.get("datatype"), raw.get("shape")
        if not isinstance(datatype, str):
            raise BadRequest(f"input '{name}' lacks a 'datatype'")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise BadRequest(f"input '{name}' needs 'shape' as a list of integers")
        declared.append((name, datatype, shape))
    if check is not None:
        check(declared)
    inputs, offset = [], 0
    for raw, (name, datatype, shape) in zip(raw_inputs, declared, strict=True):
        params = raw.get("parameters") or {}
        size = params.get("binary_data_size")
        count = element_count(shape)
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input '{name}': binary_data_size {size} does not fit the binary data ({len(binary) - offset} bytes left)")
            data = decode_raw(datatype, binary[offset : offset + size], count)
            offset += size
        elif "data" in raw:
            data = flatten_json_data(raw["data"], count)
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
        inputs.append(InputTensor(name, datatype, shape, data, params))
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for raw in doc["outputs"]:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise BadRequest("each requested output must be an object with a 'name'")
            outputs.append(RequestedOutput(raw["name"], raw.get("parameters") or {}))
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    request_id = doc.get("id", "")
    return InferRequest(model, inputs, version, str(request_id) if request_id is not None else "", outputs, params), bool(params.get("binary_data_output", False))


def encode_infer_response(resp: InferResponse, request: InferRequest, binary_default: bool) -> tuple[bytes, int | None]:
    """-> (body, JSON header length when there is a binary tail)."""
    binary_of = {o.name: o.parameters.get("binary_data", binary_default) for o in request.outputs or []}
    outputs, tail = [], []
    for out in resp.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if binary_of.get(out.name, binary_default):
            raw = encode_raw(out.datatype, out.data)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = json_data(out.datatype, out.data)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version, "outputs": outputs}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = resp.parameters
    header = orjson.dumps(doc)
    if not tail:
        return header, None
    return header + b"".join(tail), len(header)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``, cancelled if the client goes away first (its queued texts are then skipped,
    not computed). Call once the body has been read: the next ASGI message is the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the client left (or this handler was cancelled)
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)  # its texts leave the queue now
        raise ClientClosed("the client closed the connection before its answer")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def compress(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    accept = accept_encoding.lower()
    if "gzip" in accept:
        return gzip.compress(body, compresslevel=1), "gzip"
    if "deflate" in accept:
        return zlib.compress(body, 1), "deflate"
    return body, None


# ---------------------------------------------------------------------------- the app


class BodyLimit:
    """ASGI middleware: 413 for any body over the limit, declared or streamed (chunked)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                response = error_response(413, f"request body of {int(value)} bytes exceeds the limit of {self.limit} bytes")
                return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {self.limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


class RequireApiKey:
    """ASGI middleware: 401 for a request that needs the API key and lacks it, before any of
    its body is read (``AccessPolicy``)."""

    def __init__(self, app: Any, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                self.policy.check_http(scope["path"], authorization)
            except Unauthenticated as exc:
                response = error_response(exc.http_status, exc.message)
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def control_parameters(body: bytes) -> dict[str, Any]:
    """The ``parameters`` of a load/unload body (optional, ``{"parameters": {...}}``)."""
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
        params = doc.get("parameters", {}) or {}
        if not isinstance(params, dict):
            raise AttributeError
    except (orjson.JSONDecodeError, AttributeError):
        raise BadRequest('a load/unload body must be a JSON object like {"parameters": {}}') from None
    return params


def create_app(plane: DataPlane) -> FastAPI:
    settings = plane.settings
    max_request_bytes = settings.max_request_bytes

    async def body_of(request: Request) -> bytes:
        return await read_body(request, max_request_bytes, settings.body_timeout_s)

    app = FastAPI(title="muxserve", version=plane.server_metadata()["version"], description="KServe v2 (Triton-compatible) inference for data-multiplexed BERT classifiers", default_response_class=ORJSONResponse)

    app.add_middleware(BodyLimit, limit=max_request_bytes)
    policy = AccessPolicy(settings.api_key, settings.open_endpoints)
    if policy.enabled:  # added last: it runs first
        app.add_middleware(RequireApiKey, policy=policy)

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> ORJSONResponse:
        return error_response(exc.http_status, exc.message, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> ORJSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"invalid request: {where}: {first.get('msg', 'bad input')}".replace(": :", ":"))

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, exc: HTTPException) -> ORJSONResponse:
        # unknown routes (404) and wrong methods (405) answer in the same {"error": ...} shape
        message = f"no route {request.url.path}" if exc.status_code == 404 else f"{request.method} {request.url.path}: {exc.detail}"
        response = error_response(exc.status_code, message)
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> ORJSONResponse:
        # the cause goes to the log, not to the caller
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error (the server log has the cause)")

    # -- health and metadata

    # Health answers in the status code (Triton's clients read only that) and in a JSON body
    # (KServe's clients read {"live": ...} / {"ready": ...}, as KServe's own servers send).
    @app.get("/v2/health/live", tags=["health"])
    async def live() -> ORJSONResponse:
        is_live = plane.live()
        return ORJSONResponse({"live": is_live}, status_code=200 if is_live else 503)

    @app.get("/v2/health/ready", tags=["health"])
    async def ready() -> ORJSONResponse:
        is_ready = plane.ready()
        return ORJSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2", tags=["metadata"])
    async def server_metadata() -> dict:
        return plane.server_metadata()

    @app.get("/v2/models/stats", tags=["statistics"])
    async def all_stats() -> dict:
        return statistics_json(await plane.statistics())

    @app.get("/v2/models/{model}", tags=["metadata"])
    @app.get("/v2/models/{model}/versions/{version}", tags=["metadata"])
    async def model_metadata(model: str, version: str = "") -> dict:
        return plane.model_metadata(model, version)

    @app.get("/v2/models/{model}/ready", tags=["health"])
    @app.get("/v2/models/{model}/versions/{version}/ready", tags=["health"])
    async def model_ready(model: str, version: str = "") -> ORJSONResponse:
        is_ready = plane.model_ready(model, version)
        return ORJSONResponse({"name": model, "ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2/models/{model}/config", tags=["metadata"])
    @app.get("/v2/models/{model}/versions/{version}/config", tags=["metadata"])
    async def model_config(model: str, version: str = "") -> dict:
        return json_format.MessageToDict(plane.model_config(model, version), preserving_proto_field_name=True)

    @app.get("/v2/models/{model}/stats", tags=["statistics"])
    @app.get("/v2/models/{model}/versions/{version}/stats", tags=["statistics"])
    async def model_stats(model: str, version: str = "") -> dict:
        return statistics_json(await plane.statistics(model, version))

    @app.post("/v2/repository/index", tags=["repository"])
    async def repository_index(request: Request) -> list:
        body = await body_of(request)
        ready_only = False
        if body.strip():
            try:
                ready_only = bool(orjson.loads(body).get("ready", False))
            except (orjson.JSONDecodeError, AttributeError):
                raise BadRequest("repository index body must be a JSON object like {\"ready\": true}") from None
        return plane.repository_index(ready_only)

    @app.post("/v2/repository/models/{model}/load", tags=["repository"])
    async def repository_load(model: str, request: Request) -> Response:
        await plane.load_model(model, control_parameters(await body_of(request)))
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload", tags=["repository"])
    async def repository_unload(model: str, request: Request) -> Response:
        await plane.unload_model(model, control_parameters(await body_of(request)))
        return Response(status_code=200)

    # -- inference

    @app.post("/v2/models/{model}/infer", tags=["inference"])
    @app.post("/v2/models/{model}/versions/{version}/infer", tags=["inference"])
    async def infer(model: str, request: Request, version: str = "") -> Response:
        served = plane.registry.find(model, version)  # 404 before reading a body for nothing
        async with plane.counting_failures(served):
            body = await body_of(request)
            check = functools.partial(plane.check_inputs, served)
            infer_request, binary_default = parse_infer_request(model, version, body, request.headers.get(HEADER_LENGTH), check)
        response = await unless_disconnected(request, plane.infer(infer_request))
        payload, header_length = encode_infer_response(response, infer_request, binary_default)
        headers = {}
        media_type = "application/json"
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
            media_type = "application/octet-stream"
        payload, encoding = compress(payload, request.headers.get("accept-encoding", "")) if len(payload) > 1024 else (payload, None)
        if encoding:
            headers["Content-Encoding"] = encoding
        return Response(payload, media_type=media_type, headers=headers)

    @app.post("/v1/classify", tags=["simple"], response_model=list[ClassifyResult], openapi_extra={"requestBody": {"content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}}, "required": True}})
    async def classify(request: Request) -> list[dict]:
        """`{"model": "sst2-mux5", "inputs": ["text", ...]}` -> one `{label, score}` per input
        (`score`: the label's softmax probability). The body is read as JSON whatever its
        Content-Type, so a bare `curl -d` works."""
        body = await body_of(request)
        try:
            parsed = ClassifyRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise BadRequest(f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'bad input')}") from None
        texts = [parsed.inputs] if isinstance(parsed.inputs, str) else parsed.inputs
        return await unless_disconnected(request, plane.classify(parsed.model, texts, parsed.parameters))

    # -- metrics

    @app.get("/metrics", tags=["metrics"])
    async def prometheus_metrics() -> Response:
        return Response(await plane.metrics(), media_type=CONTENT_TYPE_LATEST)

    return app
