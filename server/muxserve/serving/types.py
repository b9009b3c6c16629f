"""Protocol-agnostic inference request and response (KServe v2 / Open Inference Protocol).

HTTP and gRPC adapters decode into these and encode from them; the data plane sees nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | np.ndarray  # BYTES: a list of bytes; numeric: a flat array
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    model_name: str
    inputs: list[InputTensor]
    model_version: str = ""
    id: str = ""
    outputs: list[RequestedOutput] | None = None  # None: every output
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # a numeric array, or BYTES: the elements in row-major order
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestOptions:
    """A request's knobs, and what the scheduler reports back on them.

    ``ensemble``: each text runs N times, its copies scattered over slots and groups, logits
    averaged (N times the compute). ``max_num_instances``: the widest N that may serve it (a
    family's; 0: any). ``num_instances``: filled in per text, the N that served it."""

    ensemble: bool = False
    max_num_instances: int = 0
    num_instances: list[int] = field(default_factory=list)
