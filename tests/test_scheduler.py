"""The mux scheduler against a fake engine whose output row encodes its input row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from muxserve.serving.errors import InferenceFailed, NotReady, QueueFull
from muxserve.serving.scheduler import BatchReport, DecayingRate, MuxScheduler, TokenBudget, choose_batch, fill_target, queue_share


class FakeEngine:
    """Row i of the output = [sum(ids), len(ids)]; records every batch it ran. A gated engine holds
    every pass until ``release()``, so a test can fill the queue while the engine is busy."""

    def __init__(self, gated: bool = False, fail_when: int | None = None) -> None:
        self.batches: list[list[list[int]]] = []
        self.fail_when = fail_when  # a batch containing this token id raises
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, rows: list[list[int]]) -> np.ndarray:
        self.batches.append(rows)
        await asyncio.sleep(0)  # a pass yields to the loop, as the real engine's thread does
        await self.gate.wait()
        if self.fail_when is not None and any(self.fail_when in r for r in rows):
            raise RuntimeError("boom")
        return np.array([[sum(r), len(r)] for r in rows], dtype=np.float32)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the event loop run until ``condition`` holds (no timers involved)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def make(engine: FakeEngine, **kw: object) -> MuxScheduler:
    args = dict(num_instances=2, batch_texts=8, max_queue_delay_s=0.05, max_queue_size=0)
    args.update(kw)
    s = MuxScheduler(engine, **args)
    s.start()
    return s


def expected(rows: list[list[int]]) -> np.ndarray:
    return np.array([[sum(r), len(r)] for r in rows], dtype=np.float32)


async def test_texts_from_many_requests_share_one_pass_and_get_their_own_rows() -> None:
    engine = FakeEngine()
    s = make(engine, batch_texts=8, max_queue_delay_s=3600.0)  # a full batch runs at once: no waiting for the delay
    requests = [[[i * 10 + j] * (1 + j) for j in range(2)] for i in range(4)]  # 4 requests x 2 texts = 8 texts
    results = await asyncio.gather(*(s.submit(r) for r in requests))
    assert len(engine.batches) == 1 and len(engine.batches[0]) == 8
    for rows, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, expected(rows))
    await s.stop()


async def test_partial_batch_runs_after_max_queue_delay() -> None:
    engine = FakeEngine()
    s = make(engine, batch_texts=64, max_queue_delay_s=0.1)
    t0 = time.monotonic()
    out = await s.submit([[1, 2, 3]])
    waited = time.monotonic() - t0
    np.testing.assert_array_equal(out, expected([[1, 2, 3]]))
    assert waited >= 0.1  # never before its deadline (that it runs at all: the batch is not full)
    await s.stop()


async def test_batch_never_exceeds_capacity_and_nothing_is_lost() -> None:
    engine = FakeEngine()
    s = make(engine, batch_texts=6, max_queue_delay_s=0.005)
    rng = np.random.default_rng(0)
    requests = [[list(rng.integers(1, 1000, size=int(rng.integers(1, 20)))) for _ in range(int(rng.integers(1, 9)))] for _ in range(200)]
    results = await asyncio.gather(*(s.submit(r) for r in requests))
    for rows, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, expected(rows))
    assert all(len(b) <= 6 for b in engine.batches)
    assert sum(len(b) for b in engine.batches) == sum(len(r) for r in requests)
    await s.stop()


async def test_queue_full_rejects_at_once() -> None:
    engine = FakeEngine(gated=True)
    s = make(engine, batch_texts=2, max_queue_delay_s=0.0, max_queue_size=2)
    first = asyncio.create_task(s.submit([[1], [2]]))
    await until(lambda: len(engine.batches) == 1, "the first request taken by the engine")
    waiting = [asyncio.create_task(s.submit([[3]])), asyncio.create_task(s.submit([[4]]))]
    await until(lambda: s.queued_requests == 2, "two requests queued")
    with pytest.raises(QueueFull, match="queue is full"):  # at once: the engine is still held
        await s.submit([[5]])
    engine.release()
    await asyncio.gather(first, *waiting)  # accepted ones are all answered
    await s.stop()


async def test_failing_pass_fails_only_its_own_requests() -> None:
    engine = FakeEngine(fail_when=666)
    s = make(engine, batch_texts=2, max_queue_delay_s=0.0)
    bad = asyncio.create_task(s.submit([[666], [1]]))
    with pytest.raises(InferenceFailed, match="forward pass failed") as info:
        await bad
    assert "boom" not in info.value.message  # the cause goes to the log, not to callers
    good = await s.submit([[7], [8]])
    np.testing.assert_array_equal(good, expected([[7], [8]]))
    await s.stop()


async def test_cancelled_request_is_not_computed() -> None:
    engine = FakeEngine(gated=True)
    s = make(engine, batch_texts=2, max_queue_delay_s=0.0)
    busy = asyncio.create_task(s.submit([[1], [2]]))
    await until(lambda: len(engine.batches) == 1, "the engine busy")  # the next request waits in the queue
    gone = asyncio.create_task(s.submit([[999], [998]]))
    await until(lambda: s.queue_depth == 2, "the request queued")
    gone.cancel()
    kept = asyncio.create_task(s.submit([[3]]))
    await until(lambda: gone.done(), "the cancellation")
    engine.release()
    await busy
    np.testing.assert_array_equal(await kept, expected([[3]]))
    assert all(999 not in r for b in engine.batches for r in b)
    assert s.queued_requests == 0
    await s.stop()


async def test_drain_answers_accepted_and_refuses_new() -> None:
    engine = FakeEngine(gated=True)
    s = make(engine, batch_texts=4, max_queue_delay_s=0.01)
    accepted = [asyncio.create_task(s.submit([[i]])) for i in range(10)]
    await until(lambda: len(engine.batches) == 1, "the first pass started")
    drained = asyncio.create_task(s.drain())
    await asyncio.sleep(0)  # drain() has begun
    with pytest.raises(NotReady):
        await s.submit([[42]])
    assert not drained.done() and not any(t.done() for t in accepted)
    engine.release()
    await drained
    assert all(t.done() and not t.exception() for t in accepted)
    await s.stop()


async def test_drain_with_engine_instances_finishing_together() -> None:
    """Two passes on two engine instances that complete in the same loop iteration: the
    scheduler still turns idle, so a drain (SIGTERM) returns."""
    gate = asyncio.Event()

    started: list[list[list[int]]] = []

    async def engine(rows: list[list[int]]) -> np.ndarray:
        started.append(rows)
        await gate.wait()
        return expected(rows)

    s = MuxScheduler(engine, num_instances=1, batch_texts=1, max_queue_delay_s=0.0, engine_instances=2)
    s.start()
    requests = [asyncio.create_task(s.submit([[i]])) for i in range(2)]
    await until(lambda: len(started) == 2, "both engine instances busy")
    gate.set()
    await asyncio.gather(*requests)
    await s.drain()  # returns (a hang here is the bug; pytest-timeout ends it)
    await s.stop()


async def test_length_aware_batches_pick_similar_lengths_in_arrival_order() -> None:
    engine = FakeEngine(gated=True)
    s = make(engine, batch_texts=4, max_queue_delay_s=3600.0)
    blocker = asyncio.create_task(s.submit([[1]] * 4))  # occupies the engine while the queue fills
    await until(lambda: len(engine.batches) == 1, "the engine busy")
    lengths = [7, 60, 5, 61, 8, 62, 6, 63]
    tasks = [asyncio.create_task(s.submit([[1] * n])) for n in lengths]
    await until(lambda: s.queue_depth == len(lengths), "the queue filled")
    engine.release()
    await asyncio.gather(blocker, *tasks)
    # closest to the oldest text (length 7), kept in arrival order: a pass picked by length from
    # a longer queue is not sorted into groups
    assert [len(r) for r in engine.batches[1]] == [7, 5, 8, 6]
    assert [len(r) for r in engine.batches[2]] == [60, 61, 62, 63]
    await s.stop()


@pytest.mark.parametrize("length_aware", [True, False])
async def test_a_pass_of_the_whole_queue_fills_its_groups_by_length(length_aware: bool) -> None:
    """Consecutive texts share a mux group, so a pass that takes every waiting text sorts them
    by length (length-aware batching on); each caller still gets its own row."""
    engine = FakeEngine(gated=True)
    s = make(engine, batch_texts=6, max_queue_delay_s=3600.0, length_aware=length_aware)
    blocker = asyncio.create_task(s.submit([[1]] * 6))
    await until(lambda: len(engine.batches) == 1, "the engine busy")
    requests = [[[3] * 7, [4] * 2], [[5] * 9], [[6] * 4, [7] * 1, [8] * 5]]
    tasks = [asyncio.create_task(s.submit(r)) for r in requests]
    await until(lambda: s.queue_depth == 6, "the queue filled")
    engine.release()
    results = await asyncio.gather(*tasks)
    await blocker
    lengths = [len(r) for r in engine.batches[1]]
    assert lengths == ([1, 2, 4, 5, 7, 9] if length_aware else [7, 2, 9, 4, 1, 5])
    for rows, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, expected(rows))
    await s.stop()


def test_choose_batch_overdue_first_then_closest_in_length() -> None:
    lengths = [10, 40, 11, 39, 30, 12, 41, 9]
    none_overdue = [False] * len(lengths)
    assert choose_batch(lengths, none_overdue, 3, length_aware=False) == [0, 1, 2]
    assert choose_batch(lengths, none_overdue, 4, length_aware=True) == [0, 2, 5, 7]
    # overdue texts go first whatever their length, the rest are closest to the oldest
    overdue = [True, True, False, False, True, False, False, False]
    assert choose_batch(lengths, overdue, 4, length_aware=True) == [0, 1, 2, 4]
    assert choose_batch(lengths, [True] * len(lengths), 3, length_aware=True) == [0, 1, 2]
    # a short queue is taken whole
    assert choose_batch([5, 50], [False, False], 4, length_aware=True) == [0, 1]


def test_token_budget_counts_groups_times_padded_length() -> None:
    budget = TokenBudget(256, group=5, pad_multiple=8, max_length=64)
    assert budget.cost(5, 8) == 8 and budget.cost(6, 8) == 16  # a started group costs a whole one
    assert budget.cost(10, 9) == 2 * 16  # padded to the next multiple of 8
    assert budget.cost(5, 100) == 64  # never past the model's max length
    assert TokenBudget(256, pad_multiple=0).cost(3, 33) == 3 * 48  # 0: the engine's length buckets
    assert not budget.full(256 * 5 - 1) and budget.full(256 * 5)  # the queue's unpadded tokens over N


def test_choose_batch_by_token_budget() -> None:
    budget = TokenBudget(64, pad_multiple=8)
    none = [False] * 12
    # short texts: as many as the budget holds (8 x 8 tokens), not a fixed count
    assert choose_batch([8] * 12, none, 32, True, budget) == list(range(8))
    # long texts: fewer per pass
    assert choose_batch([30] * 12, none, 32, True, budget) == [0, 1]
    # the cap on texts still holds
    assert choose_batch([2] * 12, none, 4, True, budget) == [0, 1, 2, 3]
    # length-aware: a text that would lengthen the pass past the budget is passed over for shorter ones
    assert choose_batch([16, 40, 16, 16, 16], none[:5], 32, True, budget) == [0, 2, 3, 4]
    # arrival order: the first text that does not fit ends the batch
    assert choose_batch([16, 16, 40, 16], none[:4], 32, False, budget) == [0, 1]
    # the oldest text always runs, even alone past the budget: nothing starves
    assert choose_batch([200, 8, 8], none[:3], 32, True, budget) == [0]
    assert choose_batch([200, 8, 8], none[:3], 32, False, budget) == [0]
    # overdue texts first, oldest first, as far as the budget goes
    overdue = [True, False, True, True, False]
    assert choose_batch([32, 8, 32, 32, 8], overdue, 32, True, budget) == [0, 2]
    # an overdue text that does not fit is not passed over for a newer, shorter one
    assert choose_batch([8, 40, 8, 8], [True, True, False, False], 32, True, budget) == [0]
    # a queue whose callers all went away between the wait and the take: an empty batch, in
    # every mode (the batching loop then waits again instead of dying)
    for aware in (True, False):
        assert choose_batch([], [], 32, aware, budget) == [] and choose_batch([], [], 32, aware) == []


async def test_a_queue_that_fills_the_token_budget_runs_without_waiting_for_the_delay() -> None:
    engine = FakeEngine()
    budget = TokenBudget(16, group=1, pad_multiple=8)
    s = make(engine, num_instances=1, batch_texts=64, max_queue_delay_s=3600.0, token_budget=budget)
    rows = [[i] * 8 for i in range(1, 5)]  # 32 tokens queued: two passes of 2 x 8
    got = await asyncio.wait_for(s.submit(rows), 60)
    np.testing.assert_array_equal(got, expected(rows))
    assert [len(b) for b in engine.batches] == [2, 2]
    await s.stop()


async def test_arrival_order_when_length_aware_is_off() -> None:
    engine = FakeEngine(gated=True)
    s = make(engine, batch_texts=4, max_queue_delay_s=3600.0, length_aware=False)
    blocker = asyncio.create_task(s.submit([[1]] * 4))
    await until(lambda: len(engine.batches) == 1, "the engine busy")
    lengths = [5, 60, 6, 61, 7, 62, 8, 63]
    tasks = [asyncio.create_task(s.submit([[1] * n])) for n in lengths]
    await until(lambda: s.queue_depth == len(lengths), "the queue filled")
    engine.release()
    await asyncio.gather(blocker, *tasks)
    assert [len(r) for r in engine.batches[1]] == [5, 60, 6, 61]
    await s.stop()


async def test_observer_sees_every_pass() -> None:
    reports: list[BatchReport] = []
    engine = FakeEngine()
    s = make(engine, batch_texts=4, max_queue_delay_s=0.01, observer=reports.append, num_instances=4)
    await asyncio.gather(*(s.submit([[i], [i + 1]]) for i in range(3)))
    assert sum(r.texts for r in reports) == 6
    assert sum(len(r.queue_seconds) for r in reports) == 6
    assert all(r.groups == -(-r.texts // 4) for r in reports)
    await s.stop()


def test_fill_target_is_what_arrives_while_the_other_instances_run_a_pass() -> None:
    assert fill_target(arrivals_per_s=1000, pass_seconds=0.04, instances=2, cap=160) == 20
    assert fill_target(arrivals_per_s=1000, pass_seconds=0.04, instances=1, cap=160) == 40
    assert fill_target(arrivals_per_s=10_000, pass_seconds=0.04, instances=2, cap=160) == 160  # at most a full batch
    assert fill_target(arrivals_per_s=0, pass_seconds=0.04, instances=2, cap=160) == 0  # nothing expected: no wait


def test_queue_share_is_an_even_share_in_whole_mux_groups() -> None:
    assert queue_share(64, free_instances=2, cap=160) == 32
    assert queue_share(63, free_instances=2, cap=160) == 32  # the first share rounds up
    assert queue_share(6, free_instances=2, cap=160, group=5) == 5  # whole groups of N = 5
    assert queue_share(400, free_instances=2, cap=160) == 160  # at most a full batch
    assert queue_share(64, free_instances=1, cap=160) == 160  # alone: the batch rule as ever
    assert queue_share(64, free_instances=0, cap=160) == 160


async def test_instances_free_together_share_the_queue() -> None:
    """Texts queued while both engine instances are free run as two passes side by side, not
    one pass of everything while the other instance idles."""
    engine = FakeEngine(gated=True)
    s = make(engine, num_instances=2, batch_texts=16, max_queue_delay_s=0.0, engine_instances=2)
    requests = [asyncio.create_task(s.submit([[i]])) for i in range(8)]  # queued before the batcher looks
    await until(lambda: len(engine.batches) == 2, "both instances computing")
    assert engine.batches == [[[i] for i in range(4)], [[i] for i in range(4, 8)]]
    engine.release()
    for i, got in enumerate(await asyncio.gather(*requests)):
        np.testing.assert_array_equal(got, expected([[i]]))
    await s.stop()


async def test_a_plain_model_does_not_share_the_queue() -> None:
    """N = 1: the free instance takes a full batch, as Triton's instances do."""
    engine = FakeEngine(gated=True)
    s = make(engine, num_instances=1, batch_texts=16, max_queue_delay_s=0.0, engine_instances=2)
    requests = [asyncio.create_task(s.submit([[i]])) for i in range(8)]
    await until(lambda: len(engine.batches) == 1, "a pass started")
    assert engine.batches == [[[i] for i in range(8)]]
    engine.release()
    await asyncio.gather(*requests)
    await s.stop()


async def test_a_lone_request_is_not_cut_between_free_instances() -> None:
    engine = FakeEngine()
    s = make(engine, num_instances=2, batch_texts=16, max_queue_delay_s=0.0, engine_instances=2)
    rows = [[i] for i in range(8)]
    np.testing.assert_array_equal(await s.submit(rows), expected(rows))
    assert engine.batches == [rows]
    await s.stop()


async def test_one_free_instance_takes_the_whole_batch() -> None:
    """While the other instance computes, the free one takes everything queued, up to a batch."""
    engine = FakeEngine(gated=True)
    s = make(engine, num_instances=1, batch_texts=16, max_queue_delay_s=0.0, engine_instances=2)
    first = asyncio.create_task(s.submit([[100]]))
    await until(lambda: len(engine.batches) == 1, "the first pass started")
    rest = [s.enqueue([[i]]) for i in range(8)]  # at once, in one loop iteration
    await until(lambda: len(engine.batches) == 2, "the second pass started")
    assert engine.batches[1] == [[i] for i in range(8)]
    engine.release()
    await first
    for i, request in enumerate(rest):
        np.testing.assert_array_equal(await request.future, expected([[i]]))
    await s.stop()


def test_decaying_rate_follows_a_steady_arrival_rate() -> None:
    rate = DecayingRate(seconds=0.5)
    for i in range(200):  # 10 texts every 10 ms: 1,000 texts/s
        rate.add(10, now=i * 0.01)
    assert rate.value(1.99) == pytest.approx(1000, rel=0.03)  # at the last arrival
    assert rate.value(2.0 + 5.0) < 10  # arrivals stopped: the rate decays away


class FixedFill(MuxScheduler):
    def __init__(self, *args: object, target: int, **kw: object) -> None:
        super().__init__(*args, **kw)
        self.target = target

    def fill_target(self) -> int:
        return self.target


async def one_pass_running(fill_wait_s: float, target: int) -> tuple[FakeEngine, FixedFill, asyncio.Task]:
    """Two engine instances, pass filling to ``target``; one pass holds one instance (no pass
    ran before it, so it went at once, alone)."""
    engine = FakeEngine(gated=True)
    s = FixedFill(engine, num_instances=1, batch_texts=8, max_queue_delay_s=0.0, engine_instances=2, fill_wait_s=fill_wait_s, target=target)
    s.start()
    first = asyncio.create_task(s.submit([[1]]))
    await until(lambda: len(engine.batches) == 1, "the first pass started")
    return engine, s, first


async def test_a_free_instance_waits_for_the_expected_texts_while_another_pass_runs() -> None:
    engine, s, first = await one_pass_running(fill_wait_s=3600.0, target=3)
    later = []
    for i in range(3):  # overdue at once (delay 0), but the other instance computes: fill to 3
        assert len(engine.batches) == 1
        later.append(asyncio.create_task(s.submit([[10 + i]])))
        await until(lambda i=i: s.queue_depth == i + 1 or len(engine.batches) == 2, "the text queued")
    await until(lambda: len(engine.batches) == 2, "the filled pass started")
    assert engine.batches[1] == [[10], [11], [12]]
    engine.release()
    results = await asyncio.gather(first, *later)
    for i, got in enumerate(results[1:]):
        np.testing.assert_array_equal(got, expected([[10 + i]]))
    await s.stop()


async def test_pass_filling_waits_a_bounded_time() -> None:
    engine, s, first = await one_pass_running(fill_wait_s=0.01, target=1000)
    second = asyncio.create_task(s.submit([[2]]))  # the target is never reached: it runs when the fill wait ends
    while len(engine.batches) < 2:
        await asyncio.sleep(0.001)
    engine.release()
    np.testing.assert_array_equal(await second, expected([[2]]))
    await first
    await s.stop()


async def test_pass_filling_ends_when_no_other_pass_runs() -> None:
    engine, s, first = await one_pass_running(fill_wait_s=3600.0, target=1000)
    second = asyncio.create_task(s.submit([[2]]))
    await until(lambda: s.queue_depth == 1, "the second text queued")
    assert len(engine.batches) == 1  # filling: the other instance computes
    engine.release()  # the first pass ends: the engine is idle, so the short pass goes (a hang here is the bug)
    np.testing.assert_array_equal(await second, expected([[2]]))
    await first
    await s.stop()
