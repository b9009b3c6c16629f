"""Refusing an inference request from its head alone, before the web framework sees it.

Under overload most requests are refused, so what a refusal costs decides whether the
frontend keeps up with its arrivals: a refusal that goes through the whole application (routing,
middleware, reading and parsing the body) costs nearly what a served request does, and a
frontend at twice its capacity then falls behind on reading requests at all, so refusals stop
being immediate. ``HeadAdmission`` looks at a KServe v2 infer request's method and path when
its head has arrived: if the model's admission (``muxserve.serving.admission``) would refuse
even one text now, the request is answered 429 + ``Retry-After`` at once (and counted as the
model's ``overloaded`` failure), its body never read.

The same goes for clients that send a request and reset the connection at once (a disconnect
storm): the request is counted as cancelled and never reaches the application.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from muxserve.serving.dataplane import DataPlane
from muxserve.serving.engine_client import ModelView as ServedModel
from muxserve.serving.errors import ClientClosed, Overloaded, ServingError
from muxserve.serving.http.routes import infer_route
from muxserve.serving.http.wire import error_answer
from muxserve.serving.security import AccessPolicy

AsgiApp = Callable[[dict, Any, Any], Awaitable[None]]


def refusing_app(error: ServingError) -> AsgiApp:
    """An ASGI app answering ``error`` as the HTTP adapter would."""
    status, body, headers = error_answer(error)
    headers.append((b"content-length", b"%d" % len(body)))

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class HeadAdmission:
    """What the HTTP protocol decides about an inference request from its head alone:
    ``refusal(scope)`` (an app answering the refusal, or None to serve it) and ``gone(scope)``
    (the client left before its request was started: count it, nothing else)."""

    def __init__(self, plane: DataPlane, policy: AccessPolicy) -> None:
        self.plane = plane
        self.policy = policy

    def _model(self, scope: dict) -> ServedModel | None:
        """The ready model of an infer request that may be served (with an API key, one that
        presents it: nothing else is said to a caller who does not)."""
        route = infer_route(scope["path"]) if scope["method"] == "POST" else None
        if route is None:
            return None
        if self.policy.enabled and not self.policy.presents_key(next((v for k, v in scope["headers"] if k == b"authorization"), None)):
            return None
        try:
            return self.plane.registry.get_ready(*route)
        except ServingError:  # unknown, not ready: the application answers that
            return None

    def refusal(self, scope: dict) -> AsgiApp | None:
        if not self.plane.admission.max_queue_wait_s:
            return None
        served = self._model(scope)
        if served is None:
            return None
        try:
            self.plane.admission.check(served.name, 1)
        except Overloaded as exc:
            self.plane.engine.count_failure(served, exc.reason, 0.0)
            return refusing_app(exc)
        return None

    def gone(self, scope: dict) -> None:
        served = self._model(scope)
        if served is not None:
            self.plane.engine.count_failure(served, ClientClosed.reason, 0.0)
