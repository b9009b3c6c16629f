"""The wait a frontend predicts for a new request (``muxserve.serving.admission``), from the texts
in flight and the rate of answers, on explicit clocks; the server's refusals at the bound are in
tests/test_limits.py."""

from __future__ import annotations

import asyncio

import pytest

from muxserve.serving.admission import RATE_WINDOW_S, TAIL_EVERY_S, Admission, ReceivingBudget, WaitEstimate
from muxserve.serving.errors import Overloaded, PayloadTooLarge
from muxserve.serving.http.wire import receive_body


def test_predicted_wait_follows_the_rate_of_answers():
    w = WaitEstimate()
    w.started(10, 0.0)
    assert w.predicted_wait(1, 0.3) == pytest.approx(0.3)  # no answer yet: as long as the oldest waited
    w.ended(5, True, 0.5, 0.5)  # 5 texts answered in 0.5 s: 10 a second
    assert w.predicted_wait(1, 0.5) == pytest.approx((5 + 1) / 10)
    w.ended(5, False, 0.6, 0.6)  # cancelled: in flight no more, not an answer
    assert w.predicted_wait(1, 0.7) == 0.0


def test_a_new_busy_period_and_the_window_forget_old_answers():
    w = WaitEstimate()
    w.started(100, 0.0)
    w.ended(100, True, 0.1, 0.1)  # fast, long ago
    w.started(4, 50.0)  # a new busy period: nothing known of its rate yet
    assert w.predicted_wait(1, 50.25) == pytest.approx(0.25)
    w.ended(2, True, 51.0, 1.0)
    assert w.predicted_wait(1, 51.0) == pytest.approx((2 + 1) / (2 / 1.0))
    # the answer leaves the window: as long as the oldest (from the busy period's start) waited
    assert w.predicted_wait(1, 51.0 + RATE_WINDOW_S + 0.1) == pytest.approx(1.0 + RATE_WINDOW_S + 0.1)


def test_the_tail_factor_scales_the_mean_wait_to_the_99th_percentile():
    """The 99th percentile of the answers' time in the server over the mean wait predicted at
    their admission."""
    w = WaitEstimate()
    w.started(200, 0.0)
    for _ in range(99):  # 99 answers that took the 0.1 s predicted for them and one that took 3x
        w.ended(1, True, 1.0, 0.1, 0.1)
    w.ended(1, True, 1.0, 0.3, 0.1)
    assert w.tail_factor(1.0) == pytest.approx(1.0)  # the 99th percentile is still 1x
    w.ended(1, True, 1.0, 0.3, 0.1)
    assert w.tail_factor(1.0) == pytest.approx(1.0)  # computed at most every TAIL_EVERY_S
    assert w.tail_factor(1.0 + TAIL_EVERY_S) == pytest.approx(3.0)
    w.ended(1, True, 1.0, 0.3)  # admitted before the rate was known: no ratio
    # 98 in flight; 102 answered in the 1.25 s of this busy period
    assert w.mean_wait(1, 1.0 + TAIL_EVERY_S) == pytest.approx((98 + 1) / (102 / (1.0 + TAIL_EVERY_S)))
    assert w.predicted_wait(1, 1.0 + TAIL_EVERY_S) == pytest.approx((98 + 1) / (102 / (1.0 + TAIL_EVERY_S)) * 3.0)


def test_the_tail_factor_covers_the_time_before_the_wait_and_a_biased_mean():
    """Time a request spends in the server before its texts are in flight (read, parsed,
    tokenized), and a mean prediction that runs short, count in the tail factor; one that runs
    long does not lower it below 1."""
    w = WaitEstimate()
    w.started(100, 0.0)
    for _ in range(100):
        w.ended(1, True, 1.0, 0.15, 0.1)
    assert w.tail_factor(1.0) == pytest.approx(1.5)
    w = WaitEstimate()
    w.started(100, 0.0)
    for _ in range(100):
        w.ended(1, True, 1.0, 0.05, 0.1)
    assert w.tail_factor(1.0) == pytest.approx(1.0)


def test_admission_limits():
    a = Admission(max_texts_in_flight=8, max_queue_wait_s=0.5)
    with pytest.raises(PayloadTooLarge):
        a.check("m", 9)
    with a.admitted("m", 6):
        with pytest.raises(Overloaded, match="texts in flight"):
            a.check("other", 3)
        a.check("other", 2)  # another model's queue: no wait of its own yet
    assert a.texts_in_flight == 0


async def test_bodies_arriving_in_pieces_share_the_receiving_budget():
    """Two HTTP bodies arriving in pieces at once: their bytes are held in the frontend's budget
    until each is whole; the piece that would pass it refuses its request (429, Retry-After);
    every byte is given back however a body ends."""
    budget = ReceivingBudget(100_000)
    first, second = asyncio.Queue(), asyncio.Queue()
    reading_first = asyncio.ensure_future(receive_body(first.get, b"100000", b"", 1 << 20, budget=budget))
    first.put_nowait({"type": "http.request", "body": b"a" * 50_000, "more_body": True})
    reading_second = asyncio.ensure_future(receive_body(second.get, b"80000", b"", 1 << 20, budget=budget))
    second.put_nowait({"type": "http.request", "body": b"b" * 30_000, "more_body": True})
    while budget.held < 80_000:
        await asyncio.sleep(0)
    second.put_nowait({"type": "http.request", "body": b"b" * 30_000, "more_body": True})  # 110,000 held: past it
    with pytest.raises(Overloaded) as refused:
        await reading_second
    assert refused.value.http_status == 429 and refused.value.retry_after and "max_receiving_bytes" in refused.value.message
    assert budget.held == 50_000  # the refused body's bytes are given back
    first.put_nowait({"type": "http.request", "body": b"a" * 50_000, "more_body": False})
    assert await reading_first == b"a" * 100_000
    assert budget.held == 0


async def test_a_body_stays_in_the_receiving_budget_until_its_answer():
    """An inference route holds its request's body (and what was parsed from it) until it
    answers: the body's bytes stay in the budget until then, so bodies waiting on the engine
    are bounded as much as bodies arriving; the request past it is refused (429)."""
    from types import SimpleNamespace

    from muxserve.serving.http.routes import InferenceRoutes
    from muxserve.serving.settings import Settings

    release = asyncio.Event()
    seen: list[int] = []

    async def classify(model, texts, parameters):
        seen.append(len(texts[0]))
        await release.wait()
        return [{"label": "ok"}]

    budget = ReceivingBudget(100_000)
    plane = SimpleNamespace(settings=Settings(), receiving=budget, classify=classify)
    routes = InferenceRoutes(None, plane)

    def call(chars: int) -> tuple[asyncio.Future, list[dict]]:
        body = b'{"model": "m", "inputs": ["%s"]}' % (b"x" * chars)
        scope = {"type": "http", "path": "/v1/classify", "method": "POST", "headers": [(b"content-length", b"%d" % len(body))], "muxserve.body_arrived": True}
        sent: list[dict] = []
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive():
            return next(messages, None) or await asyncio.Event().wait()

        async def send(message):
            sent.append(message)

        return asyncio.ensure_future(routes(scope, receive, send)), sent

    first, first_sent = call(60_000)
    while not seen:
        await asyncio.sleep(0)
    assert budget.held > 60_000  # the first body, held while its texts are in the engine
    second, second_sent = call(60_000)
    await second
    assert second_sent[0]["status"] == 429 and b"max_receiving_bytes" in second_sent[1]["body"]
    assert seen == [60_000] and budget.held > 60_000  # only the first reached the engine
    release.set()
    await first
    assert first_sent[0]["status"] == 200 and budget.held == 0
    third, third_sent = call(60_000)  # the budget is free again
    await third
    assert third_sent[0]["status"] == 200 and budget.held == 0
