"""Triton's model statistics, as JSON (HTTP) and as the ModelStatisticsResponse protobuf (gRPC).

One dict builder; the protobuf is parsed from the same dict so both protocols report the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from tritonclient.grpc import service_pb2

if TYPE_CHECKING:
    from muxserve.serving.registry import ServedModel

_ZERO = {"count": 0, "ns": 0}


def model_statistics(served: ServedModel) -> dict[str, Any]:
    monitor = served.monitor
    if monitor is None:  # never loaded
        return {"name": served.name, "version": served.version, "last_inference": 0, "inference_count": 0, "execution_count": 0, "inference_stats": {}, "batch_stats": []}
    s = monitor.snapshot()
    batch_stats = [{"batch_size": size, "compute_input": _ZERO, "compute_infer": d.as_dict(), "compute_output": _ZERO} for size, d in sorted(s.batch.items())]
    return {
        "name": served.name,
        "version": served.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": s.success.as_dict(),
            "fail": s.fail.as_dict(),
            "queue": s.queue.as_dict(),
            "compute_input": s.compute_input.as_dict(),
            "compute_infer": s.compute_infer.as_dict(),
            "compute_output": s.compute_output.as_dict(),
            "cache_hit": _ZERO,
            "cache_miss": _ZERO,
        },
        "batch_stats": batch_stats,
    }


def statistics_json(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``model_statistics`` entries (as the engine process sends them) -> the HTTP document."""
    return {"model_stats": entries}


def statistics_proto(entries: list[dict[str, Any]]) -> service_pb2.ModelStatisticsResponse:
    return json_format.ParseDict(statistics_json(entries), service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)
