"""HTTP adapter: KServe v2 as Triton speaks it, ``/v1/classify``, ``/metrics``.

A thin layer: decode the wire format into ``muxserve.serving.types``, call the data plane, encode the
answer. The inference routes are a bare ASGI app in front (``routes.InferenceRoutes``, the wire
format in ``wire``); health, metadata, statistics, repository control, metrics and the OpenAPI
document are FastAPI's.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from muxserve.serving.dataplane import DataPlane
from muxserve.serving.errors import BadRequest, PayloadTooLarge, ServingError, Unauthenticated
from muxserve.serving.http.routes import CLASSIFY_PATH, InferenceRoutes
from muxserve.serving.http.wire import ClassifyRequest, ClassifyResult, receive_body
from muxserve.serving.observability.stats import statistics_json
from muxserve.serving.security import AccessPolicy

log = logging.getLogger("muxserve")


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(status: int, message: str, retry_after: int | None = None) -> ORJSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return ORJSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused with 413 past ``limit`` (before and after decompression) and
    with 408 if it takes longer than ``timeout`` seconds to arrive."""
    headers = request.headers
    return await receive_body(request.receive, headers.get("content-length"), headers.get("content-encoding", ""), limit, timeout)


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


def inference_docs() -> list[APIRoute]:
    """The inference routes as the OpenAPI document shows them (``InferenceRoutes`` serves them)."""

    async def classify(body: ClassifyRequest) -> list[ClassifyResult]:
        """`{"model": "sst2-mux5", "inputs": ["text", ...]}` -> one `{label, score, num_instances}`
        per input (`score`: the label's softmax probability; `num_instances`: the N that served
        it). The body is read as JSON whatever its Content-Type, so a bare `curl -d` works."""
        raise NotImplementedError

    async def infer(model: str, version: str = "") -> dict:
        """KServe v2 inference: JSON, or JSON + binary tensors (`Inference-Header-Content-Length`)."""
        raise NotImplementedError

    return [
        APIRoute(CLASSIFY_PATH, classify, methods=["POST"], tags=["simple"]),
        APIRoute("/v2/models/{model}/infer", infer, methods=["POST"], tags=["inference"]),
        APIRoute("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"], tags=["inference"]),
    ]


def create_app(plane: DataPlane) -> InferenceRoutes:
    """The HTTP server's ASGI app: ``InferenceRoutes`` in front of the FastAPI app."""
    return InferenceRoutes(create_fastapi_app(plane), plane)


def create_fastapi_app(plane: DataPlane) -> FastAPI:
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

    # -- metrics

    @app.get("/metrics", tags=["metrics"])
    async def prometheus_metrics() -> Response:
        return Response(await plane.metrics(), media_type=CONTENT_TYPE_LATEST)

    documented = inference_docs()

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=[*app.routes, *documented])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
