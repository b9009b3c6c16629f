"""Tensor codecs in one place: KServe v2 datatypes, the BYTES wire format, JSON data, and the
gRPC typed tensor contents and parameters."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from muxserve.serving.errors import BadRequest

# KServe v2 datatype -> numpy dtype (BYTES is an object array of bytes)
NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}

# ModelConfig TYPE_* names -> KServe v2 datatypes
CONFIG_DATATYPES = {
    "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32", "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64", "TYPE_STRING": "BYTES", "TYPE_BF16": "BF16",
}


# KServe v2 datatype -> the InferTensorContents field that carries it over gRPC (FP16/BF16: raw only)
CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def element_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise BadRequest(f"shape {shape} has a negative dimension")
        count *= dim
    return count


def decode_bytes_tensor(buffer: bytes | memoryview, count: int | None = None) -> list[bytes]:
    """Triton's BYTES serialization: each element is a 4-byte little-endian length + its bytes.
    ``count``: the elements the shape declares; a buffer holding more is refused as soon as
    that is seen, so a small shape over a huge buffer costs nothing to refuse."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if count is not None and len(items) == count:
            raise more_elements(count)
        if offset + 4 > len(view):
            raise BadRequest(TRUNCATED_PREFIX)
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise BadRequest(PAST_THE_END)
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


TRUNCATED_PREFIX = "malformed BYTES tensor: truncated length prefix"
PAST_THE_END = "malformed BYTES tensor: element runs past the end of the buffer"


def more_elements(count: int) -> BadRequest:
    return BadRequest(f"malformed BYTES tensor: more elements than the {count} its shape declares")


class BytesTensorWalk:
    """``decode_bytes_tensor``'s refusals of a BYTES tensor of ``size`` bytes and ``count``
    elements, found from its bytes as they arrive: ``feed`` each piece in order; BadRequest as
    soon as what has arrived shows that decoding the whole tensor would refuse it, ``done`` once
    it shows that it would not. Only the length prefixes are read (no element is copied) and at
    most ``count`` + 1 of them, whatever the tensor holds."""

    def __init__(self, size: int, count: int) -> None:
        self.size, self.count = size, count
        self.arrived = 0  # bytes of the tensor fed so far
        self.next = 0  # where the next length prefix starts
        self.elements = 0  # length prefixes read
        self.prefix = b""  # the start of a length prefix split between pieces
        self.done = False
        self._decide()

    def feed(self, piece: memoryview) -> None:
        start = self.arrived
        self.arrived += len(piece)
        while not self.done:
            end = self.next + 4
            if end > self.arrived:
                self.prefix += piece[max(self.next - start, 0) :]
                return
            (length,) = struct.unpack("<I", self.prefix + piece[max(self.next - start, 0) : end - start])
            self.prefix = b""
            self.next = end + length
            self.elements += 1
            if self.next > self.size:
                raise BadRequest(PAST_THE_END)
            self._decide()

    def _decide(self) -> None:
        """What the position of the next prefix decides with no more bytes, in the order
        ``decode_bytes_tensor`` checks it."""
        if self.next == self.size:
            self.done = True
        elif self.elements == self.count:
            raise more_elements(self.count)
        elif self.next + 4 > self.size:
            raise BadRequest(TRUNCATED_PREFIX)


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    parts = []
    for item in items:
        parts.append(struct.pack("<I", len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_raw(datatype: str, buffer: bytes | memoryview, count: int | None = None) -> list[Any] | np.ndarray:
    """A binary/raw tensor buffer -> list of bytes (BYTES) or a flat numpy array (``count``:
    the declared elements, see ``decode_bytes_tensor``)."""
    if datatype == "BYTES":
        return decode_bytes_tensor(buffer, count)
    if datatype not in NUMPY_DTYPES:
        raise BadRequest(f"unsupported datatype {datatype!r}")
    dtype = np.dtype(NUMPY_DTYPES[datatype])
    if len(buffer) % dtype.itemsize:
        raise BadRequest(f"binary data of {len(buffer)} bytes is not a whole number of {datatype} elements")
    return np.frombuffer(buffer, dtype=dtype)


def encode_raw(datatype: str, data: np.ndarray | list[bytes]) -> bytes:
    """An output tensor's raw bytes (BYTES: ``data`` lists the elements in row-major order)."""
    if datatype == "BYTES":
        return encode_bytes_tensor(data)
    return np.ascontiguousarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()


def decode_contents(datatype: str, contents: Any, count: int | None = None) -> list[Any] | np.ndarray:
    """gRPC ``InferTensorContents`` -> list of bytes (BYTES) or a flat numpy array (refused
    unconverted if it holds more than the ``count`` elements its shape declares)."""
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        if datatype in NUMPY_DTYPES:
            raise BadRequest(f"datatype {datatype} has no typed contents field: send it in raw_input_contents")
        raise BadRequest(f"unsupported datatype {datatype!r}")
    values = getattr(contents, field)
    if count is not None and len(values) > count:
        raise BadRequest(f"tensor contents hold {len(values)} elements, more than the {count} its shape declares")
    if datatype == "BYTES":
        return list(values)
    return np.asarray(values, dtype=NUMPY_DTYPES[datatype])


def parameters_from_proto(params: Any) -> dict[str, Any]:
    """A gRPC ``map<string, InferParameter>`` -> plain dict (the set member of each oneof)."""
    if not params:  # most maps are empty: skip making an items view
        return {}
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, which) if which else None
    return out


def parameters_to_proto(params: dict[str, Any], target: Any) -> None:
    """Plain dict -> a gRPC ``map<string, InferParameter>`` (bool, int, float, else string)."""
    for key, value in params.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int | np.integer):
            param.int64_param = int(value)
        elif isinstance(value, float | np.floating):
            param.double_param = float(value)
        else:
            param.string_param = str(value)


def flatten_json_data(data: Any, count: int | None = None) -> list[Any]:
    """KServe JSON tensor data may be flat or nested row-major: flatten it (refused as soon as
    it holds more than the ``count`` elements its shape declares)."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if count is not None and len(flat) == count:
                raise BadRequest(f"tensor data has more elements than the {count} its shape declares")
            flat.append(item)
        else:
            stack.pop()
    return flat


def json_data(datatype: str, data: np.ndarray | list[bytes]) -> list[Any]:
    """An output tensor as a flat JSON list (BYTES as UTF-8 strings)."""
    if datatype == "BYTES":
        return [x.decode("utf-8", errors="replace") for x in data]
    return data.ravel().tolist()
