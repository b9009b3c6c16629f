"""Errors of the data plane, each with the status that HTTP (and gRPC) answers with."""

from __future__ import annotations


class ServingError(Exception):
    """An error that goes back to the caller as ``{"error": message}`` with ``http_status``.

    ``retry_after``: seconds a client should wait before retrying (HTTP ``Retry-After``), for
    errors that say "not now" rather than "not this"."""

    http_status = 500
    grpc_code = "INTERNAL"
    reason = "internal"  # label for metrics: why the request failed
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "bad_request"


class PayloadTooLarge(BadRequest):
    http_status = 413


class RequestTimeout(BadRequest):
    """The client took longer than the server allows to send its request."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class Unauthenticated(ServingError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    reason = "unauthenticated"


class ModelNotFound(ServingError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "not_found"


class NotReady(ServingError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "not_ready"
    retry_after = 1


class QueueFull(ServingError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "queue_full"
    retry_after = 1


class Overloaded(ServingError):
    """More texts in flight than this frontend admits (``max_texts_in_flight``)."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "overloaded"
    retry_after = 1


class ClientClosed(ServingError):
    """The client went away before its answer (nginx's 499: nobody reads the response)."""

    http_status = 499
    grpc_code = "CANCELLED"
    reason = "cancelled"


class InferenceFailed(ServingError):
    http_status = 500
    grpc_code = "INTERNAL"
    reason = "internal"


class LoadFailed(ServingError):
    """A model load or reload that did not succeed (the versions serving so far keep serving)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "bad_request"


class ControlDisabled(ServingError):
    """Load/unload asked of a server not in explicit model control mode."""

    http_status = 400
    grpc_code = "FAILED_PRECONDITION"
    reason = "bad_request"
