"""The family scheduler against fake members whose output row encodes its input row: every text
gets its own row, a capped text is never served wider, every batch holds the oldest waiting
text (fair order, no starvation), and an ensembled text costs N rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from muxserve.serving.controller import ControllerSettings, LoadController
from muxserve.serving.errors import BadRequest
from muxserve.serving.family import FamilyMember, FamilyScheduler
from muxserve.serving.scheduler import BatchReport, RequestOptions

BATCH = {1: 4, 2: 8, 5: 10}


class Members:
    """One fake engine per N; records (N, rows) of every pass."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, list[list[int]]]] = []

    def member(self, n: int) -> FamilyMember:
        async def run(rows: list[list[int]]) -> np.ndarray:
            self.passes.append((n, rows))
            await asyncio.sleep(0.001)
            return np.array([[sum(r), len(r)] for r in rows], dtype=np.float32)

        return FamilyMember(n, f"m{n}", run, BATCH[n])


def family(members: Members, target_s: float, reports: list[BatchReport] | None = None) -> FamilyScheduler:
    controller = LoadController(BATCH, ControllerSettings(target_delay_s=target_s))
    for n, rows in BATCH.items():  # as the registry times each member at load
        controller.calibrate(n, rows, 0.01)
    scheduler = FamilyScheduler([members.member(n) for n in BATCH], controller, max_queue_delay_s=0.0, observer=None if reports is None else reports.append)
    scheduler.start()
    return scheduler


async def test_capped_texts_stay_narrow_and_every_batch_holds_the_oldest_text() -> None:
    """A target so small that any queue is beyond N=1: the load goes wide, capped texts do not."""
    members = Members()
    s = family(members, target_s=1e-9)
    requests = [[[1000 + 10 * i + j] for j in range(1 + i % 3)] for i in range(40)]  # each text's id is unique
    options = [RequestOptions(max_num_instances=1 if i % 4 == 0 else 0) for i in range(40)]
    results = await asyncio.gather(*(s.submit(rows, o) for rows, o in zip(requests, options, strict=True)))
    for rows, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, np.array([[sum(r), len(r)] for r in rows], dtype=np.float32))
    for i, o in enumerate(options):
        assert (set(o.num_instances) == {1}) if i % 4 == 0 else (max(o.num_instances) > 1)
    capped = {r[0] for i, rows in enumerate(requests) if i % 4 == 0 for r in rows}
    waiting = sorted(r[0] for rows in requests for r in rows)  # arrival order = id order
    for n, rows in members.passes:
        ids = {r[0] for r in rows}
        assert waiting[0] in ids, "a batch skipped the oldest waiting text"
        assert n == 1 or not ids & capped
        waiting = [t for t in waiting if t not in ids]
    assert not waiting
    await s.stop()


async def test_an_ensembled_text_is_n_rows_of_its_own() -> None:
    members, reports = Members(), []
    s = family(members, target_s=1e-9, reports=reports)
    plain, ensembled = RequestOptions(), RequestOptions(ensemble=True)
    rows = [[7, 8], [9]]
    got = await asyncio.gather(s.submit(rows, plain), s.submit([[5, 5, 5]], ensembled))
    np.testing.assert_array_equal(got[1], [[15, 3]])  # the mean of its copies: its own row
    n = ensembled.num_instances[0]
    assert sum(1 for _, batch in members.passes for r in batch if r == [5, 5, 5]) == n
    assert sum(r.rows for r in reports) == 2 + n
    await s.stop()


async def test_a_cap_below_the_narrowest_member_is_refused() -> None:
    members = Members()
    s = FamilyScheduler([members.member(2), members.member(5)], LoadController({2: 8, 5: 10}), max_queue_delay_s=0.0)
    s.start()
    with pytest.raises(BadRequest, match="narrowest"):
        await s.submit([[1]], RequestOptions(max_num_instances=1))
    assert (await s.submit([[1]], RequestOptions(max_num_instances=3))).shape == (1, 2)
    await s.stop()
