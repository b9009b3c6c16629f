"""Errors of the data plane, each with the status that HTTP (and gRPC) answers with."""

from __future__ import annotations


class ServingError(Exception):
    """An error that goes back to the caller as ``{"error": message}`` with ``http_status``."""

    http_status = 500
    grpc_code = "INTERNAL"
    reason = "internal"  # label for metrics: why the request failed

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "bad_request"


class PayloadTooLarge(BadRequest):
    http_status = 413


class ModelNotFound(ServingError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "not_found"


class NotReady(ServingError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "not_ready"


class QueueFull(ServingError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "queue_full"


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
