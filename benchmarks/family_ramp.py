"""The sst2 family under a load ramp, against sst2-mux5 alone, in one run on one machine.

Starts ``muxserve serve`` with the family (and so its members) on loopback. All load comes from
``wrk`` (KServe v2 JSON, one text per request):

1. capacity probes: each of sst2-mux2 and sst2-mux5 alone, closed loop;
2. the ramp on the family, paced: ``--low`` req/s for ``--phase`` s, then the high step
   (default: 1.6 x sst2-mux2's measured capacity, capped at 0.85 x sst2-mux5's), then ``--low``
   again; each phase ends when its last request is answered, so that it counts the texts it
   sent (figures after a ``--settle`` window at its start are reported beside);
3. sst2-mux5 alone at the same high rate, and both closed loop at their limit.

A sampler reads the server's ``/metrics`` every second: texts by the N that served them, the
family's queue-delay histogram, its expected accuracy. Prints and writes a JSON report, a
markdown summary and a plot (load, N-share, p99 queue delay, expected accuracy over time):

    python benchmarks/family_ramp.py --out docs/bench/family_ramp.json
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from muxserve.bench.native import http_load, run_wrk
from muxserve.bench.run import ROOT, counts_delta, default_sst2_dev, failures_except_cancelled, load_texts, machine_info, server_counts
from muxserve.launch import start_server

FAMILY, MUX2, MUX5 = "sst2", "sst2-mux2", "sst2-mux5"
WIDTHS = (1, 2, 5)


@dataclass
class Sample:
    at: float  # seconds since the ramp began
    texts: dict[int, float]  # family texts by N, cumulative
    queue_buckets: dict[float, float]  # family queue-delay histogram: le -> cumulative count
    expected_accuracy: float
    num_instances: float
    model_queue_buckets: dict[float, float] = field(default_factory=dict)  # sst2-mux5's
    queue_depth: float = 0.0  # family texts waiting


def scrape(url: str, t0: float) -> Sample:
    text = httpx.get(f"http://{url}/metrics", timeout=10).text
    texts: dict[int, float] = {}
    buckets: dict[float, float] = {}
    mux5: dict[float, float] = {}
    accuracy, width, depth = math.nan, math.nan, 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "muxserve_family_texts_total" and s.labels.get("family") == FAMILY:
                texts[int(s.labels["num_instances"])] = s.value
            elif s.name == "muxserve_queue_duration_seconds_bucket" and s.labels.get("model") in (FAMILY, MUX5):
                target = buckets if s.labels["model"] == FAMILY else mux5
                target[float(s.labels["le"])] = target.get(float(s.labels["le"]), 0.0) + s.value
            elif s.name == "muxserve_family_expected_accuracy" and s.labels.get("family") == FAMILY:
                accuracy = s.value
            elif s.name == "muxserve_family_num_instances" and s.labels.get("family") == FAMILY:
                width = s.value
            elif s.name == "muxserve_queue_depth_texts" and s.labels.get("model") == FAMILY:
                depth += s.value
    return Sample(time.monotonic() - t0, texts, buckets, accuracy, width, mux5, depth)


def drained(url: str, t0: float, timeout_s: float = 60.0) -> Sample:
    """Once the family has nothing waiting and served nothing more over 0.1 s: the sample then."""
    last = scrape(url, t0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = scrape(url, t0)
        if now.queue_depth == 0 and now.texts == last.texts:
            return now
        last = now
    raise RuntimeError(f"the family's queue did not drain within {timeout_s:.0f} s")


class Sampler(threading.Thread):
    """``scrape`` once a second until stopped."""

    def __init__(self, url: str, t0: float) -> None:
        super().__init__(daemon=True)
        self.url, self.t0 = url, t0
        self.samples: list[Sample] = []
        self.stopped = threading.Event()

    def start(self) -> None:
        self.samples.append(scrape(self.url, self.t0))  # the state before anything is measured
        super().start()

    def run(self) -> None:
        while not self.stopped.wait(1.0 - (time.monotonic() - self.t0) % 1.0):
            self.samples.append(scrape(self.url, self.t0))


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The ``q`` quantile of the observations between two histogram snapshots: the upper bound
    of the bucket it falls in (an upper estimate)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return math.nan
    return next(b for b, c in zip(bounds, counts, strict=True) if c >= q * counts[-1])


def share_within(before: dict[float, float], after: dict[float, float], bound: float) -> float:
    """Share of the observations between two snapshots at most ``bound`` (a bucket bound)."""
    total = after[math.inf] - before.get(math.inf, 0.0)
    return (after[bound] - before.get(bound, 0.0)) / total if total > 0 else math.nan


def at(samples: list[Sample], t: float) -> Sample:
    """The last sample taken at or before ``t``."""
    return [s for s in samples if s.at <= t][-1]


def phase_report(a: Sample, b: Sample, target_s: float) -> dict:
    """The family between two samples: texts by N, texts/s, p99 queue delay."""
    texts = {n: b.texts.get(n, 0.0) - a.texts.get(n, 0.0) for n in WIDTHS}
    total = sum(texts.values())
    return {
        "from_s": round(a.at, 1),
        "to_s": round(b.at, 1),
        "texts": total,
        "texts_per_s": round(total / (b.at - a.at), 2),
        "share_by_n": {str(n): round(k / total, 4) if total else None for n, k in texts.items()},
        "p99_queue_delay_s": quantile(a.queue_buckets, b.queue_buckets, 0.99),
        "queue_delay_within_target": round(share_within(a.queue_buckets, b.queue_buckets, target_s), 4),
    }


def series(samples: list[Sample], window: int = 1, p99_window: int = 5) -> list[dict]:
    """Per second: served texts/s and N-share over ``window`` s, p99 queue delay over
    ``p99_window`` s (enough texts for a percentile at low load), expected accuracy."""
    out = []
    for i in range(p99_window, len(samples)):
        a, b, c = samples[i - window], samples[i], samples[i - p99_window]
        texts = {n: b.texts.get(n, 0.0) - a.texts.get(n, 0.0) for n in WIDTHS}
        total = sum(texts.values())
        out.append({"t": round(b.at, 2), "served_texts_per_s": total / (b.at - a.at), "share": {n: (k / total if total else math.nan) for n, k in texts.items()}, "p99_queue_s": quantile(c.queue_buckets, b.queue_buckets, 0.99), "expected_accuracy": b.expected_accuracy, "num_instances": b.num_instances})
    return out


def plot(points: list[dict], phases: list[tuple[float, float, float]], target_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["t"] for p in points]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    offered_t = [x for s, e, _ in phases for x in (s, e)]
    offered = [r for _, _, r in phases for r in (r, r)]
    axes[0].plot(offered_t, offered, color="0.6", linestyle="--", label="offered (wrk, paced)")
    axes[0].plot(t, [p["served_texts_per_s"] for p in points], color="C0", label="served (1 s window)")
    axes[0].set_ylabel("texts/s")
    axes[0].legend(loc="upper right")
    shares = [[p["share"][n] if not math.isnan(p["share"][n]) else 0.0 for p in points] for n in WIDTHS]
    axes[1].stackplot(t, shares, labels=[f"N={n}" for n in WIDTHS], colors=["C2", "C1", "C3"])
    axes[1].set_ylabel("share of texts")
    axes[1].set_ylim(0, 1)
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [p["p99_queue_s"] * 1000 for p in points], color="C4", label="p99 queue delay (5 s window)")
    axes[2].axhline(target_s * 1000, color="k", linestyle=":", label="target")
    axes[2].set_ylabel("ms")
    axes[2].set_yscale("log")
    axes[2].legend(loc="upper right")
    axes[3].plot(t, [p["expected_accuracy"] * 100 for p in points], color="C5")
    axes[3].set_ylabel("expected accuracy, %\n(last minute)")
    axes[3].set_xlabel("seconds")
    fig.suptitle("sst2 family under a load ramp: N follows the load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def paced_connections(rate: float, most: int) -> int:
    """Connections for a paced phase: each sends about once a second, up to ``most``. wrk
    opens them all at once and paces their first requests: on more connections than the rate,
    some would wait over the server's 10 s head timeout for their first request and be closed
    with 408 (the guard against slow clients, doing its job)."""
    return max(1, min(most, math.ceil(rate)))


def relative(value: object) -> object:
    """A path setting as the report shows it: relative to the checkout where it lies inside it
    (or beside it, as ../shared/data does)."""
    if not isinstance(value, str) or not Path(value).is_absolute():
        return value
    path = Path(value)
    for base, prefix in ((ROOT, ""), (ROOT.parent, "../")):
        if path.is_relative_to(base):
            return prefix + path.relative_to(base).as_posix()
    return value


def finite(x: object) -> object:
    """NaN and infinities as null: the report stays valid JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--data", default=str(default_sst2_dev()))
    p.add_argument("--low", type=float, default=5.0, help="requests/s of the low phases")
    p.add_argument("--high", type=float, default=0.0, help="requests/s of the high step (0: from the capacity probes)")
    p.add_argument("--phase", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--probe", type=float, default=15.0, help="seconds per closed-loop probe")
    p.add_argument("--connections", type=int, default=512, help="at most this many in a paced phase")
    p.add_argument("--settle", type=float, default=5.0, help="seconds left out at a phase's start for its 'settled' figures")
    p.add_argument("--out", default="family_ramp.json")
    a = p.parse_args()

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = load_texts(a.data)
    server = start_server(a.model_repository, [FAMILY], out.with_suffix(".server.log"), grpc=False)
    url = f"http://{server.http_url}"
    report: dict = {"machine": machine_info(), "settings": {k: relative(v) for k, v in vars(a).items()}}
    try:
        config = httpx.get(f"{url}/v2/models/{FAMILY}/config").json()
        target_s = float(config["parameters"]["target_queue_delay_ms"]["string_value"]) / 1000
        loads = {m: http_load("json", m, texts) for m in (FAMILY, MUX2, MUX5)}

        def closed(model: str) -> float:
            run_wrk(url, loads[model], 32, 3)  # warm-up
            return run_wrk(url, loads[model], 32, a.probe).texts_per_s

        capacity = {MUX2: closed(MUX2), MUX5: closed(MUX5)}
        high = a.high or min(1.6 * capacity[MUX2], 0.85 * capacity[MUX5])
        report["capacity_closed_loop_texts_per_s"] = capacity
        report["high_rate"] = high
        print(f"capacity (closed loop): {capacity}; high step {high:.1f} req/s", flush=True)

        time.sleep(5)  # the probes' last requests are answered: the ramp starts on an idle server
        sampler = Sampler(server.http_url, time.monotonic())
        sampler.start()
        t0 = sampler.t0
        # each phase runs until its last request is answered (wrk stops sending at its end; the
        # requests still in flight are served then), so that a phase counts the texts it sent
        phases, wrk, bounds = [], [], []
        for rate in (a.low, high, a.low):
            first = scrape(server.http_url, t0)
            before = server_counts(server.http_url, FAMILY)
            result = run_wrk(url, loads[FAMILY], paced_connections(rate, a.connections), a.phase, rate=rate).summary()
            sent_until = time.monotonic() - t0
            last = drained(server.http_url, t0)
            wrk.append({**result, "server": counts_delta(before, server_counts(server.http_url, FAMILY)), "drained_after_s": round(last.at - sent_until, 2)})
            phases.append((first.at, sent_until, rate))
            bounds.append((first, last))
        alone_start = time.monotonic() - t0
        mux5_paced = run_wrk(url, loads[MUX5], paced_connections(high, a.connections), a.phase, rate=high).summary()
        alone_end = time.monotonic() - t0
        time.sleep(1.5)
        sampler.stopped.set()
        sampler.join()
        samples = sampler.samples

        names = ["low", "high", "low_again"]
        report["ramp"] = {name: {**phase_report(first, last, target_s), "offered_req_per_s": r, "wrk": w} for name, (first, last), (_, _, r), w in zip(names, bounds, phases, wrk, strict=True)}
        for name, (first, last) in zip(names, bounds, strict=True):
            if name != "low":
                report["ramp"][f"{name}_settled"] = {**phase_report(at(samples, first.at + a.settle), last, target_s), "settle_s": a.settle}
        a5, b5 = at(samples, alone_start), at(samples, alone_end)
        report["mux5_alone_paced"] = {**mux5_paced, "p99_queue_delay_s": quantile(a5.model_queue_buckets, b5.model_queue_buckets, 0.99)}
        report["closed_loop"] = {FAMILY: closed(FAMILY), MUX5: closed(MUX5)}
        high_phase = report["ramp"]["high"]
        report["checks"] = {
            "low_share_n1": report["ramp"]["low"]["share_by_n"]["1"],
            "low_again_share_n1": report["ramp"]["low_again"]["share_by_n"]["1"],
            "low_again_settled_share_n1": report["ramp"]["low_again_settled"]["share_by_n"]["1"],
            "high_over_mux5_alone_paced": round(high_phase["wrk"]["texts_per_s"] / mux5_paced["texts_per_s"], 3),
            "closed_loop_family_over_mux5": round(report["closed_loop"][FAMILY] / report["closed_loop"][MUX5], 3),
            "high_p99_queue_delay_s": high_phase["p99_queue_delay_s"],
            "high_settled_p99_queue_delay_s": report["ramp"]["high_settled"]["p99_queue_delay_s"],
            "target_queue_delay_s": target_s,
            "wrk_errors": sum(w["error_count"] for w in wrk) + mux5_paced["error_count"],
            # requests in flight when wrk stops at a phase's end are cancelled by it, not failed
            "server_failures": sum(failures_except_cancelled(w["server"]) for w in wrk),
        }
        points = series(samples)
        report["series"] = points
        plot([q for q in points if q["t"] <= phases[-1][1]], phases, target_s, out.with_suffix(".png"))
    finally:
        server.stop()
    out.write_text(json.dumps(finite(report), indent=1))
    print(json.dumps(report["checks"], indent=1))


if __name__ == "__main__":
    main()
