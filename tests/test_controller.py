"""The family's load controller on synthetic arrival traces (steady, step, ramp, burst), served
by a simulated engine whose members have the served capacities measured for the bundled
models on a 2-core CPU: N=1 43 texts/s, N=2 77, N=5 159."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from muxserve.serving.controller import ArrivalRate, ControllerSettings, LoadController

CAPACITY = {1: 43.0, 2: 77.0, 5: 159.0}  # texts/s at a full batch
BATCH = {1: 32, 2: 64, 5: 160}
OVERHEAD_S = 0.01  # per forward pass
TARGET_S = 0.5


@dataclass
class Run:
    """What the simulated family did: per text (arrival, queue delay, N), the switches."""

    texts: list[tuple[float, float, int]] = field(default_factory=list)
    controller: LoadController | None = None

    def share(self, n: int, start: float, end: float) -> float:
        window = [t for t in self.texts if start <= t[0] < end]
        return sum(1 for t in window if t[2] == n) / len(window)

    def p99_delay(self, start: float, end: float) -> float:
        delays = sorted(t[1] for t in self.texts if start <= t[0] < end)
        return delays[int(0.99 * (len(delays) - 1))]

    def switch_times(self, start: float = 0.0, end: float = math.inf) -> list[float]:
        assert self.controller is not None
        return [s.at for s in self.controller.switches if start <= s.at < end]

    def first_time_at(self, predicate: Callable[[int], bool], after: float) -> float:
        """When the first batch after ``after`` ran at an N that satisfies ``predicate``."""
        return min(t[0] + t[1] for t in self.texts if t[0] + t[1] >= after and predicate(t[2]))


def arrivals(rate: Callable[[float], float], duration: float, poisson: bool, seed: int = 0) -> list[float]:
    """Arrival times of single texts at ``rate(t)`` texts/s (thinned Poisson, or evenly paced)."""
    rng = random.Random(seed)
    times, t = [], 0.0
    if poisson:
        peak = max(rate(x / 10) for x in range(int(duration * 10) + 1))
        while True:
            t += rng.expovariate(peak)
            if t >= duration:
                return times
            if rng.random() < rate(t) / peak:
                times.append(t)
    credit = 0.0
    step = 0.001
    while t < duration:
        credit += rate(t) * step
        while credit >= 1:
            times.append(t)
            credit -= 1
        t += step
    return times


def pass_seconds(n: int, rows: int) -> float:
    return OVERHEAD_S + rows / CAPACITY[n]


def simulate(times: list[float], settings: ControllerSettings | None = None, calibration_error: float = 1.3, seed: int = 0) -> Run:
    """One engine serving the family (texts with the same arrival time come as one request): when it is free, the controller picks N for the next
    batch of up to BATCH[N] waiting texts (oldest first). Passes take their true time +-10%;
    the calibration at load is off by ``calibration_error`` (a busy machine at start)."""
    rng = random.Random(seed)
    controller = LoadController(BATCH, settings or ControllerSettings(target_delay_s=TARGET_S))
    for n in CAPACITY:
        for rows in (1, BATCH[n]):
            controller.calibrate(n, rows, pass_seconds(n, rows) * calibration_error)
    run = Run(controller=controller)
    queue: list[float] = []
    i, now = 0, 0.0
    while i < len(times) or queue:
        while i < len(times) and times[i] <= now:
            j = i
            while j < len(times) and times[j] == times[i]:  # texts arriving together: one request
                j += 1
            controller.arrived(times[i], j - i)
            queue.extend(times[i:j])
            i = j
        if not queue:
            now = times[i]
            continue
        n = controller.choose(now, len(queue))
        batch, queue = queue[: BATCH[n]], queue[BATCH[n] :]
        seconds = pass_seconds(n, len(batch)) * rng.uniform(0.9, 1.1)
        run.texts.extend((t, now - t, n) for t in batch)
        now += seconds
        controller.served(n, len(batch), seconds)
    run.texts.sort()
    return run


def steps(*levels: tuple[float, float]) -> Callable[[float], float]:
    """A piecewise constant rate: (until, texts/s) pairs."""

    def rate(t: float) -> float:
        return next((r for until, r in levels if t < until), levels[-1][1])

    return rate


@pytest.mark.parametrize("poisson", [False, True])
def test_steady_low_load_stays_at_n1(poisson: bool) -> None:
    run = simulate(arrivals(steps((300, 5.0)), 300, poisson))
    assert run.share(1, 0, 300) == 1.0
    assert run.switch_times() == []


@pytest.mark.parametrize("level", [20.0, 35.0, 60.0, 70.0, 110.0, 130.0])
def test_steady_load_switches_at_most_twice_a_minute(level: float) -> None:
    """Poisson load at levels around each member's threshold: after the first minute, no more
    than 2 switches in any minute."""
    run = simulate(arrivals(steps((600, level)), 600, poisson=True, seed=int(level)))
    for minute in range(1, 10):
        assert len(run.switch_times(60 * minute, 60 * (minute + 1))) <= 2, (level, minute, run.switch_times())


@pytest.mark.parametrize(("texts", "per_s"), [(64, 0.5), (64, 1.0), (8, 3.0), (8, 4.0), (4, 8.0)])
def test_requests_of_many_texts_switch_at_most_twice_a_minute(texts: int, per_s: float) -> None:
    """Poisson requests of several texts each, some near N=1's capacity: a request arriving
    with others sometimes needs a wider member to stay within the target, but a steady load
    still switches at most twice a minute after the first. 64 texts at N=1 would take 1.5 s:
    those are served wider."""
    requests = arrivals(steps((600, per_s)), 600, poisson=True, seed=7)
    run = simulate(sorted(t for r in requests for t in [r] * texts))
    for minute in range(1, 10):
        assert len(run.switch_times(60 * minute, 60 * (minute + 1))) <= 2, (minute, run.switch_times())
    if texts == 64:
        assert run.share(1, 60, 600) < 0.05


def test_step_up_rises_within_seconds_and_keeps_the_target() -> None:
    run = simulate(arrivals(steps((60, 5.0), (120, 120.0), (180, 5.0)), 180, poisson=True))
    assert run.share(1, 0, 60) >= 0.99
    assert run.first_time_at(lambda n: n == 5, after=60) - 60 <= 5.0  # 120/s is beyond N=2's 77/s
    assert run.share(5, 70, 120) >= 0.95
    assert run.p99_delay(70, 120) <= TARGET_S


def test_step_up_goes_straight_to_the_member_it_needs() -> None:
    """5 -> 120 texts/s: beyond N=2's capacity, so the first switch after the step is to N=5,
    with no batch at N=2 on the way, within half a second; the whole step, its first second
    included, keeps p99 queue delay within the target."""
    run = simulate(arrivals(steps((60, 5.0), (120, 120.0), (180, 5.0)), 180, poisson=True))
    after_step = [s for s in run.controller.switches if 60 <= s.at < 120]
    assert [(s.old, s.new) for s in after_step] == [(1, 5)]
    assert after_step[0].at - 60 <= 0.5
    assert run.share(2, 60, 120) == 0
    assert run.p99_delay(60, 120) <= TARGET_S


def test_a_deep_queue_alone_jumps_to_the_member_that_drains_it() -> None:
    """At a low arrival rate, 60 texts waiting: N=1 would take 1.4 s and N=2 0.8 s to drain
    them, over the 0.5 s target, N=5 0.4 s: N=5, in one switch."""
    controller = LoadController(BATCH, ControllerSettings(target_delay_s=TARGET_S))
    for n in CAPACITY:
        controller.calibrate(n, BATCH[n], pass_seconds(n, BATCH[n]))
    for i in range(10):
        controller.arrived(i * 0.2, 1)
    assert controller.choose(2.0, 1) == 1
    assert controller.choose(2.0, 60) == 5
    assert [(s.old, s.new) for s in controller.switches] == [(1, 5)]


def test_the_rate_follows_a_step_within_the_shortest_window() -> None:
    rates = ArrivalRate((0.25, 0.5, 1.0, 2.0, 4.0), z=2.0)
    for i in range(400):  # 100 texts/s for 4 s
        rates.add(i / 100, 1)
    steady = rates.estimate(3.995)
    assert steady.rate == pytest.approx(100, rel=0.02) and steady.low < 100 < steady.high
    for i in range(1, 100):  # then 5 texts/s
        rates.add(4 + i / 5, 1)
        if 4 + i / 5 >= 4.6:
            assert rates.estimate(4 + i / 5).high < 40
    for i in range(100):  # then 200 texts/s
        rates.add(24 + i / 200, 1)
    assert rates.estimate(24.3).low > 100


def test_step_down_falls_back_to_n1() -> None:
    run = simulate(arrivals(steps((60, 120.0), (180, 5.0)), 180, poisson=True))
    assert run.first_time_at(lambda n: n == 1, after=60) - 60 <= 3.0
    assert run.share(1, 75, 180) >= 0.99


def test_step_between_neighbours_takes_the_middle_member() -> None:
    """45 texts/s: beyond N=1's capacity, within N=2's: served at N=2, not N=5."""
    run = simulate(arrivals(steps((30, 5.0), (150, 45.0)), 150, poisson=True))
    assert run.share(2, 45, 150) >= 0.95
    assert run.p99_delay(45, 150) <= TARGET_S


def test_ramp_widens_in_order_and_narrows_back() -> None:
    def rate(t: float) -> float:  # 0 -> 140 texts/s over 120 s, then back down over 120 s
        return 140 * (t / 120 if t < 120 else max(0.0, (240 - t) / 120))

    run = simulate(arrivals(rate, 240, poisson=True))
    widths = [(s.old, s.new) for s in run.controller.switches]
    ups = [w for w in widths if w[1] > w[0]]
    assert ups and ups[0][0] == 1 and max(new for _, new in ups) == 5
    assert run.controller.current == 1
    assert len(widths) <= 8
    assert run.p99_delay(0, 240) <= 2 * TARGET_S


def test_burst_is_drained_and_load_returns_to_n1() -> None:
    """300 texts at once on a 5 texts/s load: the queue alone widens N; nothing starves (every
    text is served, the oldest first), and N=1 is back within seconds."""
    times = sorted(arrivals(steps((120, 5.0)), 120, poisson=True) + [30.0] * 300)
    run = simulate(times)
    assert len(run.texts) == len(times)
    assert run.first_time_at(lambda n: n > 1, after=30) - 30 <= 1.0
    burst_delays = [d for t, d, _ in run.texts if t == 30.0]
    assert max(burst_delays) <= 3.0  # 300 texts at N=5 take ~2 s; at N=1 they would take 7
    assert run.share(1, 45, 120) >= 0.99


def test_capacity_is_learned_from_served_batches() -> None:
    """Small batches under light load measure the per-pass cost, not the capacity: the cost
    model separates the two and converges from a wrong calibration."""
    controller = LoadController(BATCH)
    assert controller.capacity(1) == math.inf  # nothing known: nothing ruled out
    controller.calibrate(1, 32, 2.0)
    assert controller.capacity(1) == 16.0
    assert controller.capacity(5) == 80.0  # unmeasured: ideal scaling from the narrowest member
    for rows in [1, 2, 1, 3, 8, 1, 2] * 30:
        controller.served(1, rows, pass_seconds(1, rows))
    assert controller.capacity(1) == pytest.approx(BATCH[1] / pass_seconds(1, BATCH[1]), rel=0.1)


def test_a_member_not_yet_served_is_as_much_slower_than_calibrated_as_the_served_ones() -> None:
    """Calibrated on an idle machine, N=1 then serves at half its calibrated speed (the load
    shares the cores): N=2 and N=5, not served yet, count at half their calibrated capacity,
    until they serve."""
    controller = LoadController(BATCH)
    for n in CAPACITY:
        for rows in (n, BATCH[n]):
            controller.calibrate(n, rows, pass_seconds(n, rows))
    calibrated = {n: controller.capacity(n) for n in CAPACITY}
    for rows in [1, 4, 32] * 20:
        controller.served(1, rows, 2 * pass_seconds(1, rows))
    assert controller.capacity(1) == pytest.approx(calibrated[1] / 2, rel=0.05)
    assert controller.capacity(5) == pytest.approx(calibrated[5] / 2, rel=0.05)
    for _ in range(20):
        controller.served(5, BATCH[5], pass_seconds(5, BATCH[5]))
    assert controller.capacity(5) == pytest.approx(calibrated[5], rel=0.05)  # served: its own


def test_members_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LoadController({0: 4, 2: 8})
