"""A model family: one endpoint served by members of different mux widths N, the width chosen
per batch by the load (``LoadController``).

Every text is served at ``min(N chosen, its max_num_instances)``, rounded down to a member's N.
A batch holds texts of one width; it is the width of the oldest waiting text, which always
goes in the next batch: so texts are answered in arrival order as far as the widths allow, and
none starves (a text with a narrower limit waits at most for the batch ahead of it). A short
group is filled by the serving member's own policy, as when that member serves alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from muxserve.serving.controller import LoadController
from muxserve.serving.errors import BadRequest
from muxserve.serving.scheduler import BatchReport, MuxScheduler, QueuedRequest, RequestOptions, RunBatch, TokenBudget, _Text, run_texts

log = logging.getLogger("muxserve")


@dataclass
class FamilyMember:
    """A member as the family runs it: its engine, and its batching as when it serves alone."""

    num_instances: int
    name: str
    run_batch: RunBatch
    batch_texts: int
    token_budget: TokenBudget | None = None


class FamilyScheduler(MuxScheduler):
    def __init__(
        self,
        members: list[FamilyMember],
        controller: LoadController,
        max_queue_delay_s: float,
        max_queue_size: int = 0,
        length_aware: bool = True,
        observer: Callable[[BatchReport], None] | None = None,
        name: str = "family",
    ) -> None:
        self.members = {m.num_instances: m for m in sorted(members, key=lambda m: m.num_instances)}
        self.controller = controller
        self.report_to = observer
        self._plans: dict[int, int] = {}  # id(batch) -> its width
        first = self.members[min(self.members)]
        # one pass at a time: the members share the machine
        super().__init__(first.run_batch, first.num_instances, first.batch_texts, max_queue_delay_s, max_queue_size, 1, length_aware, self._batch_done, name, first.token_budget)

    def width(self, limit: int, chosen: int | None = None) -> int:
        """The member N a text with ``max_num_instances`` ``limit`` (0: none) is served at,
        while the controller chooses ``chosen``."""
        cap = chosen if chosen is not None else self.controller.current
        if limit:
            cap = min(cap, limit)
        fitting = [n for n in self.members if n <= cap]
        if not fitting:
            raise BadRequest(f"max_num_instances {limit} is below the narrowest member of family '{self.name}' (N={min(self.members)})")
        return fitting[-1]

    def enqueue(self, rows: list[list[int]], options: RequestOptions | None = None) -> QueuedRequest:
        if options is not None and options.max_num_instances:
            self.width(options.max_num_instances)  # refuse an impossible limit before queueing
        self.controller.arrived(time.monotonic(), len(rows))
        return super().enqueue(rows, options)

    def _split(self, queue: list[_Text]) -> tuple[list[_Text], list[_Text]]:
        if not queue:
            return [], []
        now, before = time.monotonic(), self.controller.current
        chosen = self.controller.choose(now, len(queue))
        if chosen != before:
            self._log_switch(now, before, chosen, len(queue))
        widths = [self.width(t.request.options.max_num_instances if t.request.options else 0, chosen) for t in queue]
        n = widths[0]
        self._batching_of(n)
        batch, _ = super()._split([t for t, w in zip(queue, widths, strict=True) if w == n])
        self._batching_of(chosen)  # what the next batch waits to fill
        self._plans[id(batch)] = n
        taken = {id(t) for t in batch}
        return batch, [t for t in queue if id(t) not in taken]

    def _log_switch(self, now: float, old: int, new: int, queued: int) -> None:
        load = self.controller.arrivals.estimate(now)
        capacities = ", ".join(f"N={n} {self.controller.capacity(n):.0f}" for n in self.members)
        log.info("family %s: N %d -> %d; arrivals %.0f texts/s (%.0f-%.0f), %d texts waiting; capacities %s texts/s", self.name, old, new, load.rate, load.low, load.high, queued, capacities)

    def _batching_of(self, n: int) -> None:
        self.batch_texts, self.token_budget = self.members[n].batch_texts, self.members[n].token_budget

    def _batch_num_instances(self, batch: list[_Text]) -> int:
        return self._plans.pop(id(batch))

    async def _forward(self, batch: list[_Text], n: int) -> np.ndarray:
        return await run_texts(self.members[n].run_batch, batch, n)

    def _batch_done(self, report: BatchReport) -> None:
        if not report.failed:
            self.controller.served(report.num_instances, report.rows or report.texts, report.compute_seconds)
        if self.report_to is not None:
            self.report_to(report)
