"""What a model family shows: texts by the N that served them, the N chosen now, the arrival
rate and members' capacities as the controller sees them, and the expected accuracy.

Expected accuracy: each member's recorded dev accuracy (``MODELS.json`` in the repository),
weighted by its share of the family's texts over the last minute; members without a record
are left out of the weighting. NaN while the family served nothing in the last minute.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping

from muxserve.serving.controller import LoadController
from muxserve.serving.observability.metrics import Metrics
from muxserve.serving.scheduler import BatchReport

ACCURACY_WINDOW_S = 60.0


class FamilyMonitor:
    def __init__(self, metrics: Metrics, family: str, controller: LoadController, accuracy: Mapping[int, float | None]) -> None:
        self.metrics = metrics
        self.family = family
        self.accuracy = dict(accuracy)
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, N, texts)
        self._lock = threading.Lock()
        for n in controller.members:
            metrics.family_texts.labels(family=family, num_instances=str(n))  # at zero from the start
            metrics.family_capacity.labels(family=family, num_instances=str(n)).set_function(lambda n=n: controller.capacity(n))
        metrics.family_expected_accuracy.labels(family=family).set_function(self.expected_accuracy)
        metrics.family_num_instances.labels(family=family).set_function(lambda: controller.current)
        metrics.family_arrival_rate.labels(family=family).set_function(lambda: controller.rate(time.monotonic()))

    def batch_done(self, report: BatchReport) -> None:
        if report.failed:
            return
        self.metrics.family_texts.labels(family=self.family, num_instances=str(report.num_instances)).inc(report.texts)
        with self._lock:
            self._recent.append((time.monotonic(), report.num_instances, report.texts))

    def shares(self, window_s: float = ACCURACY_WINDOW_S) -> dict[int, int]:
        """Texts per N over the last ``window_s`` seconds."""
        cutoff = time.monotonic() - window_s
        counts: dict[int, int] = {}
        with self._lock:
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            for _, n, texts in self._recent:
                counts[n] = counts.get(n, 0) + texts
        return counts

    def expected_accuracy(self) -> float:
        known = {n: texts for n, texts in self.shares().items() if self.accuracy.get(n) is not None}
        total = sum(known.values())
        if not total:
            return math.nan
        return sum(self.accuracy[n] * texts for n, texts in known.items()) / total
