"""The load controller of a model family: which mux width N serves the next batch.

A pure class: it sees time only through the ``now`` its callers pass, so that tests drive it
with synthetic traces. Three inputs:

- the arrival rate (texts/s), an exponentially weighted rate with time constant ``rate_tau_s``;
- the queue depth (texts waiting) at the moment of the decision;
- each member's capacity (texts/s at full batches), from a cost model of its forward pass
  (seconds = a + b * rows) fitted on the batches it serves, and on calibration passes timed
  at load until it has served any.

The decision: the smallest N that *fits*, i.e. whose capacity covers the arrival rate with
headroom and drains the present queue within the target delay. Hysteresis:

- up at once: when the current N no longer fits, the next batch runs at the smallest N that
  does (or the widest member when none does);
- down only when a smaller N fits with the wider ``down_headroom`` margin and an empty-ish
  queue, has done so for ``hold_s`` without a break, and ``hold_s`` has passed since the last
  switch; the hold doubles (up to ``max_hold_s``) each time a step down is undone within
  ``flap_window_s``, and returns to ``hold_s`` after a quiet ``flap_window_s``. This is what keeps a
  steady load near a threshold from switching more than twice a minute.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

# served batches weigh in the cost model with this factor of decay per batch (~30 batches' memory)
COST_DECAY = 0.97
CALIBRATION_KEPT_WEIGHT = 0.01
MAX_SWITCHES_KEPT = 1000


@dataclass
class ControllerSettings:
    target_delay_s: float = 0.5  # queue delay the family must keep under
    headroom: float = 0.85  # an N fits while the arrival rate is at most this share of its capacity
    down_headroom: float = 0.7  # ... and a smaller N is taken back only below this share
    drain_share: float = 1.0  # ... and while the queue drains within this share of the target
    down_drain_share: float = 0.2  # ... and within this share for a step down
    rate_tau_s: float = 2.0
    hold_s: float = 4.0
    max_hold_s: float = 60.0
    flap_window_s: float = 60.0


class CostModel:
    """Seconds of one forward pass as ``a + b * rows``, by weighted least squares over the
    batches served and calibration points, all decaying with each batch served; a calibration
    point also stays at a small weight for good, so that the slope is known even when every
    batch served has the same size. A fixed per-pass cost is why
    texts/s of the batches actually served says little: under light load they are small, and
    their rate is the arrival rate, not the capacity."""

    def __init__(self) -> None:
        self._kept = [0.0] * 5  # sums of w, w*x, w*x*x, w*y, w*x*y
        self._served = [0.0] * 5

    @staticmethod
    def _add(sums: list[float], rows: float, seconds: float, weight: float = 1.0) -> None:
        for i, v in enumerate((1.0, rows, rows * rows, seconds, rows * seconds)):
            sums[i] += weight * v

    def calibrate(self, rows: int, seconds: float) -> None:
        self._add(self._kept, rows, seconds, CALIBRATION_KEPT_WEIGHT)
        self._add(self._served, rows, seconds)

    def served(self, rows: int, seconds: float) -> None:
        self._served[:] = [v * COST_DECAY for v in self._served]
        self._add(self._served, rows, seconds)

    def seconds(self, rows: int) -> float | None:
        """Predicted seconds of a pass of ``rows`` rows; None before any observation."""
        w, x, xx, y, xy = (k + s for k, s in zip(self._kept, self._served, strict=True))
        if w <= 0 or x <= 0:
            return None
        det = w * xx - x * x
        if det > 1e-9 * w * xx:
            b = (w * xy - x * y) / det
            a = (y - b * x) / w
            if b > 0 and a >= 0:
                return a + b * rows
        return y / x * rows  # one batch size seen, or a fit that makes no sense: pure per-row cost


@dataclass
class Switch:
    at: float
    old: int
    new: int


@dataclass
class LoadController:
    batch_rows: Mapping[int, int]  # the family's widths N -> rows of a full batch at that N
    settings: ControllerSettings = field(default_factory=ControllerSettings)

    def __post_init__(self) -> None:
        self.members = sorted(self.batch_rows)
        if not self.members or self.members[0] < 1 or min(self.batch_rows.values()) < 1:
            raise ValueError(f"a family needs members with N >= 1 and batches of >= 1 row, got {dict(self.batch_rows)}")
        self.current = self.members[0]
        self.switches: deque[Switch] = deque(maxlen=MAX_SWITCHES_KEPT)
        self.costs = {n: CostModel() for n in self.members}
        self._rate = 0.0
        self._rate_at: float | None = None
        self._down_since: float | None = None
        self._hold = self.settings.hold_s
        self._last_switch = -math.inf

    # ------------------------------------------------------------------ inputs

    def arrived(self, now: float, texts: int) -> None:
        """``texts`` texts arrived at ``now``."""
        self._rate = self.rate(now) + texts / self.settings.rate_tau_s
        self._rate_at = now

    def calibrate(self, n: int, rows: int, seconds: float) -> None:
        """A timed pass outside the traffic (at load): kept as a point of member ``n``'s cost."""
        if n in self.costs and rows > 0 and seconds > 0:
            self.costs[n].calibrate(rows, seconds)

    def served(self, n: int, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows ran at width ``n`` in ``seconds`` of compute."""
        if n in self.costs and rows > 0 and seconds > 0:
            self.costs[n].served(rows, seconds)

    # ------------------------------------------------------------------ estimates

    def rate(self, now: float) -> float:
        """Arrival rate (texts/s) at ``now``."""
        if self._rate_at is None:
            return 0.0
        return self._rate * math.exp(-max(0.0, now - self._rate_at) / self.settings.rate_tau_s)

    def capacity(self, n: int) -> float:
        """Texts/s member ``n`` serves at full batches, by its cost model; before it has one,
        N/N1 times the narrowest member's (the mux models' ideal scaling), else unbounded."""
        seconds = self.costs[n].seconds(self.batch_rows[n])
        if seconds is not None:
            return self.batch_rows[n] / seconds
        first = self.members[0]
        if n != first:
            base = self.capacity(first)
            return base * n / first
        return math.inf

    def fits(self, n: int, now: float, queued: int, headroom: float, drain_share: float) -> bool:
        cap = self.capacity(n)
        return self.rate(now) <= headroom * cap and queued / cap <= drain_share * self.settings.target_delay_s

    # ------------------------------------------------------------------ the decision

    def choose(self, now: float, queued: int) -> int:
        """The width of the next batch, with ``queued`` texts waiting at ``now``."""
        s = self.settings
        if now - self._last_switch > s.flap_window_s:
            self._hold = s.hold_s
        if not self.fits(self.current, now, queued, s.headroom, s.drain_share):
            wider = [n for n in self.members if n > self.current]
            if wider:
                self._switch(now, next((n for n in wider if self.fits(n, now, queued, s.headroom, s.drain_share)), wider[-1]))
            return self.current
        narrower = [n for n in self.members if n < self.current and self.fits(n, now, queued, s.down_headroom, s.down_drain_share)]
        if not narrower:
            self._down_since = None
            return self.current
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since >= self._hold and now - self._last_switch >= self._hold:
            self._switch(now, narrower[0])
        return self.current

    def _switch(self, now: float, new: int) -> None:
        last = self.switches[-1] if self.switches else None
        if last is not None and last.new < last.old and new > self.current and now - last.at <= self.settings.flap_window_s:
            self._hold = min(self.settings.max_hold_s, 2 * self._hold)  # a step down undone: hold longer
        self.switches.append(Switch(now, self.current, new))
        self.current = new
        self._last_switch = now
        self._down_since = None
