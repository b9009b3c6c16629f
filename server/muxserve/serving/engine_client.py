"""A frontend's handle on the engine process: submit tokenized texts, cancel, ask for the model
index, metrics and statistics, and know at every moment whether the engine is there.

The engine's models are mirrored in ``ModelIndex`` (what the data plane validates against and
tokenizes with). A ZMQ socket monitor reports the connection: when the engine process goes
away every waiting request fails at once with 503 and the frontend is not ready; when it is
back (restarted by the supervisor) the index is fetched again and the frontend is ready.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import zmq
from tritonclient.grpc import model_config_pb2 as mc
from zmq.utils.monitor import parse_monitor_message

from muxserve.model.tokenizer import TextTokenizer
from muxserve.serving import errors, ipc
from muxserve.serving.catalog import ModelCatalog
from muxserve.serving.types import RequestOptions

log = logging.getLogger("muxserve")
READY = "READY"
ENGINE_GONE = "the engine process is not available (restarting); retry shortly"
# Under load (BUSY_REQUESTS waiting for the engine, whose answers then take longer than this
# anyway), at most one frame to the engine per FRAME_INTERVAL_S: requests that arrive one per
# loop iteration (gRPC's) share frames, and the engine wakes, and runs a pass, once for several
# (its cost per pass is spread over more requests). Below that load, every request goes out at once.
FRAME_INTERVAL_S = 0.005
BUSY_REQUESTS = 8


@dataclass(eq=False)
class ModelView:
    """One model version as a frontend sees it: config, labels and tokenizer."""

    name: str
    version: str
    state: str
    reason: str
    config: mc.ModelConfig
    labels: list[str]
    tokenizer: TextTokenizer | None
    num_instances: int
    is_family: bool

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @functools.cached_property
    def output_names(self) -> list[str]:
        return [o.name for o in self.config.output]

    @functools.cached_property
    def label_bytes(self) -> list[bytes]:
        """The labels as the LABEL output carries them (UTF-8)."""
        return [label.encode() for label in self.labels]


class ModelIndex(ModelCatalog[ModelView]):
    """The engine's models. Lookups fail with 503 while the engine has never been reached."""

    def __init__(self) -> None:
        super().__init__()
        self.known = False
        self.unloaded_models: list[str] = []
        self._current: dict[str, ModelView] = {}  # name -> the version a request without one gets
        self._tokenizers: dict[tuple[str, int], TextTokenizer] = {}

    def update(self, index: ipc.Index) -> None:
        models: dict[str, dict[str, ModelView]] = {}
        for info in index.models:
            config = mc.ModelConfig.FromString(info.config)
            tokenizer = None
            if info.tokenizer:
                key = (info.tokenizer, info.max_seq_length)
                tokenizer = self._tokenizers.get(key) or self._tokenizers.setdefault(key, TextTokenizer(info.tokenizer, info.max_seq_length))
            models.setdefault(info.name, {})[info.version] = ModelView(info.name, info.version, info.state, info.reason, config, info.labels, tokenizer, info.num_instances, info.is_family)
        self.models = models
        self.unloaded_models = index.unloaded
        self.known = True
        # a view's state changes only with a new index: every request's lookup is one get until then
        self._current = {name: ModelCatalog.find(self, name) for name in models}

    def unloaded(self) -> list[str]:
        """Models in the repository that are not loaded (explicit mode, or ``--models``)."""
        return self.unloaded_models

    def find(self, name: str, version: str = "") -> ModelView:
        if not version:
            current = self._current.get(name)
            if current is not None:
                return current
        if not self.known:
            raise errors.NotReady(ENGINE_GONE)
        return super().find(name, version)


class EngineClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.models = ModelIndex()
        self.connected = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        # requests whose caller's cancellation came first and whose answer came before the
        # caller's task resumed: whether the engine counted them (the task takes its entry)
        self._answered_late: dict[int, bool] = {}
        self._channel: ipc.Channel | None = None
        self._monitor: zmq.Socket | None = None
        self._first_index = asyncio.Event()

    async def start(self) -> None:
        sock = ipc.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for an engine that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        asyncio.get_running_loop().add_reader(self._monitor.getsockopt(zmq.FD), self._on_monitor)
        asyncio.get_running_loop().call_soon(self._on_monitor)
        self._channel = ipc.Channel(sock, self._handle, self._unsent, FRAME_INTERVAL_S, busy=lambda: len(self._pending) >= BUSY_REQUESTS)
        sock.connect(self.address)

    def close(self) -> None:
        if self._monitor is not None:
            asyncio.get_running_loop().remove_reader(self._monitor.getsockopt(zmq.FD))
            self._channel.sock.disable_monitor()
            self._monitor.close(linger=0)
        if self._channel is not None:
            self._channel.close()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ requests

    async def infer(self, model: ModelView, version: str, rows: list[list[int]], start: float, tokenize_s: float, options: RequestOptions) -> tuple[np.ndarray, list[int], str]:
        """Logits [len(rows), C] of these texts from the engine, the N that served each and the
        version that served them (``version``: the one asked for, "" for the current);
        cancels there if the caller goes away; NotReady at once if the engine is not (or no
        longer) there."""
        if not self.connected:
            raise errors.NotReady(ENGINE_GONE)
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._channel.send(b"", ipc.Infer(request_id, model.name, version, rows, start, tokenize_s, options.ensemble, options.max_num_instances))
        try:
            return await future
        except asyncio.CancelledError as exc:
            if self._pending.pop(request_id, None) is not None:
                if self.connected:
                    self._channel.send(b"", ipc.Cancel(request_id))
                    exc.counted = True  # the engine counts it when it drops the texts
            else:
                # the engine's answer came in before this task resumed (before or after the
                # cancellation): the engine counted the request then, as answered or as the
                # failure it reported counted
                counted = self._answered_late.pop(request_id, None)
                if counted is None and future.done() and not future.cancelled():
                    failure = future.exception()
                    counted = failure is None or getattr(failure, "counted", False)
                exc.counted = bool(counted)
            raise

    async def report_failure(self, model: ModelView, reason: str, seconds: float) -> None:
        """Count a failure of this model version (in the engine, where every count lives)."""
        if self.connected:
            request_id = next(self._ids)
            await self._call(request_id, ipc.Failed(request_id, model.name, model.version, reason, seconds))

    def count_failure(self, model: ModelView, reason: str, seconds: float) -> None:
        """``report_failure`` without waiting for the count: it is counted before anything this
        frontend asks of the engine later (one ordered channel), a later scrape included."""
        if self.connected:
            self._channel.send(b"", ipc.Failed(next(self._ids), model.name, model.version, reason, seconds))

    async def control(self, what: str, model: str) -> None:
        """``load`` or ``unload`` a model; returns once every frontend has the new index."""
        await self.query(what, model)

    async def query(self, what: str, model: str = "", version: str = "") -> Any:
        if not self.connected and what != "index":
            raise errors.NotReady(ENGINE_GONE)
        request_id = next(self._ids)
        return await self._call(request_id, ipc.Query(request_id, what, model, version))

    async def _call(self, request_id: int, message: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._channel.send(b"", message)
        try:
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def refresh_index(self) -> None:
        self.models.update(msgspec.convert(await self.query("index"), ipc.Index))

    # ------------------------------------------------------------------ answers

    def _handle(self, _: bytes, messages: list[Any]) -> None:
        pending = self._pending
        for m in messages:
            kind = type(m)
            if kind is ipc.Result:
                future = pending.pop(m.id, None)
                if future is not None:
                    if future.done():  # cancelled, its task not yet resumed: see infer
                        self._answered_late[m.id] = True
                    else:
                        future.set_result((np.frombuffer(m.logits, dtype=np.float32).reshape(-1, m.columns), m.num_instances, m.version))
            elif kind is ipc.Error:
                future = pending.pop(m.id, None)
                if future is not None:
                    if future.done():
                        self._answered_late[m.id] = m.counted
                    else:
                        exc = getattr(errors, m.kind, errors.InferenceFailed)(m.message)
                        exc.counted = m.counted
                        future.set_exception(exc)
            elif kind is ipc.Reply:
                future = pending.pop(m.id, None)
                if future is not None and not future.done():
                    future.set_result(m.body)
            elif kind is ipc.IndexChanged:
                self.models.update(msgspec.convert(m.index, ipc.Index))

    def _unsent(self, _: bytes, messages: list[Any]) -> None:
        for m in messages:
            future = self._pending.pop(getattr(m, "id", -1), None)
            if future is not None and not future.done():
                future.set_exception(errors.NotReady(ENGINE_GONE))

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(errors.NotReady(ENGINE_GONE))

    # ------------------------------------------------------------------ connection

    def _on_monitor(self) -> None:
        monitor = self._monitor
        while monitor.getsockopt(zmq.EVENTS) & ipc.POLLIN:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"]
            if event == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    log.error("engine process went away: answering 503 until it is back")
                self.connected = False
                self._fail_pending()
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                asyncio.ensure_future(self._connected())

    async def _connected(self) -> None:
        try:
            await self.refresh_index()
        except errors.ServingError as exc:
            log.warning("engine index: %s", exc.message)
            return
        self.connected = True
        self._first_index.set()
        log.info("engine process connected: %d model version(s)", len(self.models.all()))

    async def wait_connected(self) -> None:
        await self._first_index.wait()
