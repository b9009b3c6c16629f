"""The inference routes as a bare ASGI app in front of FastAPI: the request path that every
inference takes, with nothing on it but what each request needs.

``POST /v1/classify`` and ``POST /v2/models/NAME[/versions/V]/infer`` are answered here: API key,
body (limit, timeout, gzip/deflate), orjson parsing, the data plane, the answer written as two
ASGI messages. No routing table, dependency injection, pydantic models or middleware stack run
for them (the FastAPI app still describes them in its OpenAPI document); every other request
goes on to the FastAPI app.

A client that goes away cancels its request (its texts leave the engine's queue): the HTTP
server (``server.HttpConnection``) calls the request's ``ON_DISCONNECT`` hook, which cancels the
handler's task, so no watcher task runs beside each request. Under another ASGI server (no
hook in the scope) a watcher task does the same.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson

from muxserve.serving.dataplane import DataPlane, Declared
from muxserve.serving.errors import ClientClosed, ServingError, Unauthenticated
from muxserve.serving.http.wire import HEADER_LENGTH, compress, encode_infer_response, error_answer, error_body, parse_classify, parse_infer_request, receive_body
from muxserve.serving.security import AccessPolicy

log = logging.getLogger("muxserve")
T = TypeVar("T")
ASGIApp = Callable[[dict, Any, Any], Awaitable[None]]

# scope key: None when the server's protocol calls it on a disconnect, then the request's hook
ON_DISCONNECT = "muxserve.on_disconnect"
# scope key: the server protocol's respond(scope, status, headers, body), one write for a response
RESPOND = "muxserve.respond"
# scope key: True once the server has the request's whole body
BODY_ARRIVED = "muxserve.body_arrived"
ARRIVED = "muxserve.arrived"  # time.monotonic() when the protocol began reading the request
HELD = "muxserve.held"  # scope key: the body's bytes held in the receiving budget until the answer
CLASSIFY_PATH = "/v1/classify"
MODELS_PREFIX, INFER_SUFFIX = "/v2/models/", "/infer"
JSON = b"application/json"
INTERNAL_MESSAGE = "internal error (the server log has the cause)"
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()
_WANTED = frozenset((b"content-length", b"content-encoding", b"authorization", b"accept-encoding", _HEADER_LENGTH))


class MethodNotAllowed(ServingError):
    http_status = 405
    reason = "bad_request"


def infer_route(path: str) -> tuple[str, str] | None:
    """(model, version) of ``/v2/models/NAME[/versions/V]/infer``; None for any other path."""
    if not (path.startswith(MODELS_PREFIX) and path.endswith(INFER_SUFFIX)):
        return None
    parts = path[len(MODELS_PREFIX) : -len(INFER_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], ""
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


class InferenceRoutes:
    def __init__(self, app: ASGIApp, plane: DataPlane) -> None:
        self.app = app  # everything else
        self.plane = plane
        settings = plane.settings
        self.limit = settings.max_request_bytes
        self.body_timeout = settings.body_timeout_s
        self.policy = AccessPolicy(settings.api_key, settings.open_endpoints)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == CLASSIFY_PATH:
                return await self._answer(scope, receive, send, functools.partial(self._classify, scope, receive))
            route = infer_route(path)
            if route is not None:
                return await self._answer(scope, receive, send, functools.partial(self._infer, scope, receive, *route))
        await self.app(scope, receive, send)

    async def _answer(self, scope: dict, receive: Any, send: Any, handler: Callable[[dict[bytes, bytes]], Awaitable[tuple[bytes, list]]]) -> None:
        """Run ``handler(headers)`` -> (body, headers) and send its answer, or the error's."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _WANTED and name not in headers:
                headers[name] = value
        status = 200
        try:
            if self.policy.enabled:
                self.policy.check_http(scope["path"], headers.get(b"authorization"))
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['method']} {scope['path']}: Method Not Allowed")
            body, extra = await handler(headers)
        except ServingError as exc:
            status, body, extra = error_answer(exc)
            if isinstance(exc, Unauthenticated):
                extra.append((b"www-authenticate", b"Bearer"))
            elif isinstance(exc, MethodNotAllowed):
                extra.append((b"allow", b"POST"))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if scope.get(ON_DISCONNECT) is _gone and task is not None and task.uncancel() == 0:
                return  # the client went away: no one to answer
            raise
        except Exception:
            log.error("HTTP POST %s failed", scope["path"], exc_info=True)
            status, body, extra = 500, error_body(INTERNAL_MESSAGE), [(b"content-type", JSON)]
        finally:
            # the request's body is no longer held by its handler
            self.plane.receiving.give(scope.pop(HELD, 0))
        extra.append((b"content-length", b"%d" % len(body)))
        respond = scope.get(RESPOND)
        if respond is not None:
            return await respond(scope, status, extra, body)
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": body})

    async def _classify(self, scope: dict, receive: Any, headers: dict[bytes, bytes]) -> tuple[bytes, list]:
        """`{"model": "sst2-mux5", "inputs": ["text", ...]}` -> one `{label, score, num_instances}`
        per input. The body is read as JSON whatever its Content-Type, so a bare `curl -d` works."""
        body = await self._body(scope, receive, headers)
        model, texts, parameters = parse_classify(body)
        results = await self._unless_gone(scope, receive, self.plane.classify(model, texts, parameters))
        return orjson.dumps(results), [(b"content-type", JSON)]

    async def _infer(self, scope: dict, receive: Any, model: str, version: str, headers: dict[bytes, bytes]) -> tuple[bytes, list]:
        """KServe v2 inference, JSON or with binary tensors."""
        plane = self.plane
        served = plane.registry.find(model, version)  # 404 before reading a body for nothing
        async with plane.counting_failures(served):
            header_length = headers.get(_HEADER_LENGTH)
            check = functools.partial(plane.check_inputs, served)
            body = await self._body(scope, receive, headers, header_length, check)
            request, binary_default = parse_infer_request(model, version, body, header_length.decode("latin-1") if header_length is not None else None, check)
        response = await self._unless_gone(scope, receive, plane.infer(request, scope.get(ARRIVED), served))
        payload, json_length = encode_infer_response(response, request, binary_default)
        extra = [(b"content-type", JSON if json_length is None else b"application/octet-stream")]
        if json_length is not None:
            extra.append((_HEADER_LENGTH, b"%d" % json_length))
        if len(payload) > 1024:
            payload, encoding = compress(payload, headers.get(b"accept-encoding", b"").decode("latin-1"))
            if encoding:
                extra.append((b"content-encoding", encoding.encode()))
        return payload, extra

    async def _body(self, scope: dict, receive: Any, headers: dict[bytes, bytes], header_length: bytes | None = None, check: Callable[[Sequence[Declared]], None] | None = None) -> bytes:
        """The request's body; with ``header_length`` and ``check``, a binary-extension request
        that arrives in pieces is refused from its first pieces where it would be refused anyway.
        Its bytes stay in the receiving budget until the answer (``_answer``): the handler holds
        the body, and what was parsed from it, until then."""
        budget = self.plane.receiving
        body = await receive_body(receive, headers.get(b"content-length"), headers.get(b"content-encoding", b""), self.limit, self.body_timeout, scope.get(BODY_ARRIVED, False), header_length, check, budget)
        budget.take(len(body))
        scope[HELD] = len(body)
        return body

    async def _unless_gone(self, scope: dict, receive: Any, work: Awaitable[T]) -> T:
        """``work``, cancelled if the client goes away first (its queued texts are then skipped,
        not computed). Call once the body has been read: the next ASGI message is the disconnect."""
        if ON_DISCONNECT not in scope:
            return await _with_watcher(receive, work)
        task = asyncio.current_task()

        def gone() -> None:
            scope[ON_DISCONNECT] = _gone
            task.cancel()

        scope[ON_DISCONNECT] = gone
        try:
            return await work
        finally:
            if scope[ON_DISCONNECT] is gone:
                scope[ON_DISCONNECT] = None


def _gone() -> None:
    """The hook of a request whose client has gone (marks the cancellation as the client's)."""


async def _with_watcher(receive: Any, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
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


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
