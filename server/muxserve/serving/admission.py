"""Admission control of a frontend: which requests it takes on, decided at arrival.

Two limits, each refusing at once with 429 + ``Retry-After`` (gRPC ``RESOURCE_EXHAUSTED``):

- ``max_texts_in_flight``: texts accepted and not yet answered, a fixed bound on memory;
- ``max_queue_wait_s``: the wait a new request can expect, at its 99th percentile. By Little's
  law the texts in flight (L) and the rate at which answers come back (X, texts/s) give the
  mean: a new text is answered after those ahead of it, about (L + its texts) / X from now.
  Answers come a forward pass at a time, so waits spread around that mean: the tail factor
  scales it to the time 99% of requests stay within. Each answered request measures its time in
  the server (from its request read to its answer: reading, parsing and tokenizing included)
  over the mean wait predicted for it when it was admitted; the tail factor is the 99th
  percentile of that ratio over the recent answers (at least 1), so it also corrects whatever
  the mean prediction misses. X and the tail factor are measured live over the
  last ``RATE_WINDOW_S`` during which the frontend had texts in flight, so the bound follows
  the engine's real speed (a machine shared with other work, a model that got slower) rather
  than a capacity measured once. A request is refused when its predicted wait passes the
  bound: accepted requests are answered within it, and refusals cost nothing of the engine.

Before the first answer of a busy period nothing is known of X: requests are admitted until
the oldest in flight has waited the bound, which is then already passed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator

from muxserve.serving.errors import Overloaded, PayloadTooLarge

RATE_WINDOW_S = 2.0  # answers counted for the rate (several forward passes, each answers many)
MIN_SPAN_S = 0.1  # a rate over less time than this is a burst's, not the engine's pace
TAIL_EVERY_S = 0.25  # the tail factor sorts the window's waits: not for every request
MAX_TAIL = 4.0


class ReceivingBudget:
    """Bytes of request bodies (HTTP) and messages (gRPC) that this frontend holds
    (``max_receiving_bytes``): while they arrive, and for an inference body or a unary call's
    message until its answer, since its handler holds it (and what was parsed from it) until
    then. Each connection may send up to ``max_request_bytes`` at a time, so without a bound
    across them a few hundred slow connections, or large requests waiting on a busy engine,
    hold gigabytes; past it a request is refused as it arrives."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        if self.limit and self.held + size > self.limit:
            raise Overloaded(f"the server is receiving {self.held} bytes of requests already, the most it holds at once (max_receiving_bytes {self.limit}): retry shortly")
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


class WaitEstimate:
    """The predicted wait of one model's requests in this frontend (Little's law, scaled by the
    recent answers' tail factor)."""

    def __init__(self) -> None:
        self.texts_in_flight = 0
        self._busy_since = 0.0  # when texts_in_flight last rose from 0
        # (time, texts, time in the server over the mean wait predicted at admission or None) within the window
        self._answers: deque[tuple[float, int, float | None]] = deque()
        self._answered = 0  # texts in _answers
        self._tail = 1.0  # the p99 of the answers' ratios
        self._tail_at = -math.inf  # when _tail was last computed

    def _trim(self, now: float) -> float:
        window_start = max(now - RATE_WINDOW_S, self._busy_since)
        while self._answers and self._answers[0][0] < window_start:
            self._answered -= self._answers.popleft()[1]
        return window_start

    def answer_rate(self, now: float) -> float | None:
        """Texts answered per second over the last window of this busy period; None before
        its first answer."""
        window_start = self._trim(now)
        if not self._answered:
            return None
        return self._answered / max(now - window_start, MIN_SPAN_S)

    def mean_wait(self, texts: int, now: float) -> float | None:
        """Little's law: seconds until ``texts`` more texts are answered, on average (None
        before the busy period's first answer)."""
        rate = self.answer_rate(now)
        return None if rate is None else (self.texts_in_flight + texts) / rate

    def tail_factor(self, now: float) -> float:
        """The 99th percentile, over the recent answers, of their time in the server over the
        mean wait predicted for them when they were admitted (1 to ``MAX_TAIL``): what scales a
        mean prediction to the time 99% of requests stay within, whatever spreads them around
        it or biases it. Recomputed at most every ``TAIL_EVERY_S``."""
        if now - self._tail_at >= TAIL_EVERY_S:
            self._trim(now)
            ratios = sorted(r for _, _, r in self._answers if r is not None)
            self._tail = min(MAX_TAIL, max(1.0, ratios[math.ceil(0.99 * len(ratios)) - 1])) if ratios else 1.0
            self._tail_at = now
        return self._tail

    def predicted_wait(self, texts: int, now: float) -> float:
        """Seconds within which ``texts`` more texts would be answered, 99 times in 100 (0
        when nothing is in flight)."""
        if not self.texts_in_flight:
            return 0.0
        mean = self.mean_wait(texts, now)
        if mean is None:  # no answer yet: at least as long as the oldest has waited
            return now - self._busy_since
        return mean * self.tail_factor(now)

    def started(self, texts: int, now: float) -> None:
        if not self.texts_in_flight:
            self._busy_since = now
            self._answers.clear()
            self._answered = 0
        self.texts_in_flight += texts

    def ended(self, texts: int, answered: bool, now: float, in_server: float, predicted_mean: float | None = None) -> None:
        """``texts`` are no longer in flight, ``answered`` or not, ``in_server`` seconds after
        their request was read; ``predicted_mean``: their ``mean_wait`` when admitted, if known."""
        self.texts_in_flight -= texts
        if answered:
            self._answers.append((now, texts, in_server / predicted_mean if predicted_mean else None))
            self._answered += texts


class Admission:
    """The frontend's admission: ``max_texts_in_flight`` over all models, ``max_queue_wait_s``
    per model (each has its own queue in the engine)."""

    def __init__(self, max_texts_in_flight: int = 0, max_queue_wait_s: float = 0.0) -> None:
        self.max_texts_in_flight = max_texts_in_flight  # 0: no limit
        self.max_queue_wait_s = max_queue_wait_s  # 0: no limit
        self.texts_in_flight = 0
        self._models: dict[str, WaitEstimate] = {}

    def check(self, model: str, texts: int) -> None:
        """Refuse ``texts`` more for ``model`` now (PayloadTooLarge, Overloaded), or return."""
        limit = self.max_texts_in_flight
        if limit and texts > limit:
            raise PayloadTooLarge(f"{texts} texts exceed the server's limit of {limit} texts in flight (max_texts_in_flight)")
        if limit and self.texts_in_flight + texts > limit:
            raise Overloaded(f"server busy: {self.texts_in_flight} texts in flight, limit {limit}; retry later")
        bound = self.max_queue_wait_s
        estimate = self._models.get(model)
        if bound and estimate is not None:
            wait = estimate.predicted_wait(texts, time.monotonic())
            if wait > bound:
                raise Overloaded(f"model {model} busy: {estimate.texts_in_flight} texts in flight would keep this request waiting about {wait:.2f} s, over the bound of {bound:g} s (max_queue_wait_s); retry later")

    @contextlib.contextmanager
    def admitted(self, model: str, texts: int, arrived: float | None = None) -> Iterator[None]:
        """Hold ``texts`` of ``model`` in flight for the block (refused at once if they do not
        fit); when the block ends other than by cancellation they count as answered.
        ``arrived``: when the server read their request (``time.monotonic()``), so that the
        bound covers what comes before the block (reading, parsing, tokenizing) too."""
        self.check(model, texts)
        if not self.max_queue_wait_s:  # no bound: nothing to estimate
            self.texts_in_flight += texts
            try:
                yield
            finally:
                self.texts_in_flight -= texts
            return
        estimate = self._models.get(model) or self._models.setdefault(model, WaitEstimate())
        start = time.monotonic()
        predicted = estimate.mean_wait(texts, start) if estimate.texts_in_flight else None
        estimate.started(texts, start)
        self.texts_in_flight += texts
        answered = False
        try:
            yield
            answered = True
        except Exception:
            answered = True  # the engine answered (with an error): it was served as fast
            raise
        finally:
            self.texts_in_flight -= texts
            now = time.monotonic()
            estimate.ended(texts, answered, now, now - (start if arrived is None else arrived), predicted)
