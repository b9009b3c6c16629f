"""The HTTP wire format of the inference routes: bodies (limits, timeouts, gzip/deflate), KServe v2
JSON with Triton's binary tensor data extension (``Inference-Header-Content-Length``; a binary
request that arrives in pieces is refused from its first pieces where they decide it), the
``/v1/classify`` body, and error bodies."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from pydantic import BaseModel, Field, ValidationError

from muxserve.serving.admission import ReceivingBudget
from muxserve.serving.codecs import BytesTensorWalk, decode_raw, element_count, encode_raw, flatten_json_data, json_data
from muxserve.serving.dataplane import Declared
from muxserve.serving.errors import BadRequest, ClientClosed, PayloadTooLarge, RequestTimeout, ServingError
from muxserve.serving.types import InferRequest, InferResponse, InputTensor, RequestedOutput

HEADER_LENGTH = "Inference-Header-Content-Length"
# the largest JSON header that is read before the rest of its body (``ArrivingBinaryRequest``)
EARLY_HEADER_LIMIT = 64 * 1024


class ClassifyRequest(BaseModel):
    model: str = Field(description="model name, e.g. sst2-mux5")
    inputs: list[str] | str = Field(description="one text or a list of texts")
    parameters: dict[str, Any] | None = Field(None, description='as KServe v2 request parameters: {"max_num_instances": 1} (a family serves at N=1), {"ensemble": true} (ensembled prediction)')


class ClassifyResult(BaseModel):
    label: str
    score: float
    num_instances: int = Field(description="the mux width N that served this text")


async def receive_body(receive: Callable[[], Awaitable[dict]], content_length: str | bytes | None, content_encoding: str | bytes, limit: int, timeout: float | None = None, arrived: bool = False, header_length: bytes | None = None, check: Callable[[Sequence[Declared]], None] | None = None, budget: ReceivingBudget | None = None) -> bytes:
    """``read_body`` on a bare ASGI ``receive``, with the request's Content-Length and
    Content-Encoding headers; ClientClosed if the client goes away before its body is in.
    ``arrived``: the server says the whole body is in (nothing to wait for, no timer).
    ``header_length`` (``Inference-Header-Content-Length``) and ``check`` (as for
    ``parse_infer_request``): a binary-extension request that arrives in pieces is refused
    from its first pieces where they show it would be refused once read (``ArrivingBinaryRequest``).
    ``budget``: a body that arrives in pieces holds its bytes there until it is whole (429 when
    the frontend's bodies being received would pass it)."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"request body of {int(content_length)} bytes exceeds the limit of {limit} bytes")
    if arrived:
        message, body = await _receive_all(receive, limit)
    else:
        early = ArrivingBinaryRequest.of(header_length, content_length, content_encoding, check) if header_length is not None else None
        try:
            async with asyncio.timeout(timeout):
                message, body = await _receive_all(receive, limit, early, budget)
        except TimeoutError:
            raise RequestTimeout(f"request body did not arrive within {timeout:g} s") from None
    if message["type"] == "http.disconnect":
        raise ClientClosed("the client closed the connection before its body was in")
    if len(body) > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    if content_encoding:
        body = decompress(body, content_encoding.decode("latin-1") if isinstance(content_encoding, bytes) else content_encoding, limit)
    return body


async def _receive_all(receive: Callable[[], Awaitable[dict]], limit: int, early: ArrivingBinaryRequest | None = None, budget: ReceivingBudget | None = None) -> tuple[dict, bytes]:
    """(the last ASGI message, the body); 413 as soon as it passes ``limit``; ``early`` sees
    each piece of a body that arrives in more than one, until it has decided; ``budget`` holds
    the pieces' bytes until the body is whole."""
    message = await receive()
    body = message.get("body", b"")
    if message.get("more_body"):
        chunks, size, held = [body], len(body), 0
        try:
            if budget is not None:
                budget.take(size)
                held = size
            if early is not None and early.feed(body):
                early = None
            while message.get("more_body"):
                message = await receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                if budget is not None:
                    budget.take(len(chunk))
                    held += len(chunk)
                chunks.append(chunk)
                if early is not None and early.feed(chunk):
                    early = None
        finally:
            if budget is not None:
                budget.give(held)
        body = b"".join(chunks)
    return message, body


class ArrivingBinaryRequest:
    """A binary-extension inference request (``Inference-Header-Content-Length``) refused from
    the part of its body that has arrived, with the answer ``parse_infer_request`` would give
    once it was all read: as soon as its JSON header is in, the header is parsed and its inputs'
    declarations checked; then the length prefixes of its first input, a BYTES tensor in the
    binary tail, are walked as they arrive (``BytesTensorWalk``), so that 10 MB of one-byte
    elements under a shape of one is refused from its first bytes, not after all of them.

    Only where that answer cannot depend on what has not arrived: a body of known length
    (Content-Length), not compressed, with a header of at most ``EARLY_HEADER_LIMIT`` bytes.
    Nothing of the body is kept but the pieces of the header until it is whole."""

    def __init__(self, header_length: int, body_length: int, check: Callable[[Sequence[Declared]], None] | None) -> None:
        self.header_length, self.body_length, self.check = header_length, body_length, check
        self.arrived = 0
        self.header: list[memoryview] = []
        self.tensor: BytesTensorWalk | None = None

    @classmethod
    def of(cls, header_length: bytes, content_length: str | bytes | None, content_encoding: str | bytes, check: Callable[[Sequence[Declared]], None] | None) -> ArrivingBinaryRequest | None:
        """The watch for a request with these headers; None where its answer could depend on
        more than what arrives first."""
        if content_encoding or content_length is None or not content_length.isdigit() or not header_length.isdigit():
            return None
        length, total = int(header_length), int(content_length)
        return cls(length, total, check) if length <= min(total, EARLY_HEADER_LIMIT) else None

    def feed(self, piece: bytes) -> bool:
        """The next piece of the body: BadRequest (or the check's refusal) where the request
        is refused; True once it is known not to be refused here (nothing more to watch)."""
        start = self.arrived
        self.arrived += len(piece)
        if self.tensor is None:
            self.header.append(memoryview(piece)[: self.header_length - start])
            if self.arrived < self.header_length:
                return False
            if not self._read_header(b"".join(self.header)):
                return True
            self.header = []
        tensor = self.tensor
        low, high = max(self.header_length - start, 0), min(self.header_length + tensor.size - start, len(piece))
        if low < high:
            tensor.feed(memoryview(piece)[low:high])
        return tensor.done

    def _read_header(self, json_part: bytes) -> bool:
        """Parse and check the header; whether its first input is a BYTES tensor to walk."""
        raw_inputs, declared = _declarations(_document(json_part), self.check)
        name, datatype, shape = declared[0]
        _, count, size = _binary_layout(name, raw_inputs[0], shape, 0, self.body_length - self.header_length)
        if size is None or datatype != "BYTES":
            return False
        self.tensor = BytesTensorWalk(size, count)
        return not self.tensor.done


def decompress(body: bytes, content_encoding: str, limit: int) -> bytes:
    """A gzip or deflate body, refused with 413 if it inflates past ``limit``."""
    encoding = content_encoding.lower()
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
        json_part, binary = body, None
    doc = _document(json_part)
    inputs = _plain_text_input(doc, check) if binary is None else None
    if inputs is None:
        inputs = _inputs(doc, binary if binary is not None else memoryview(b""), check)
    outputs = None
    if doc.get("outputs") is not None:
        if type(doc["outputs"]) is not list:
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for raw in doc["outputs"]:
            if type(raw) is not dict or type(raw.get("name")) is not str:
                raise BadRequest("each requested output must be an object with a 'name'")
            params = raw.get("parameters") or {}
            if type(params) is not dict:
                raise BadRequest(f"output '{raw['name']}': 'parameters' must be an object")
            outputs.append(RequestedOutput(raw["name"], params))
    params = doc.get("parameters") or {}
    if type(params) is not dict:
        raise BadRequest("'parameters' must be an object")
    request_id = doc.get("id", "")
    return InferRequest(model, inputs, version, str(request_id) if request_id is not None else "", outputs, params), bool(params.get("binary_data_output", False))


def _document(json_part: bytes | memoryview) -> dict:
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON in request body: {exc}") from None
    if type(doc) is not dict:
        raise BadRequest("request body must be a JSON object")
    return doc


def _plain_text_input(doc: dict, check: Callable[[Sequence[Declared]], None] | None) -> list[InputTensor] | None:
    """The inputs of the common request, read without the general walk: one input of exactly
    name, datatype, shape [n] or [n, 1] and a flat list of n strings. None for any other
    request: ``_inputs`` reads it, with every check and error."""
    raw_inputs = doc.get("inputs")
    if type(raw_inputs) is not list or len(raw_inputs) != 1:
        return None
    raw = raw_inputs[0]
    if type(raw) is not dict or len(raw) != 4:
        return None
    name, datatype, shape, data = raw.get("name"), raw.get("datatype"), raw.get("shape"), raw.get("data")
    if type(name) is not str or type(datatype) is not str or type(shape) is not list or type(data) is not list:
        return None
    n = len(data)
    if not (len(shape) == 1 or (len(shape) == 2 and type(shape[1]) is int and shape[1] == 1)) or type(shape[0]) is not int or shape[0] != n:
        return None
    for text in data:
        if type(text) is not str:
            return None
    if check is not None:
        check(((name, datatype, shape),))
    return [InputTensor(name, datatype, shape, data, {})]


def _inputs(doc: dict, binary: memoryview, check: Callable[[Sequence[Declared]], None] | None) -> list[InputTensor]:
    """Every input of a request, JSON data or binary (``binary``: the tail after the JSON)."""
    raw_inputs, declared = _declarations(doc, check)
    inputs, offset = [], 0
    for raw, (name, datatype, shape) in zip(raw_inputs, declared, strict=True):
        params, count, size = _binary_layout(name, raw, shape, offset, len(binary))
        if size is not None:
            data = decode_raw(datatype, binary[offset : offset + size], count)
            offset += size
        elif "data" in raw:
            data = flatten_json_data(raw["data"], count)
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
        inputs.append(InputTensor(name, datatype, shape, data, params))
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return inputs


def _declarations(doc: dict, check: Callable[[Sequence[Declared]], None] | None) -> tuple[list[dict], list[Declared]]:
    """The request's inputs and their declarations (name, datatype, shape), which ``check``
    has passed."""
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
        if type(shape) is not list or any(type(d) is not int for d in shape):  # bool is not int here
            raise BadRequest(f"input '{name}' needs 'shape' as a list of integers")
        declared.append((name, datatype, shape))
    if check is not None:
        check(declared)
    return raw_inputs, declared


def _binary_layout(name: str, raw: dict, shape: list[int], offset: int, binary_length: int) -> tuple[dict, int, int | None]:
    """An input's parameters, its declared element count and its ``binary_data_size`` (None:
    no binary data), which must fit the ``binary_length`` bytes of binary data from ``offset``."""
    params = raw.get("parameters") or {}
    if type(params) is not dict:
        raise BadRequest(f"input '{name}': 'parameters' must be an object")
    size = params.get("binary_data_size")
    count = element_count(shape)
    if size is not None and (type(size) is not int or size < 0 or offset + size > binary_length):
        raise BadRequest(f"input '{name}': binary_data_size {size} does not fit the binary data ({binary_length - offset} bytes left)")
    return params, count, size


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


def compress(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    accept = accept_encoding.lower()
    if "gzip" in accept:
        return gzip.compress(body, compresslevel=1), "gzip"
    if "deflate" in accept:
        return zlib.compress(body, 1), "deflate"
    return body, None




def parse_classify(body: bytes) -> tuple[str, list[str], dict[str, Any]]:
    """A ``/v1/classify`` body -> (model, texts, parameters). A well-formed body is taken as
    parsed; any other gets ``ClassifyRequest``'s validation and its message (400)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if type(doc) is dict:
        model, inputs, parameters = doc.get("model"), doc.get("inputs"), doc.get("parameters")
        if type(model) is str and (parameters is None or type(parameters) is dict):
            if type(inputs) is str:
                return model, [inputs], parameters or {}
            if type(inputs) is list and all(type(t) is str for t in inputs):
                return model, inputs, parameters or {}
    try:
        parsed = ClassifyRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BadRequest(f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'bad input')}") from None
    return parsed.model, [parsed.inputs] if isinstance(parsed.inputs, str) else parsed.inputs, parsed.parameters or {}


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def error_answer(error: ServingError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """(status, body, headers) of the HTTP answer to ``error``: its status, ``{"error"}`` and
    ``Retry-After`` where the error sets one."""
    headers = [(b"content-type", b"application/json")]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(error.retry_after).encode()))
    return error.http_status, error_body(error.message), headers
