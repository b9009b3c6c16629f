"""Observability in one place: Prometheus metrics and Triton-style statistics, updated together.

Every event is recorded once, by a ``ModelMonitor``, into both the Prometheus metrics (exported
at ``/metrics``) and the counters behind ``/v2/models/{m}/stats`` and gRPC ``ModelStatistics``,
so the two always agree.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from muxserve.serving.scheduler import BatchReport

# millisecond-scale latencies up to tens of seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
THROUGHPUT_WINDOW_S = 10.0
# reasons a request to a loaded model version can fail with (errors.py, and "cancelled" when the
# caller went away); exported at zero from the start, so that the first failure shows in rate()
FAILURE_REASONS = ("bad_request", "queue_full", "overloaded", "not_ready", "internal", "cancelled")
# the sliding window counts texts in bins of this width: its memory is bounded by
# THROUGHPUT_WINDOW_S / THROUGHPUT_BIN_S entries however many requests arrive
THROUGHPUT_BIN_S = 0.1

# the *_created series double the exposition for no use here
disable_created_metrics()


class Metrics:
    """The Prometheus metric families (one registry per server, so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, mv = self.registry, ["model", "version"]
        self.requests = Counter("muxserve_requests_total", "Inference requests by outcome (success, failure) and failure reason", [*mv, "outcome", "reason"], registry=r)
        self.texts = Counter("muxserve_inference_texts_total", "Texts inferred successfully (one per input element)", mv, registry=r)
        self.executions = Counter("muxserve_executions_total", "Forward passes executed", mv, registry=r)
        self.failed_executions = Counter("muxserve_failed_executions_total", "Forward passes that raised", mv, registry=r)
        self.queue_seconds = Histogram("muxserve_queue_duration_seconds", "Time a text waited in the queue before its forward pass", mv, buckets=LATENCY_BUCKETS, registry=r)
        self.tokenize_seconds = Histogram("muxserve_tokenize_duration_seconds", "Time to tokenize one request", mv, buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("muxserve_compute_duration_seconds", "Duration of one forward pass", mv, buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("muxserve_request_duration_seconds", "End-to-end duration of one request in the data plane", mv, buckets=LATENCY_BUCKETS, registry=r)
        self.group_fill = Histogram("muxserve_mux_group_fill_ratio", "Texts per mux group over N, per forward pass", mv, buckets=FILL_BUCKETS, registry=r)
        self.batch_texts = Histogram("muxserve_batch_texts", "Texts per forward pass", mv, buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("muxserve_queue_depth_texts", "Texts waiting in the queue", mv, registry=r)
        self.ready = Gauge("muxserve_model_ready", "1 if the model version is loaded and serving", mv, registry=r)
        self.info = Gauge("muxserve_model_info", "Static facts of a model: mux width N and its plain baseline", [*mv, "num_instances", "baseline"], registry=r)
        self.throughput = Gauge("muxserve_throughput_texts_per_second", f"Texts/s over the last {THROUGHPUT_WINDOW_S:.0f} s (for people without Prometheus)", mv, registry=r)
        self.baseline_ratio = Gauge("muxserve_baseline_throughput_ratio", f"Throughput of a mux model over that of its baseline, last {THROUGHPUT_WINDOW_S:.0f} s", ["model", "baseline"], registry=r)
        self.shadow_texts = Counter("muxserve_shadow_texts_total", "Texts of a mux model also run through its baseline (shadow sampling)", ["model", "baseline"], registry=r)
        self.shadow_agreements = Counter("muxserve_shadow_agreements_total", "Shadow-sampled texts whose mux label equals the baseline label", ["model", "baseline"], registry=r)
        self.shadow_dropped = Counter("muxserve_shadow_dropped_total", "Sampled texts not compared: shadow queue full or baseline pass failed", ["model", "baseline"], registry=r)
        self.family_texts = Counter("muxserve_family_texts_total", "Texts a model family served, by the mux width N that served them", ["family", "num_instances"], registry=r)
        self.family_expected_accuracy = Gauge("muxserve_family_expected_accuracy", "Members' recorded dev accuracy, weighted by their share of the family's texts in the last minute", ["family"], registry=r)
        self.family_num_instances = Gauge("muxserve_family_num_instances", "The mux width N the family's controller chooses now", ["family"], registry=r)
        self.family_arrival_rate = Gauge("muxserve_family_arrival_texts_per_second", "Arrival rate the family's controller sees (texts/s)", ["family"], registry=r)
        self.family_capacity = Gauge("muxserve_family_member_capacity_texts_per_second", "A member's capacity at full batches as the controller has learned it", ["family", "num_instances"], registry=r)
        self.shadow_agreement = Gauge("muxserve_shadow_agreement_ratio", "Agreement rate of mux and baseline labels over all shadow-sampled texts", ["model", "baseline"], registry=r)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStatistics:
    """Triton's per-model statistics (InferStatistics + batch stats)."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batch: dict[int, Duration] = field(default_factory=dict)  # batch size -> compute_infer


class ModelMonitor:
    """Records one model version's events into Prometheus metrics and Triton statistics."""

    def __init__(self, metrics: Metrics, model: str, version: str, num_instances: int | str, baseline: str = "") -> None:
        self.metrics = metrics
        self.model, self.version, self.baseline = model, version, baseline
        self.labels = {"model": model, "version": version}
        self.stats = ModelStatistics()
        self._lock = threading.Lock()
        self._recent: deque[list] = deque()  # [bin start, texts] for the sliding window, oldest first
        metrics.info.labels(**self.labels, num_instances=str(num_instances), baseline=baseline).set(1)
        # create the label sets at zero so rate() works from the first scrape
        for name in (metrics.texts, metrics.executions, metrics.failed_executions):
            name.labels(**self.labels)
        # the per-request series, looked up once (a label lookup costs more than the update)
        self._succeeded = metrics.requests.labels(**self.labels, outcome="success", reason="")
        self._failed = {reason: metrics.requests.labels(**self.labels, outcome="failure", reason=reason) for reason in FAILURE_REASONS}
        self._texts = metrics.texts.labels(**self.labels)
        self._request_seconds = metrics.request_seconds.labels(**self.labels)
        self._tokenize_seconds = metrics.tokenize_seconds.labels(**self.labels)

    def set_ready(self, ready: bool) -> None:
        self.metrics.ready.labels(**self.labels).set(1 if ready else 0)

    def set_queue_depth(self, texts: int) -> None:
        self.metrics.queue_depth.labels(**self.labels).set(texts)

    def tokenized(self, seconds: float) -> None:
        self._tokenize_seconds.observe(seconds)
        with self._lock:
            self.stats.compute_input.add(seconds)

    def request_succeeded(self, texts: int, seconds: float) -> None:
        self._succeeded.inc()
        self._texts.inc(texts)
        self._request_seconds.observe(seconds)
        now = time.time()
        with self._lock:
            self.stats.inference_count += texts
            self.stats.success.add(seconds)
            self.stats.last_inference_ms = int(now * 1000)
            self._count_recent(time.monotonic(), texts)

    def request_failed(self, reason: str, seconds: float) -> None:
        series = self._failed.get(reason)
        (series or self.metrics.requests.labels(**self.labels, outcome="failure", reason=reason)).inc()
        with self._lock:
            self.stats.fail.add(seconds)

    def batch_done(self, report: BatchReport) -> None:
        m = self.metrics
        if report.failed:
            m.failed_executions.labels(**self.labels).inc()
        m.executions.labels(**self.labels).inc()
        m.compute_seconds.labels(**self.labels).observe(report.compute_seconds)
        m.batch_texts.labels(**self.labels).observe(report.texts)
        m.group_fill.labels(**self.labels).observe((report.rows or report.texts) / (report.groups * report.num_instances))
        queue_hist = m.queue_seconds.labels(**self.labels)
        for q in report.queue_seconds:
            queue_hist.observe(q)
        with self._lock:
            self.stats.execution_count += 1
            self.stats.queue.add(sum(report.queue_seconds), len(report.queue_seconds))
            self.stats.compute_infer.add(report.compute_seconds)
            self.stats.batch.setdefault(report.rows or report.texts, Duration()).add(report.compute_seconds)

    def snapshot(self) -> ModelStatistics:
        """A consistent copy of the statistics (the engine thread's observer may be writing)."""
        with self._lock:
            return copy.deepcopy(self.stats)

    def _count_recent(self, now: float, texts: int) -> None:
        """Add texts to the current bin and drop bins that left the window (lock held)."""
        start = now - now % THROUGHPUT_BIN_S
        if self._recent and self._recent[-1][0] == start:
            self._recent[-1][1] += texts
        else:
            self._recent.append([start, texts])
        while self._recent[0][0] < now - THROUGHPUT_WINDOW_S - THROUGHPUT_BIN_S:
            self._recent.popleft()

    def throughput(self, window_s: float = THROUGHPUT_WINDOW_S) -> float:
        """Texts/s served over the last ``window_s`` seconds (at most THROUGHPUT_WINDOW_S)."""
        cutoff = time.monotonic() - window_s
        with self._lock:
            texts = sum(n for start, n in self._recent if start >= cutoff)
        return texts / window_s


def refresh_throughput(metrics: Metrics, monitors: dict[str, ModelMonitor]) -> None:
    """Update the sliding-window throughput gauges and mux/baseline ratios (called on scrape)."""
    by_model: dict[str, float] = {}
    for monitor in monitors.values():
        tps = monitor.throughput()
        metrics.throughput.labels(**monitor.labels).set(tps)
        by_model[monitor.model] = by_model.get(monitor.model, 0.0) + tps
    for monitor in monitors.values():
        if monitor.baseline and monitor.baseline in by_model:
            base = by_model[monitor.baseline]
            # NaN, not 0, while the baseline serves nothing: the ratio is unknown, not zero
            metrics.baseline_ratio.labels(model=monitor.model, baseline=monitor.baseline).set(by_model[monitor.model] / base if base > 0 else float("nan"))
