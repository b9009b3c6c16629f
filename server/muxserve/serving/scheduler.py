"""The mux scheduler: texts from many requests fill mux groups; one forward pass per batch.

One asyncio task owns the queue. A batch runs when an engine instance is free and either a
full batch (``batch_texts`` = B groups x N slots, or a ``TokenBudget`` worth of tokens) is
waiting or the oldest waiting text has waited ``max_queue_delay``; while another instance
computes (the engine, not the arrivals, is the bottleneck), a short batch may wait up to
``fill_wait_s`` more for the texts expected meanwhile (pass filling). Instances of a mux
model that are free together share the queued requests' texts (``queue_share``), not one
taking all. Texts, not requests, fill slots; every text's result comes from its own row of
the output. The queue is bounded in requests (Triton's ``max_queue_size``): past it
``submit`` fails at once with QueueFull. A failing forward pass fails only the requests that
had texts in it. A caller that goes away leaves its texts to be skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from muxserve.model.muxbert import ensemble_order, mean_of_copies
from muxserve.serving.errors import InferenceFailed, NotReady, QueueFull
from muxserve.serving.padding import PAD_MULTIPLE, padded_length
from muxserve.serving.types import RequestOptions  # noqa: F401  (the scheduler's API)

log = logging.getLogger("muxserve")


@dataclass
class BatchReport:
    """What one forward pass did; handed to the observer (metrics, statistics)."""

    texts: int
    requests: int
    groups: int
    num_instances: int
    padded_length: int
    queue_seconds: list[float]
    compute_seconds: float
    failed: bool
    rows: int = 0  # rows computed (an ensembled text is N rows); 0: as many as texts


@dataclass(eq=False)
class QueuedRequest:
    future: asyncio.Future
    results: list[np.ndarray | None]
    remaining: int
    cancelled: bool = False
    options: RequestOptions | None = None


@dataclass(eq=False)
class _Text:
    ids: list[int]
    request: QueuedRequest
    index: int
    enqueued: float = field(default_factory=time.monotonic)


RunBatch = Callable[[list[list[int]]], Awaitable[np.ndarray]]
RATE_SECONDS = 0.5  # the arrival rate and pass time are averages over about this long

T = TypeVar("T")
WINDOW_BATCHES = 4  # length-aware batching looks this many batches deep into the queue


@dataclass(frozen=True)
class TokenBudget:
    """TEI's ``max_batch_tokens`` for mux models: a forward pass computes at most ``max_tokens``
    encoder positions, that is mux groups x padded length (for a plain model, N = 1: texts x
    padded length). Short texts then share a pass by the dozen while long ones make smaller
    passes, so a pass's time stays bounded without padding every batch to a fixed shape."""

    max_tokens: int
    group: int = 1  # texts per mux group (N)
    pad_multiple: int = PAD_MULTIPLE  # as the engine pads (0: its length buckets)
    max_length: int = 512

    def cost(self, texts: int, longest: int) -> int:
        """Encoder positions of a pass of ``texts`` texts whose longest has ``longest`` tokens."""
        return -(-texts // self.group) * padded_length(longest, self.max_length, self.pad_multiple)

    def full(self, queued_tokens: int) -> bool:
        """Whether the queue surely fills a pass: its tokens, unpadded, already reach the budget."""
        return queued_tokens >= self.max_tokens * self.group


def choose_batch(lengths: Sequence[int], overdue: Sequence[bool], cap: int, length_aware: bool, budget: TokenBudget | None = None) -> list[int]:
    """Which waiting texts form the next batch: indices into the queue (oldest first; the caller
    passes at most ``WINDOW_BATCHES`` batches of it), in arrival order.

    Arrival order: the oldest ``cap``. Length-aware: overdue texts first (oldest first), then
    those closest in length to the oldest text, so the batch's padded length stays short. The
    batch keeps arrival order; which texts share a mux group is ``order_groups``' choice.

    With a ``budget``, texts join in that order of priority while the pass's cost stays within
    it (in arrival order, or while overdue texts are being placed, the first that does not fit
    ends the batch; length-aware, a longer text that does not fit is passed over for shorter
    ones). The first text in priority, the oldest, always runs, even alone past the budget:
    nothing starves."""
    count = len(lengths)
    if count == 0:  # every waiting text was withdrawn by its caller
        return []
    if not length_aware:
        order = list(range(min(count, cap)))
    elif count <= cap and budget is None:
        return list(range(count))
    else:
        first = [i for i in range(count) if overdue[i]][:cap]
        taken = set(first)
        anchor = lengths[0]
        order = first + sorted((i for i in range(count) if i not in taken), key=lambda i: abs(lengths[i] - anchor))
    if budget is None:
        return sorted(order[:cap])
    chosen: list[int] = []
    longest = 0
    for i in order:
        if len(chosen) == cap:
            break
        if chosen and budget.cost(len(chosen) + 1, max(longest, lengths[i])) > budget.max_tokens:
            if not length_aware or overdue[i]:
                break  # no text passes an older one in arrival order, or an overdue one
            continue
        chosen.append(i)
        longest = max(longest, lengths[i])
    return sorted(chosen)


class DecayingRate:
    """Events per second, averaged over about ``seconds`` (an exponentially decaying count)."""

    def __init__(self, seconds: float = RATE_SECONDS) -> None:
        self.seconds = seconds
        self._value = 0.0
        self._at = time.monotonic()

    def add(self, count: float, now: float) -> None:
        self._value = self.value(now) + count / self.seconds
        self._at = now

    def value(self, now: float) -> float:
        return self._value * math.exp(-max(0.0, now - self._at) / self.seconds)


def fill_target(arrivals_per_s: float, pass_seconds: float, instances: int, cap: int) -> int:
    """The texts a pass gets when the engine is the bottleneck: what arrives while the other
    instances each run one pass (Little's law for back-to-back passes), at most ``cap``."""
    return min(cap, int(arrivals_per_s * pass_seconds / max(1, instances)))


def queue_share(queued: int, free_instances: int, cap: int, group: int = 1) -> int:
    """The most texts a pass takes while ``free_instances`` engine instances (its own included)
    are free: an even share of the ``queued`` texts, in whole mux groups of ``group``, at most
    ``cap``. Passes side by side end sooner than one pass of everything, and the callers of a
    closed loop stay spread over the instances instead of moving as one cohort from one
    instance to the next while the others idle."""
    if free_instances <= 1:
        return cap
    share = -(-queued // free_instances)
    return min(cap, -(-share // group) * group)


def split_queue(queue: list[T], length: Callable[[T], int], overdue: Callable[[T], bool], cap: int, length_aware: bool, budget: TokenBudget | None = None) -> tuple[list[T], list[T]]:
    """(next batch, what stays queued), by ``choose_batch`` over the oldest ``WINDOW_BATCHES``
    batches of ``queue``; both keep arrival order."""
    window = queue[: WINDOW_BATCHES * cap]
    picked = choose_batch([length(t) for t in window], [overdue(t) for t in window], cap, length_aware, budget)
    taken = set(picked)
    return [window[i] for i in picked], [t for i, t in enumerate(window) if i not in taken] + queue[len(window) :]


def order_groups(batch: list[T], length: Callable[[T], int], whole_queue: bool, length_aware: bool) -> None:
    """Puts a pass's texts (in place) in the order that fills its mux groups (consecutive texts
    share one).

    A pass that took the whole queue holds texts of any lengths in arrival order; sorted by
    length, each group holds texts of similar length, and a group computes as many tokens as its
    longest text (``packed_cls_states``): 25-text passes of sst2-mux5 ran 1.2x faster, at level
    accuracy (``benchmarks/served_grouping.py --batch-texts 25``, docs/models.md). A pass picked by
    length from a longer queue keeps arrival order: its texts are alike in length already, and
    sorting them measured 0.7 points lower on sst2-mux5. Without ``length_aware``: arrival order."""
    if length_aware and whole_queue:
        batch.sort(key=length)


def _text_length(text: _Text) -> int:
    return len(text.ids)


def _ensembled(text: _Text) -> bool:
    return text.request.options is not None and text.request.options.ensemble


def computed_rows(batch: Sequence[_Text], n: int) -> int:
    """Rows a batch computes at width ``n``: an ensembled text is ``n`` rows."""
    return len(batch) + (n - 1) * sum(map(_ensembled, batch))


async def run_texts(run_batch: RunBatch, batch: Sequence[_Text], n: int) -> np.ndarray:
    """Logits of a batch's texts at width ``n``: plain texts one row each, in order, then the
    ensembled ones laid out by ``ensemble_order`` and averaged over their copies."""
    ensembled = [i for i, t in enumerate(batch) if _ensembled(t)] if n > 1 else []
    if not ensembled:
        return await run_batch([t.ids for t in batch])
    copied = set(ensembled)
    plain = [i for i in range(len(batch)) if i not in copied]
    order = ensemble_order(len(ensembled), n)
    logits = await run_batch([batch[i].ids for i in plain] + [batch[ensembled[k]].ids for k in order.tolist()])
    out = np.empty((len(batch), logits.shape[1]), dtype=logits.dtype)
    out[plain] = logits[: len(plain)]
    out[ensembled] = mean_of_copies(torch.from_numpy(logits[len(plain) :]), order, len(ensembled), n).numpy()
    return out


class MuxScheduler:
    def __init__(
        self,
        run_batch: RunBatch,
        num_instances: int,
        batch_texts: int,
        max_queue_delay_s: float,
        max_queue_size: int = 0,
        engine_instances: int = 1,
        length_aware: bool = True,
        observer: Callable[[BatchReport], None] | None = None,
        name: str = "model",
        token_budget: TokenBudget | None = None,
        fill_wait_s: float = 0.0,
    ) -> None:
        if batch_texts < 1:
            raise ValueError("batch_texts must be >= 1")
        self.run_batch = run_batch
        self.num_instances = num_instances
        self.batch_texts = batch_texts
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size  # 0: unbounded, as Triton
        self.length_aware = length_aware
        self.token_budget = token_budget  # None: batches of batch_texts texts
        self.observer = observer
        self.name = name
        self.engine_instances = engine_instances
        # pass filling: while another pass runs, a free instance waits up to this long for the
        # queue to reach ``fill_target`` (0: off, a pass runs on the delay rule alone)
        self.fill_wait_s = fill_wait_s
        self._arrivals = DecayingRate()
        self._pass_seconds = 0.0  # a decaying mean of the passes' durations
        self._queue: list[_Text] = []
        self._queued_requests = 0
        self._queued_tokens = 0
        self._arrived = asyncio.Event()  # texts arrived, or a pass ended
        self._engine_slots = asyncio.Semaphore(engine_instances)
        self._inflight: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.create_task(self._batching_loop(), name=f"batcher-{self.name}")

    async def drain(self) -> None:
        """Stop accepting; answer everything already accepted."""
        self._accepting = False
        await self._idle.wait()

    async def stop(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def queue_depth(self) -> int:
        """Texts waiting (cancelled ones included until skipped)."""
        return len(self._queue)

    @property
    def queued_requests(self) -> int:
        return self._queued_requests

    # ------------------------------------------------------------------ submit

    async def submit(self, rows: list[list[int]], options: RequestOptions | None = None) -> np.ndarray:
        """Queue a request's texts; returns their logits [len(rows), C] in order (and fills in
        ``options.num_instances``)."""
        request = self.enqueue(rows, options)
        try:
            return await request.future
        except asyncio.CancelledError:
            self.cancel(request)
            raise

    def enqueue(self, rows: list[list[int]], options: RequestOptions | None = None) -> QueuedRequest:
        """Queue a request's texts; its ``future`` gets their logits [len(rows), C] in order
        (and ``options.num_instances`` the N of each). Raises NotReady (draining) or QueueFull
        at once."""
        if not self._accepting:
            raise NotReady(f"model {self.name} is not accepting requests (shutting down)")
        if not rows:
            raise ValueError("empty request")
        if self.max_queue_size and self._queued_requests >= self.max_queue_size:
            raise QueueFull(f"model {self.name}: queue is full ({self.max_queue_size} requests waiting); retry later")
        if options is not None:
            options.num_instances = [0] * len(rows)
        request = QueuedRequest(asyncio.get_running_loop().create_future(), [None] * len(rows), len(rows), options=options)
        now = time.monotonic()
        self._arrivals.add(len(rows), now)
        self._queue.extend(_Text(r, request, i, now) for i, r in enumerate(rows))
        self._queued_requests += 1
        self._queued_tokens += sum(len(r) for r in rows)
        self._idle.clear()
        self._arrived.set()
        return request

    def cancel(self, request: QueuedRequest) -> None:
        """The caller went away: its queued texts are skipped, not computed."""
        request.cancelled = True
        request.future.cancel()
        self._forget_cancelled()

    # ------------------------------------------------------------------ batching

    def _forget_cancelled(self) -> None:
        before = len(self._queue)
        dropped = {id(t.request) for t in self._queue if t.request.cancelled}
        if dropped:
            self._queue = [t for t in self._queue if not t.request.cancelled]
            self._queued_requests -= len(dropped)
            self._queued_tokens = sum(len(t.ids) for t in self._queue)
        if before and not self._queue and not self._inflight:
            self._idle.set()

    async def _batching_loop(self) -> None:
        while True:
            await self._engine_slots.acquire()  # texts keep arriving while engines are busy
            try:
                await self._wait_for_batch()
                await self._fill_pass()
            except BaseException:
                self._engine_slots.release()
                raise
            batch = self._take()
            if not batch:
                self._engine_slots.release()
                continue
            task = asyncio.create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _wait_for_batch(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if len(self._queue) >= self.batch_texts:
                return
            if self.token_budget is not None and self.token_budget.full(self._queued_tokens):
                return
            wait = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
            if wait <= 0 or not await self._arrival(wait):
                return

    async def _arrival(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for texts to arrive (or a pass to end); False if none did."""
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def fill_target(self) -> int:
        """The queue length a free instance waits for while another pass runs (``fill_target``)."""
        return fill_target(self._arrivals.value(time.monotonic()), self._pass_seconds, self.engine_instances, self.batch_texts)

    async def _fill_pass(self) -> None:
        """Pass filling: a pass that would go short while other passes run (the engine, not the
        arrivals, is the bottleneck) waits up to ``fill_wait_s`` for the texts expected to
        arrive meanwhile: fewer, fuller passes compute more texts per second."""
        if not self.fill_wait_s:
            return
        deadline = time.monotonic() + self.fill_wait_s
        # a pass that ends wakes this wait too (``_execute``): with no other pass left, go
        while self._inflight and self._queue and len(self._queue) < self.fill_target() and not (self.token_budget is not None and self.token_budget.full(self._queued_tokens)):
            wait = deadline - time.monotonic()
            if wait <= 0 or not await self._arrival(wait):
                return

    def _take(self) -> list[_Text]:
        """Take the next batch off the queue (``_split``)."""
        queue = [t for t in self._queue if not t.request.cancelled]
        batch, rest = self._split(queue)
        order_groups(batch, _text_length, not rest, self.length_aware)
        self._queue = rest
        self._queued_tokens = sum(len(t.ids) for t in rest)
        # a request leaves the queue when its last text is taken
        queued = {id(t.request) for t in rest}
        self._queued_requests = len(queued)
        return batch

    def _batch_num_instances(self, batch: list[_Text]) -> int:
        """The N a batch runs at (a family chooses it per batch)."""
        return self.num_instances

    async def _forward(self, batch: list[_Text], n: int) -> np.ndarray:
        """One row of logits per text of the batch, from ``run_batch``."""
        return await run_texts(self.run_batch, batch, n)

    def _split(self, queue: list[_Text]) -> tuple[list[_Text], list[_Text]]:
        """(next batch, what stays queued) by ``choose_batch``, both in arrival order."""
        deadline = time.monotonic() - self.max_queue_delay_s
        # the instances free now, this one included, share the queue (``queue_share``); a lone
        # request is not cut in two (one pass: its answer waits for no second one). Mux models
        # only: a plain model's passes take long enough for its callers to stay spread, and
        # sharing measured no faster there (docs/bench/engine.md)
        sharing = min(self.engine_instances - len(self._inflight), self._queued_requests) if self.num_instances > 1 else 1
        cap = queue_share(len(queue), sharing, self.batch_texts, self.num_instances)
        return split_queue(queue, _text_length, lambda t: t.enqueued <= deadline, cap, self.length_aware, self.token_budget)

    async def _execute(self, batch: list[_Text]) -> None:
        start = time.monotonic()
        queue_seconds = [start - t.enqueued for t in batch]
        failed = False
        n = self._batch_num_instances(batch)
        try:
            logits = await self._forward(batch, n)
            if len(logits) != len(batch):
                raise RuntimeError(f"engine returned {len(logits)} rows for {len(batch)} texts")
            for text in batch:
                if text.request.options is not None:
                    text.request.options.num_instances[text.index] = n
            for row, text in zip(logits, batch, strict=True):
                self._deliver(text, row)
        except Exception:  # a failing pass fails only its own requests
            failed = True
            # the cause goes to the log; callers learn only that their pass failed
            log.exception("model %s: forward pass of %d texts failed", self.name, len(batch))
            error = InferenceFailed(f"model {self.name}: forward pass failed (the server log has the cause)")
            for request in {id(t.request): t.request for t in batch}.values():
                if not request.future.done():
                    request.future.set_exception(error)
        finally:
            compute = time.monotonic() - start
            self._pass_seconds = compute if not self._pass_seconds else self._pass_seconds + (compute - self._pass_seconds) / 8
            self._engine_slots.release()
            # this task leaves the in-flight set now, not in its done callback: two passes that
            # finish in the same loop iteration would each still count the other
            self._inflight.discard(asyncio.current_task())
            self._arrived.set()  # a free instance filling its pass waits for this pass too
            if not self._queue and not self._inflight:
                self._idle.set()
            if self.observer is not None:
                requests = len({id(t.request) for t in batch})
                rows = computed_rows(batch, n)
                padded = max(len(t.ids) for t in batch)
                self.observer(BatchReport(len(batch), requests, -(-rows // n), n, padded, queue_seconds, compute, failed, rows))

    @staticmethod
    def _deliver(text: _Text, row: np.ndarray) -> None:
        request = text.request
        request.results[text.index] = row
        request.remaining -= 1
        if request.remaining == 0 and not request.future.done():
            results = request.results
            # one text: its row as a [1, C] view (np.stack of one row costs about 4 us)
            request.future.set_result(results[0][None] if len(results) == 1 else np.stack(results))
