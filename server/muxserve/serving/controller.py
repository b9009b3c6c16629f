"""The load controller of a model family: which mux width N serves the next batch.

A pure class: it sees time only through the ``now`` its callers pass, so that tests drive it
with synthetic traces. Three inputs:

- the arrival rate (texts/s), read from the arrivals of the last 4 s over the longest window
  (0.1 to 4 s) that the shorter ones agree with, with Poisson bounds (``ArrivalRate``);
- the queue depth (texts waiting) at the moment of the decision;
- each member's capacity (texts/s at full batches), from a cost model of its forward pass
  (seconds = a + b * rows) fitted on the batches it serves, and on calibration passes timed
  at load until it has served any.

An N *fits* while its capacity covers the arrival rate with headroom and its predicted queue
delay (queue depth / its capacity) is within the target. The decision:

- up at once: when the current N no longer fits (the arrivals surely exceed its headroom, or
  its predicted delay is over the target), the next batch runs at the smallest N that fits the
  best estimate of the load: a step in the load goes straight to the member it needs, not one
  member at a time (to the widest member when none fits);
- down with hysteresis: only to an N that fits with the wider ``down_headroom`` margin (by the
  best estimate of the rate) and the shorter ``down_drain_share`` of the target, having done so
  for the hold without a break and that long after the last switch. The hold is ``hold_s``,
  raised to ``max_hold_s`` by a step down undone within ``flap_window_s``, and halved for each
  ``flap_window_s`` past the first without one. The bounds keep a steady load near a threshold
  from crossing it on noise; the raised hold keeps even a load that does to at most two
  switches a minute.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# served batches weigh in the cost model with this factor of decay per batch (~30 batches' memory)
COST_DECAY = 0.97
CALIBRATION_KEPT_WEIGHT = 0.01
CALIBRATION_WEIGHT = 0.2  # a calibration point against a batch served: the first batches correct it at once
MAX_SWITCHES_KEPT = 1000


@dataclass
class ControllerSettings:
    target_delay_s: float = 0.5  # queue delay the family must keep under
    headroom: float = 0.85  # an N fits while the arrival rate is at most this share of its capacity
    down_headroom: float = 0.7  # ... and a smaller N is taken back only below this share
    drain_share: float = 1.0  # ... and while the queue drains within this share of the target
    down_drain_share: float = 0.5  # ... and within this share for a step down
    rate_windows_s: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
    confidence: float = 2.0  # the rate bounds, in standard deviations of a Poisson count
    hold_s: float = 0.5
    max_hold_s: float = 60.0
    flap_window_s: float = 60.0


@dataclass(frozen=True)
class RateEstimate:
    """Arrival rate in texts/s: the best estimate, and Poisson bounds around it."""

    rate: float
    low: float  # the arrivals surely exceed this rate
    high: float  # ... and surely stay under this one


class ArrivalRate:
    """Texts arrived over the last ``max(windows)`` seconds, read as a rate over the longest
    window that the shorter ones agree with.

    A long window gives a steady estimate while the load is steady; after a step, the recent
    windows disagree with it (a count outside the bounds of the longer window's rate), and the
    estimate comes from the longest window that holds only the new load: a step up or down
    shows within the shortest windows, while the noise of a steady load seldom moves it.
    Requests arrive as Poisson events of several texts each (compound Poisson): the variance of
    a count is the sum of the squared sizes of its requests, so that a client sending 64 texts
    at a time reads as a steady 64 texts a second, not as a step every second.
    Thread-safe: the metrics read it from another thread."""

    def __init__(self, windows: Sequence[float], z: float) -> None:
        if not windows or min(windows) <= 0:
            raise ValueError(f"rate windows must be > 0 s, got {windows}")
        self.windows = sorted(windows)
        self.z = z
        self._arrivals: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, now: float, texts: int) -> None:
        with self._lock:
            self._arrivals.append((now, texts))
            horizon = now - self.windows[-1]
            while self._arrivals[0][0] <= horizon:
                self._arrivals.popleft()

    def counts(self, now: float) -> list[tuple[int, int]]:
        """(texts, sum of squared request sizes) arrived in each window ``(now - w, now]``,
        shortest window first."""
        counts: list[tuple[int, int]] = []
        texts = squares = i = 0
        with self._lock:
            for at, k in reversed(self._arrivals):
                while i < len(self.windows) and at <= now - self.windows[i]:
                    counts.append((texts, squares))
                    i += 1
                if i == len(self.windows):
                    break
                if at <= now:
                    texts, squares = texts + k, squares + k * k
        return counts + [(texts, squares)] * (len(self.windows) - len(counts))

    def estimate(self, now: float) -> RateEstimate:
        counts, z = self.counts(now), self.z
        j = len(self.windows) - 1
        while j > 0 and not self._agree(counts, j):
            j -= 1
        (k, q), w = counts[j], self.windows[j]
        size = q / k if k else 1.0  # mean request size, weighted by texts
        return RateEstimate(k / w, max(0.0, k - z * math.sqrt(q)) / w, (k + z * math.sqrt(q) + z * z * size) / w)

    def _agree(self, counts: list[tuple[int, int]], j: int) -> bool:
        """Every window shorter than window ``j`` holds a count within the bounds of j's rate."""
        (k, q), w = counts[j], self.windows[j]
        size = q / k if k else 1.0
        return all(abs(counts[i][0] - k * self.windows[i] / w) <= self.z * math.sqrt(q * self.windows[i] / w) + self.z**2 * size for i in range(j))


class CostModel:
    """Seconds of one forward pass as ``a + b * rows``, by weighted least squares over the
    batches served and calibration points, all decaying with each batch served. A calibration
    point (a pass timed outside the traffic, on sample rows) weighs a fifth of a batch served,
    so that the first batches served at load correct it, and also stays at a small weight for
    good, so that the slope is known even when every batch served has the same size. A fixed per-pass cost is why
    texts/s of the batches actually served says little: under light load they are small, and
    their rate is the arrival rate, not the capacity."""

    def __init__(self) -> None:
        self._kept = [0.0] * 5  # sums of w, w*x, w*x*x, w*y, w*x*y
        self._served = [0.0] * 5
        self.batches_served = 0

    @staticmethod
    def _add(sums: list[float], rows: float, seconds: float, weight: float = 1.0) -> None:
        for i, v in enumerate((1.0, rows, rows * rows, seconds, rows * seconds)):
            sums[i] += weight * v

    def calibrate(self, rows: int, seconds: float) -> None:
        self._add(self._kept, rows, seconds, CALIBRATION_KEPT_WEIGHT)
        self._add(self._served, rows, seconds, CALIBRATION_WEIGHT)

    def served(self, rows: int, seconds: float) -> None:
        self._served[:] = [v * COST_DECAY for v in self._served]
        self._add(self._served, rows, seconds)
        self.batches_served += 1

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
        self.calibrated = {n: CostModel() for n in self.members}  # calibration points alone
        self.arrivals = ArrivalRate(self.settings.rate_windows_s, self.settings.confidence)
        self._down_since: float | None = None
        self._raised_hold = self.settings.hold_s  # the hold as last raised by a step down undone
        self._last_undone = -math.inf
        self._last_switch = -math.inf

    # ------------------------------------------------------------------ inputs

    def arrived(self, now: float, texts: int) -> None:
        """``texts`` texts arrived at ``now``."""
        self.arrivals.add(now, texts)

    def calibrate(self, n: int, rows: int, seconds: float) -> None:
        """A timed pass outside the traffic (at load): kept as a point of member ``n``'s cost."""
        if n in self.costs and rows > 0 and seconds > 0:
            self.costs[n].calibrate(rows, seconds)
            self.calibrated[n].calibrate(rows, seconds)

    def served(self, n: int, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows ran at width ``n`` in ``seconds`` of compute."""
        if n in self.costs and rows > 0 and seconds > 0:
            self.costs[n].served(rows, seconds)

    # ------------------------------------------------------------------ estimates

    def rate(self, now: float) -> float:
        """Arrival rate (texts/s) at ``now``."""
        return self.arrivals.estimate(now).rate

    def capacity(self, n: int) -> float:
        """Texts/s member ``n`` serves at full batches, by its cost model. A member that has
        not served yet is assumed as much slower than its calibration as the served members
        are than theirs (calibration runs on an idle machine; the load that makes a wider member
        needed also loads the cores it runs on). Without calibration, N/N1 times the narrowest
        member's (the mux models' ideal scaling), else unbounded."""
        if self.costs[n].batches_served == 0 and self.calibrated[n].seconds(1) is not None:
            return self._full_batch_rate(self.calibrated[n], n) * self.slowdown()
        seconds = self.costs[n].seconds(self.batch_rows[n])
        if seconds is not None:
            return self.batch_rows[n] / seconds
        first = self.members[0]
        if n != first:
            base = self.capacity(first)
            return base * n / first
        return math.inf

    def slowdown(self) -> float:
        """The served members' capacity over their calibrated one, the lowest, at most 1."""
        ratios = [self._full_batch_rate(self.costs[m], m) / self._full_batch_rate(self.calibrated[m], m) for m in self.members if self.costs[m].batches_served and self.calibrated[m].seconds(1) is not None]
        return min([1.0, *ratios])

    def _full_batch_rate(self, model: CostModel, n: int) -> float:
        seconds = model.seconds(self.batch_rows[n])
        return self.batch_rows[n] / seconds if seconds else math.inf

    def predicted_delay(self, n: int, queued: int) -> float:
        """Seconds the texts waiting now would take to drain at member ``n``'s capacity."""
        return queued / self.capacity(n)

    def fits(self, n: int, rate: float, queued: int, headroom: float, drain_share: float) -> bool:
        """Member ``n`` covers ``rate`` texts/s within ``headroom`` of its capacity and drains
        ``queued`` texts within ``drain_share`` of the target."""
        return rate <= headroom * self.capacity(n) and self.predicted_delay(n, queued) <= drain_share * self.settings.target_delay_s

    # ------------------------------------------------------------------ the decision

    def choose(self, now: float, queued: int) -> int:
        """The width of the next batch, with ``queued`` texts waiting at ``now``."""
        s = self.settings
        load = self.arrivals.estimate(now)
        if not self.fits(self.current, load.low, queued, s.headroom, s.drain_share):
            wider = [n for n in self.members if n > self.current]
            if wider:  # straight to the member the load needs, by the best estimate of it
                self._switch(now, next((n for n in wider if self.fits(n, load.rate, queued, s.headroom, s.drain_share)), wider[-1]))
            return self.current
        narrower = [n for n in self.members if n < self.current and self.fits(n, load.rate, queued, s.down_headroom, s.down_drain_share)]
        if not narrower:
            self._down_since = None
            return self.current
        if self._down_since is None:
            self._down_since = now
        hold = self.hold(now)
        if now - self._down_since >= hold and now - self._last_switch >= hold:
            self._switch(now, narrower[0])
        return self.current

    def hold(self, now: float) -> float:
        """Seconds a step down waits: ``hold_s``, raised to ``max_hold_s`` by a step down undone
        within ``flap_window_s``, halved for each ``flap_window_s`` past the first without one
        (so that a load that stopped flapping gets its quick steps back)."""
        s = self.settings
        halvings = max(0, math.floor((now - self._last_undone) / s.flap_window_s) - 1) if math.isfinite(self._last_undone) else 0
        return max(s.hold_s, self._raised_hold / 2**min(halvings, 64))

    def _switch(self, now: float, new: int) -> None:
        last = self.switches[-1] if self.switches else None
        if last is not None and last.new < last.old and new > self.current and now - last.at <= self.settings.flap_window_s:
            self._raised_hold = self.settings.max_hold_s  # a step down undone
            self._last_undone = now
        self.switches.append(Switch(now, self.current, new))
        self.current = new
        self._last_switch = now
        self._down_since = None
