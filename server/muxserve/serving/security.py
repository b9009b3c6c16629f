"""Access control, one policy for both protocols: the optional API key and which endpoint groups
stay open without it (docs/security.md).

A request carries the key as ``Authorization: Bearer KEY`` (an HTTP header, or the gRPC
``authorization`` metadata, which is what tritonclient's ``headers=`` sends either way). Keys
are compared in constant time, so the time to refuse says nothing about how much of a guess
was right.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable

from muxserve.serving.errors import Unauthenticated

# endpoint group -> HTTP paths; checked in this order ("/v2/models/stats" is metrics, not a model)
HTTP_GROUPS = {
    "health": re.compile(r"^/v2/health/(live|ready)$|^/v2/models/[^/]+(/versions/[^/]+)?/ready$"),
    "metrics": re.compile(r"^/metrics$|^/v2/models(/[^/]+(/versions/[^/]+)?)?/stats$"),
    "metadata": re.compile(r"^/v2$|^/v2/models/[^/]+(/versions/[^/]+)?(/config)?$|^/docs$|^/openapi\.json$"),
}
# endpoint group -> gRPC methods of inference.GRPCInferenceService
GRPC_GROUPS = {
    "health": {"ServerLive", "ServerReady", "ModelReady"},
    "metrics": {"ModelStatistics"},
    "metadata": {"ServerMetadata", "ModelMetadata", "ModelConfig"},
}
ENDPOINT_GROUPS = tuple(HTTP_GROUPS)
REFUSED = "missing or invalid API key: send 'Authorization: Bearer <key>'"


class AccessPolicy:
    """Whether a request may be served: always without an API key; with one, if it presents
    the key or asks for an endpoint of an open group."""

    def __init__(self, api_key: str, open_groups: Iterable[str]) -> None:
        open_groups = list(open_groups)
        unknown = set(open_groups) - set(ENDPOINT_GROUPS)
        if unknown:
            raise ValueError(f"unknown endpoint groups {sorted(unknown)} (known: {', '.join(ENDPOINT_GROUPS)})")
        self._key = api_key.encode()
        self.open_groups = frozenset(open_groups)

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def presents_key(self, authorization: str | bytes | None) -> bool:
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", errors="replace")
        scheme, _, token = (authorization or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    def http_open(self, path: str) -> bool:
        return any(HTTP_GROUPS[g].match(path) for g in self.open_groups)

    def grpc_open(self, method: str) -> bool:
        name = method.rsplit("/", 1)[-1]
        return any(name in GRPC_GROUPS[g] for g in self.open_groups)

    def check_http(self, path: str, authorization: str | bytes | None) -> None:
        if self.enabled and not self.http_open(path) and not self.presents_key(authorization):
            raise Unauthenticated(REFUSED)

    def check_grpc(self, method: str, authorization: str | bytes | None) -> None:
        if self.enabled and not self.grpc_open(method) and not self.presents_key(authorization):
            raise Unauthenticated(REFUSED)
