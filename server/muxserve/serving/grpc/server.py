"""gRPC adapter: ``inference.GRPCInferenceService`` as Triton speaks it, on this package's HTTP/2
transport (``http2``) or on grpc.aio.

A thin layer like the HTTP one: decode the protobuf into ``muxserve.serving.types``, call the data plane,
encode the answer. Tensors come in ``raw_input_contents`` (tritonclient's way; BYTES with 4-byte
length prefixes) or in typed ``contents``; outputs go back in ``raw_output_contents``.
``ModelStreamInfer`` runs the requests of a stream concurrently (up to ``max_stream_inflight``
of them; the stream is read no further until one is answered), so texts of one stream fill mux
groups together, and writes each response as it completes.

A message that is not valid protobuf gets ``INVALID_ARGUMENT``: requests are parsed by this
module (``_parse``), not by gRPC, which would answer ``UNKNOWN``; a connection that keeps
sending them gets its refusals late (``tarpit``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from muxserve.serving.codecs import decode_contents, decode_raw, element_count, encode_raw, parameters_from_proto, parameters_to_proto
from muxserve.serving.connection_rate import ConnectionRate
from muxserve.serving.dataplane import DataPlane, Declared
from muxserve.serving.errors import BadRequest, ModelNotFound, ServingError, Unauthenticated
from muxserve.serving.grpc.http2 import GrpcServer, Method, ssl_context
from muxserve.serving.grpc.tarpit import MalformedPenalty
from muxserve.serving.observability.stats import statistics_proto
from muxserve.serving.security import AccessPolicy
from muxserve.serving.types import InferRequest, InferResponse, InputTensor, RequestedOutput

log = logging.getLogger("muxserve")

MAX_SEND_BYTES = 64 * 1024 * 1024


def status_code(exc: ServingError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


# what callers learn of an unexpected failure; the cause goes to the log
INTERNAL_MESSAGE = "internal error (the server log has the cause)"


# ---------------------------------------------------------------------------- message codec


class Malformed:
    """Stands for a request message that is not valid protobuf (see ``_parse``)."""

    def __init__(self, kind: str, error: str) -> None:
        self.message = f"malformed {kind} message: {error or 'not valid protobuf'}"


def _parse(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(message_class.__name__, str(exc))

    return parse


def decode_infer_request(req: pb.ModelInferRequest, check: Callable[[Sequence[Declared]], None] | None = None) -> InferRequest:
    """ModelInferRequest -> InferRequest; ``check`` sees every input's declaration (name,
    datatype, shape) before any is decoded. (Each field of the message is read once: every
    read of a protobuf field makes a new Python object.)"""
    tensors, raw = req.inputs, req.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs: send every input raw or none")
    declared = [(t.name, t.datatype, list(t.shape)) for t in tensors]
    if check is not None:
        check(declared)
    inputs = []
    for i, (tensor, (name, datatype, shape)) in enumerate(zip(tensors, declared, strict=True)):
        params = parameters_from_proto(tensor.parameters)
        if params and "shared_memory_region" in params:
            raise BadRequest(f"input '{name}': shared memory is not supported")
        count = element_count(shape)
        data = decode_raw(datatype, raw[i], count) if raw else decode_contents(datatype, tensor.contents, count)
        inputs.append(InputTensor(name, datatype, shape, data, params))
    outputs = None
    requested = req.outputs
    if requested:
        outputs = []
        for out in requested:
            params = parameters_from_proto(out.parameters)
            if params and "shared_memory_region" in params:
                raise BadRequest(f"output '{out.name}': shared memory is not supported")
            outputs.append(RequestedOutput(out.name, params))
    return InferRequest(req.model_name, inputs, req.model_version, req.id, outputs, parameters_from_proto(req.parameters))


# field tags (number << 3 | length-delimited) of ModelInferResponse: id, raw_output_contents
_ID_TAG, _RAW_TAG = b"\x1a", b"\x32"


def encode_infer_response(resp: InferResponse) -> bytes:
    """The serialized ModelInferResponse. A protobuf message may arrive as parts one after
    the other (singular fields set once, repeated and map fields adding up), so the part that
    every answer of a model version with these output shapes shares is made once
    (``_response_head``), and the rest is appended to it."""
    outputs = resp.outputs
    if any(out.parameters for out in outputs):
        return _response_message(resp).SerializeToString()
    parts = [_response_head(resp.model_name, resp.model_version, tuple((out.name, out.datatype, tuple(out.shape)) for out in outputs))]
    if resp.id:
        parts.append(_length_delimited(_ID_TAG, resp.id.encode()))
    for key, value in resp.parameters.items():
        parts.append(_parameter_entry(key, value))
    for out in outputs:
        parts.append(_length_delimited(_RAW_TAG, encode_raw(out.datatype, out.data)))
    return b"".join(parts)


def _response_message(resp: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    for out in resp.outputs:
        tensor = msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        parameters_to_proto(out.parameters, tensor.parameters)
        msg.raw_output_contents.append(encode_raw(out.datatype, out.data))
    parameters_to_proto(resp.parameters, msg.parameters)
    return msg


@functools.lru_cache(maxsize=1024)
def _response_head(model_name: str, model_version: str, outputs: tuple[tuple[str, str, tuple[int, ...]], ...]) -> bytes:
    """Model name, version and output tensors (name, datatype, shape) of a response, serialized."""
    msg = pb.ModelInferResponse(model_name=model_name, model_version=model_version)
    for name, datatype, shape in outputs:
        msg.outputs.add(name=name, datatype=datatype, shape=shape)
    return msg.SerializeToString()


@functools.lru_cache(maxsize=1024, typed=True)  # typed: True and 1 are different parameters
def _parameter_entry(key: str, value: Any) -> bytes:
    """One entry of a response's ``parameters`` map, serialized."""
    msg = pb.ModelInferResponse()
    parameters_to_proto({key: value}, msg.parameters)
    return msg.SerializeToString()


def _length_delimited(tag: bytes, data: bytes) -> bytes:
    size = len(data)
    if size < 0x80:
        return tag + bytes((size,)) + data
    prefix = bytearray(tag)
    while size >= 0x80:
        prefix.append(size & 0x7F | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + data


# ---------------------------------------------------------------------------- the service


def _unary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Data-plane errors -> their gRPC status with the message as details."""

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await self.refuse_malformed(request, context)
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(status_code(exc), exc.message)
        except Exception:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    return wrapper


def _unsupported(rpc: str, what: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc}: {what} is not supported by muxserve")

    method.__name__ = rpc
    return method


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.malformed = MalformedPenalty()

    # -- health and metadata

    @_unary
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.plane.live())

    @_unary
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    @_unary
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))
        except ModelNotFound:  # as Triton: an unknown model is simply not ready
            return pb.ModelReadyResponse(ready=False)

    @_unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(self.plane.server_metadata(), pb.ServerMetadataResponse())

    @_unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return json_format.ParseDict(self.plane.model_metadata(request.name, request.version), pb.ModelMetadataResponse())

    @_unary
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.plane.model_config(request.name, request.version))

    @_unary
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        return statistics_proto(await self.plane.statistics(request.name, request.version))

    @_unary
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        self._one_repository(request.repository_name)
        return json_format.ParseDict({"models": self.plane.repository_index(request.ready)}, pb.RepositoryIndexResponse())

    @_unary
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        self._one_repository(request.repository_name)
        await self.plane.load_model(request.model_name, parameters_from_proto(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        self._one_repository(request.repository_name)
        await self.plane.unload_model(request.model_name, parameters_from_proto(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @staticmethod
    def _one_repository(name: str) -> None:
        if name:
            raise BadRequest(f"unknown repository '{name}': muxserve serves one repository (leave the name empty)")

    # -- inference

    async def refuse_malformed(self, request: Malformed, context: grpc.aio.ServicerContext) -> None:
        """INVALID_ARGUMENT, held back for a peer that keeps sending such messages (``tarpit``)."""
        delay = self.malformed.delay(context.peer())
        if delay:
            await asyncio.sleep(delay)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    async def _infer(self, req: pb.ModelInferRequest) -> InferResponse:
        served = self.plane.registry.find(req.model_name, req.model_version)  # 404 before decoding for nothing
        async with self.plane.counting_failures(served):
            request = decode_infer_request(req, functools.partial(self.plane.check_inputs, served))
        return await self.plane.infer(request, served=served)

    @_unary
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        return encode_infer_response(await self._infer(request))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest | Malformed], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently, at most ``max_stream_inflight`` of them: a request holds
        its slot until its response is taken to be written, so a client that stops reading
        stops the stream being read (memory per stream is bounded). Responses go out as they
        complete, errors in ``error_message`` (with the request's id), and the stream goes on;
        a message that is not valid protobuf ends it with INVALID_ARGUMENT."""
        slots = asyncio.Semaphore(self.plane.settings.max_stream_inflight)
        done: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()  # <= max_stream_inflight
        tasks: set[asyncio.Task] = set()

        async def one(req: pb.ModelInferRequest) -> None:
            try:
                msg = pb.ModelStreamInferResponse(infer_response=_response_message(await self._infer(req)))
            except ServingError as exc:
                msg = self._stream_error(req, exc.message)
            except Exception:
                log.exception("gRPC ModelStreamInfer request failed")
                msg = self._stream_error(req, INTERNAL_MESSAGE)
            done.put_nowait(msg)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    if isinstance(req, Malformed):
                        await asyncio.sleep(self.malformed.delay(context.peer()))
                        raise BadRequest(req.message)
                    await slots.acquire()
                    task = asyncio.create_task(one(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:  # the client closed its side: finish what it sent
                    await asyncio.wait(set(tasks))
            finally:
                done.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (msg := await done.get()) is not None:
                slots.release()
                yield msg
            await reader  # surfaces a failed read (e.g. a malformed message) as the RPC's status
        except ServingError as exc:
            await context.abort(status_code(exc), exc.message)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    @staticmethod
    def _stream_error(req: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
        response = pb.ModelInferResponse(model_name=req.model_name, model_version=req.model_version, id=req.id)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=response)

    # -- not supported

    SystemSharedMemoryStatus = _unsupported("SystemSharedMemoryStatus", "system shared memory")
    SystemSharedMemoryRegister = _unsupported("SystemSharedMemoryRegister", "system shared memory")
    SystemSharedMemoryUnregister = _unsupported("SystemSharedMemoryUnregister", "system shared memory")
    CudaSharedMemoryStatus = _unsupported("CudaSharedMemoryStatus", "CUDA shared memory")
    CudaSharedMemoryRegister = _unsupported("CudaSharedMemoryRegister", "CUDA shared memory")
    CudaSharedMemoryUnregister = _unsupported("CudaSharedMemoryUnregister", "CUDA shared memory")
    TraceSetting = _unsupported("TraceSetting", "tracing")
    LogSettings = _unsupported("LogSettings", "changing log settings at run time (use --log-level)")


def _serialized(message: bytes | Any) -> bytes:
    """ModelInfer's answer: serialized already (``encode_infer_response``), or a message."""
    return message if type(message) is bytes else message.SerializeToString()


def _methods(servicer: InferenceServicer) -> list[tuple[str, Any, Callable[[bytes], Any], Callable[[Any], bytes], bool]]:
    """Each method of the service: (path, behavior, parse, serialize, client-streaming); requests
    are parsed by ``_parse`` (malformed messages reach the servicer as ``Malformed``)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = []
    for method in service.methods:
        serialize = _serialized if method.name == "ModelInfer" else getattr(pb, method.output_type.name).SerializeToString
        methods.append((f"/{service.full_name}/{method.name}", getattr(servicer, method.name), _parse(getattr(pb, method.input_type.name)), serialize, method.client_streaming))
    return methods


def _method_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's handlers for grpc.aio, as gRPC's generated code makes them."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for path, behavior, parse, serialize, streaming in _methods(servicer):
        make = grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[path.rsplit("/", 1)[1]] = make(behavior, request_deserializer=parse, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class RequireApiKey(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a call that needs the API key and lacks it (``AccessPolicy``; the
    key comes in the ``authorization`` metadata)."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], details: grpc.HandlerCallDetails) -> Any:
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            self.policy.check_grpc(details.method, authorization)
        except Unauthenticated as exc:
            return _refusal(details.method, exc.message)
        return await continuation(details)


def _refusal(method: str, message: str) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: a stream handler must be an async generator

    if method.endswith("/ModelStreamInfer"):
        return grpc.stream_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def server_credentials(certfile: str, keyfile: str) -> grpc.ServerCredentials:
    with open(keyfile, "rb") as key, open(certfile, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


def create_grpc_server(plane: DataPlane, listener: socket.socket | tuple[str, int], transport: str = "native", connection_rate: ConnectionRate | None = None) -> GrpcServer | grpc.aio.Server:
    """The gRPC server on ``listener``, a socket the frontends share by SO_REUSEPORT (grpcio: a
    (host, port) address, where its C core opens such a socket of its own): messages up
    to the HTTP body limit in; more than ``max_concurrent_streams`` calls on a connection are
    refused, calls past ``max_concurrent_rpcs`` get RESOURCE_EXHAUSTED; TLS from the settings'
    certificate files; the API key, if set, checked on every call; new connections per client
    address counted in ``connection_rate`` (native transport). ``transport`` "native" is
    this package's HTTP/2 transport (``http2``), "grpcio" grpc.aio's server."""
    settings = plane.settings
    policy = AccessPolicy(settings.api_key, settings.open_endpoints)
    servicer = InferenceServicer(plane)
    if isinstance(listener, tuple):
        if transport != "grpcio":
            raise ValueError("the native transport serves on a listening socket")
        return _grpcio_server(servicer, policy, *listener)
    methods = {path: Method(behavior, parse, serialize, streaming) for path, behavior, parse, serialize, streaming in _methods(servicer)}
    tls = ssl_context(settings.tls_certfile, settings.tls_keyfile) if settings.tls_certfile else None
    return GrpcServer(methods, listener, policy=policy, ssl_context=tls, max_message=settings.max_request_bytes, max_streams=settings.max_concurrent_streams, max_rpcs=settings.max_concurrent_rpcs, handshake_timeout=settings.header_timeout_s, idle_timeout=settings.idle_timeout_s, write_timeout=settings.write_timeout_s, connection_rate=connection_rate, receiving=plane.receiving)


def _grpcio_server(servicer: InferenceServicer, policy: AccessPolicy, host: str, port: int) -> grpc.aio.Server:
    """grpc.aio's server on host:port."""
    settings = servicer.plane.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 1),  # every frontend process listens on the same port
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            ("grpc.max_connection_idle_ms", int(settings.idle_timeout_s * 1000)),
            ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_s * 1000)),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        interceptors=[RequireApiKey(policy)] if policy.enabled else None,
    )
    server.add_generic_rpc_handlers((_method_handlers(servicer),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if settings.tls_certfile:
        bound = server.add_secure_port(address, server_credentials(settings.tls_certfile, settings.tls_keyfile))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"gRPC cannot listen on {address}")
    return server
