"""The engine process: the registry's models, their schedulers and mux groups, the forward
passes, shadow sampling, and every metric and statistic of the server.

Frontends send tokenized requests over ZMQ (``ipc``); the engine queues their texts with the
model's scheduler and answers each request with its own logits. Because every count is made
here, ``/metrics`` and Triton statistics are exact however many frontends there are: a
request's success is counted before its answer leaves, and a frontend reports the failures
it detects (bad input) and waits for the count before it answers.

Run by the supervisor as ``python -m muxserve.serving.engine_service <address>``. SIGTERM:
answer every accepted request, then exit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
import time
from typing import Any

import numpy as np
from prometheus_client import generate_latest

from muxserve.serving import ipc
from muxserve.serving.engine import set_intra_op_threads
from muxserve.serving.errors import ServingError
from muxserve.serving.observability.metrics import Metrics, refresh_throughput
from muxserve.serving.observability.stats import model_statistics
from muxserve.serving.processes import child_settings, run_loop, signal_ready
from muxserve.serving.registry import ModelRegistry, ServedModel
from muxserve.serving.scheduler import QueuedRequest
from muxserve.serving.settings import Settings
from muxserve.serving.types import RequestOptions

log = logging.getLogger("muxserve")


class EngineService:
    def __init__(self, settings: Settings, address: str) -> None:
        self.settings = settings
        self.address = address
        self.metrics = Metrics()
        self.registry = ModelRegistry(settings.model_repository, settings, self.metrics)
        self.shadow: Any = None
        self.channel: ipc.Channel | None = None
        self.peers: set[bytes] = set()
        self._requests: dict[tuple[bytes, int], tuple[ServedModel, list[QueuedRequest]]] = {}
        self._stop = asyncio.Event()

    async def run(self) -> None:
        s = self.settings
        await self.registry.start()
        if s.shadow:
            await self._restart_shadow()
            self.registry.listeners.append(self._restart_shadow)
        self.registry.listeners.append(self._broadcast_index)
        poller = asyncio.create_task(self.registry.poll_forever(s.repository_poll_secs), name="repository-poll") if s.model_control_mode == "poll" else None
        sock = ipc.socket(ipc.zmq.ROUTER)
        sock.bind(self.address)  # only now: a frontend that connects finds the models loaded
        self.channel = ipc.Channel(sock, self._handle)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        log.info("engine process serving %d model version(s)", sum(m.ready for m in self.registry.all()))
        signal_ready()
        await self._stop.wait()
        log.info("engine draining: answering every accepted request")
        if poller is not None:
            poller.cancel()
        await self.registry.drain()
        if self.shadow is not None:
            await self.shadow.stop()
        await self.registry.unload_all()
        await asyncio.sleep(0)  # the last answers' frame goes out with this iteration
        self.channel.close()

    async def _restart_shadow(self) -> None:
        """Shadow sampling pairs loaded versions: after a model change, pair the new ones (the old
        sampler stops before the versions it holds do)."""
        from muxserve.serving.observability.shadow import ShadowSampler

        if self.shadow is not None:
            await self.shadow.stop()
        self.shadow = ShadowSampler.from_registry(self.registry, self.metrics)

    async def _broadcast_index(self) -> None:
        """Every frontend gets the new index before a load or unload is answered."""
        if self.channel is not None:
            index = self._index()
            for peer in self.peers:
                self.channel.send(peer, ipc.IndexChanged(index))

    # ------------------------------------------------------------------ messages

    def _handle(self, peer: bytes, messages: list[Any]) -> None:
        if peer not in self.peers:
            self.peers.add(peer)
        for m in messages:
            kind = type(m)
            if kind is ipc.Infer:
                self._infer(peer, m)
            elif kind is ipc.Cancel:
                entry = self._requests.get((peer, m.id))
                if entry is not None:
                    for piece in entry[1]:
                        entry[0].scheduler.cancel(piece)
            elif kind is ipc.Failed:
                self._failed(peer, m)
            elif kind is ipc.Query:
                self._query(peer, m)

    def _reply_error(self, peer: bytes, request_id: int, exc: BaseException, counted: bool = False) -> None:
        if isinstance(exc, ServingError):
            self.channel.send(peer, ipc.Error(request_id, type(exc).__name__, exc.message, counted))
        else:
            log.error("engine request failed", exc_info=exc)
            self.channel.send(peer, ipc.Error(request_id, "InferenceFailed", "internal error (the server log has the cause)", counted))

    def _infer(self, peer: bytes, m: ipc.Infer) -> None:
        try:
            served = self.registry.get_ready(m.model, m.version)
        except ServingError as exc:  # unloaded since the frontend looked: not this version's count
            self._reply_error(peer, m.id, exc)
            return
        served.hold()  # a reload or unload stops this version only after its answer
        monitor = served.monitor
        monitor.tokenized(m.tokenize_s)
        scheduler = served.scheduler
        size = max(1, served.max_batch_size)  # a bigger request (/v1/classify) runs as several
        pieces: list[QueuedRequest] = []
        try:
            for i in range(0, len(m.rows), size):
                pieces.append(scheduler.enqueue(m.rows[i : i + size], RequestOptions(m.ensemble, m.max_num_instances)))
            future = pieces[0].future if len(pieces) == 1 else _joined([p.future for p in pieces])
        except ServingError as exc:
            for piece in pieces:
                scheduler.cancel(piece)
            served.release()
            monitor.request_failed(exc.reason, time.monotonic() - m.start)
            self._reply_error(peer, m.id, exc, counted=True)
            return
        self._requests[(peer, m.id)] = (served, pieces)
        future.add_done_callback(functools.partial(self._done, peer, m, served, pieces))

    def _done(self, peer: bytes, m: ipc.Infer, served: ServedModel, pieces: list[QueuedRequest], future: asyncio.Future) -> None:
        self._requests.pop((peer, m.id), None)
        served.release()
        monitor = served.monitor
        if future.cancelled():
            for piece in pieces:
                served.scheduler.cancel(piece)
            monitor.request_failed("cancelled", time.monotonic() - m.start)
            return
        exc = future.exception()
        if exc is not None:
            for piece in pieces:  # one piece failed: the others are withdrawn
                served.scheduler.cancel(piece)
            monitor.request_failed(getattr(exc, "reason", "internal"), time.monotonic() - m.start)
            self._reply_error(peer, m.id, exc, counted=True)
            return
        logits: np.ndarray = future.result()
        monitor.request_succeeded(len(m.rows), time.monotonic() - m.start)
        out = np.ascontiguousarray(logits, dtype=np.float32)
        num_instances = [n for piece in pieces for n in piece.options.num_instances]
        self.channel.send(peer, ipc.Result(m.id, out.tobytes(), out.shape[1], num_instances, served.version))
        if self.shadow is not None:
            self._offer_shadow(served, m.rows, logits, num_instances)

    def _offer_shadow(self, served: ServedModel, rows: list[list[int]], logits: np.ndarray, num_instances: list[int]) -> None:
        """To the shadow sampler, as served by the model that computed them: a family's texts
        go as those of the member that served each."""
        if served.family is None:
            self.shadow.offer(served, rows, logits)
            return
        for n, member in served.family.members.items():
            picked = [i for i, used in enumerate(num_instances) if used == n]
            if picked:
                self.shadow.offer(member, [rows[i] for i in picked], logits[picked])

    def _failed(self, peer: bytes, m: ipc.Failed) -> None:
        try:
            served = self.registry.find(m.model, m.version)
        except ServingError:
            served = None
        if served is not None and served.monitor is not None:
            served.monitor.request_failed(m.reason, m.seconds)
        self.channel.send(peer, ipc.Reply(m.id))

    def _query(self, peer: bytes, q: ipc.Query) -> None:
        if q.what in ("load", "unload"):
            asyncio.ensure_future(self._control(peer, q))
            return
        try:
            if q.what == "index":
                body: Any = self._index()
            elif q.what == "metrics":
                body = self._exposition()
            elif q.what == "stats":
                models = [self.registry.find(q.model, q.version)] if q.model else [m for m in self.registry.all() if m.monitor is not None]
                body = [model_statistics(m) for m in models]
            else:
                raise ValueError(f"unknown query {q.what!r}")
        except Exception as exc:
            self._reply_error(peer, q.id, exc)
            return
        self.channel.send(peer, ipc.Reply(q.id, body))

    async def _control(self, peer: bytes, q: ipc.Query) -> None:
        try:
            self.registry.control_allowed()
            await (self.registry.load(q.model) if q.what == "load" else self.registry.unload(q.model))
        except Exception as exc:
            self._reply_error(peer, q.id, exc)
            return
        self.channel.send(peer, ipc.Reply(q.id))

    def _index(self) -> ipc.Index:
        return ipc.Index([self._info(m) for m in self.registry.all()], self.registry.unloaded())

    @staticmethod
    def _info(m: ServedModel) -> ipc.ModelInfo:
        tokenizer, cfg = m.tokenizer, m.model_config
        return ipc.ModelInfo(
            m.name, m.version, m.state, m.reason, m.config.SerializeToString(), list(cfg.labels) if cfg is not None else [],
            str(tokenizer.path) if tokenizer is not None else "", tokenizer.max_length if tokenizer is not None else 0,
            cfg.num_instances if cfg is not None else 0, m.family is not None,
        )

    def _exposition(self) -> bytes:
        refresh_throughput(self.metrics, self.registry.monitors())
        for served in self.registry.all():
            if served.monitor is not None and served.scheduler is not None:
                served.monitor.set_queue_depth(served.scheduler.queue_depth)
        return generate_latest(self.metrics.registry)



def _joined(futures: list[asyncio.Future]) -> asyncio.Future:
    """One future for the pieces of a request: their logits in order, or the first failure."""
    joined = asyncio.get_running_loop().create_future()
    left = [len(futures)]

    def one_done(f: asyncio.Future) -> None:
        if joined.done():
            return
        if f.cancelled():
            joined.cancel()
        elif f.exception() is not None:
            joined.set_exception(f.exception())
        else:
            left[0] -= 1
            if not left[0]:
                joined.set_result(np.concatenate([p.result() for p in futures]))

    for f in futures:
        f.add_done_callback(one_done)
    return joined


def main(argv: list[str] | None = None) -> int:
    (address,) = argv if argv is not None else sys.argv[1:]
    set_intra_op_threads(1)  # the event loop's thread makes no thread pool (engine.serial_thread): the instances' threads run the passes
    settings = child_settings()
    run_loop(EngineService(settings, address).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
