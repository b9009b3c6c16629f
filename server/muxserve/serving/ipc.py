"""The wire between frontend processes and the engine process: ZMQ, msgpack, batched frames.

Frontends hold a DEALER socket, the engine a ROUTER. Every message is a small msgspec struct
encoded as a msgpack array (token ids as integer lists, logits as raw float32 bytes), and all
messages for one peer queued during one event-loop iteration travel as a single frame, so a
burst of requests costs one send and one receive on each side.

``Channel`` puts a socket on the asyncio loop without zmq.asyncio's per-receive futures: the
socket's file descriptor wakes a reader that drains every waiting frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import zmq


class Infer(msgspec.Struct, array_like=True, tag=1):
    """Texts of one request, tokenized; ``start`` is the frontend's CLOCK_MONOTONIC at arrival."""

    id: int
    model: str
    version: str  # as asked for: "" is the version serving when the engine takes the request
    rows: list[list[int]]
    start: float
    tokenize_s: float
    ensemble: bool = False
    max_num_instances: int = 0  # 0: any


class Cancel(msgspec.Struct, array_like=True, tag=2):
    """The caller went away: drop the request's texts from the queue."""

    id: int


class Failed(msgspec.Struct, array_like=True, tag=3):
    """A request to this model version failed in the frontend (e.g. bad input): count it.
    Answered with an empty ``Reply`` once counted."""

    id: int
    model: str
    version: str
    reason: str
    seconds: float


class Query(msgspec.Struct, array_like=True, tag=4):
    """Ask the engine: ``index`` (``Index``), ``metrics`` (Prometheus text), ``stats`` (Triton
    statistics of ``model``, or of all), ``load`` / ``unload`` (model control of ``model``)."""

    id: int
    what: str
    model: str = ""
    version: str = ""


class Result(msgspec.Struct, array_like=True, tag=5):
    id: int
    logits: bytes  # float32, row-major [texts, columns]
    columns: int
    num_instances: list[int]  # the mux width N that served each text
    version: str  # the model version that served them


class Error(msgspec.Struct, array_like=True, tag=6):
    id: int
    kind: str  # a ServingError class name
    message: str
    counted: bool = False  # already counted as a failure of the model version (by the engine)


class Reply(msgspec.Struct, array_like=True, tag=7):
    id: int
    body: Any = None


class IndexChanged(msgspec.Struct, array_like=True, tag=8):
    """Pushed by the engine to every frontend when models were loaded or unloaded, before the
    load or unload is answered."""

    index: Any


class ModelInfo(msgspec.Struct, array_like=True):
    """What a frontend knows of one model version."""

    name: str
    version: str
    state: str
    reason: str
    config: bytes  # ModelConfig protobuf
    labels: list[str]
    tokenizer: str  # path of tokenizer.json ("" until loaded)
    max_seq_length: int
    num_instances: int  # N (a family: its widest member's)
    is_family: bool


class Index(msgspec.Struct, array_like=True):
    models: list[ModelInfo]
    unloaded: list[str]  # models of the repository that are not loaded


# zmq.POLLIN is an enum flag: ``events & zmq.POLLIN`` makes a new enum member on every test
POLLIN = int(zmq.POLLIN)

Message = Infer | Cancel | Failed | Query | Result | Error | Reply | IndexChanged
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Message])

Handler = Callable[[bytes, list[Any]], None]
Unsent = Callable[[bytes, list[Any]], None]


class Channel:
    """A DEALER or ROUTER socket on the running loop. ``send(peer, message)`` queues; one frame
    per peer goes out at the end of the loop iteration. ``handler(peer, messages)`` gets every
    frame that arrives (``peer`` is b"" on a DEALER). Messages that cannot be sent (no
    connection) go to ``unsent``.

    ``min_interval_s``: while ``busy()``, frames go out at most this often; a message queued
    sooner after the last frame waits for the next (where requests arrive one per loop
    iteration, as gRPC's do, many then share a frame, and the other side wakes once for all of
    them, not once for each)."""

    def __init__(self, sock: zmq.Socket, handler: Handler, unsent: Unsent | None = None, min_interval_s: float = 0.0, busy: Callable[[], bool] | None = None) -> None:
        self.sock = sock
        self.router = sock.type == zmq.ROUTER
        self.handler = handler
        self.unsent = unsent
        self._loop = asyncio.get_running_loop()
        self._outbox: dict[bytes, list[Any]] = {}
        self._flush_scheduled = False
        self._min_interval = min_interval_s
        self._busy = busy
        self._last_flush = 0.0
        self._fd = sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)  # the descriptor only signals changes after a first look

    def send(self, peer: bytes, message: Any) -> None:
        box = self._outbox.get(peer)
        if box is None:
            self._outbox[peer] = [message]
        else:
            box.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            due = self._last_flush + self._min_interval
            if self._min_interval and due > self._loop.time() and (self._busy is None or self._busy()):
                self._loop.call_at(due, self._flush)
            else:
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._last_flush = self._loop.time()
        outbox, self._outbox = self._outbox, {}
        for peer, messages in outbox.items():
            frame = _encoder.encode(messages)
            try:
                if self.router:
                    self.sock.send_multipart((peer, frame), zmq.NOBLOCK, copy=False)
                else:
                    self.sock.send(frame, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if self.unsent is not None:
                    self.unsent(peer, messages)
        # ZMQ's descriptor is edge-triggered and a send can consume the edge of a frame that
        # arrived meanwhile: read now rather than wait for an edge that will not come
        self._drain()

    def _drain(self) -> None:
        sock = self.sock
        while sock.getsockopt(zmq.EVENTS) & POLLIN:
            if self.router:
                peer, frame = sock.recv_multipart(zmq.NOBLOCK)
            else:
                peer, frame = b"", sock.recv(zmq.NOBLOCK)
            self.handler(peer, _decoder.decode(frame))

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)


def socket(kind: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # bounded by the scheduler's queue, not by ZMQ
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock
