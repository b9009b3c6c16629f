"""Generate the Grafana dashboard for muxserve: ``python docker/grafana/make_dashboard.py``.

Writes ``docker/grafana/dashboards/muxserve.json`` (committed; the compose file provisions it).
Every query names only metrics that ``GET /metrics`` exports or recording rules of
``docker/prometheus/rules.yml``; tests/test_metrics_queries.py checks this, and that the
committed JSON is what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "muxserve.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/prometheus.yml
M = 'model=~"$model"'  # the dashboard's model filter
F = 'family=~"$family"'  # ... and its model-family filter
FAMILY_AS_MODEL = 'model=~"$family"'  # a family's own request metrics carry its name as model
RATE = "$__rate_interval"


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True, "instant": False}


def timeseries(title: str, description: str, targets: list[tuple[str, str]], unit: str, grid: tuple[int, int, int, int], min_value: float | None = 0, max_value: float | None = None, stack: bool = False) -> dict[str, Any]:
    x, y, w, h = grid
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 10 if not stack else 40, "showPoints": "never", "spanNulls": True, "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "mean", "max"]}, "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
    }


def stat(title: str, description: str, expr: str, legend: str, unit: str, grid: tuple[int, int, int, int], decimals: int = 2) -> dict[str, Any]:
    x, y, w, h = grid
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "decimals": decimals, "thresholds": {"mode": "absolute", "steps": [{"color": "text", "value": None}]}}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value", "graphMode": "area", "textMode": "value_and_name", "justifyMode": "auto"},
        "targets": [{**target(expr, legend, "A"), "range": False, "instant": True}],
    }


def mean_of(histogram: str) -> str:
    """Mean of a histogram's observations per model over the panel's rate interval."""
    return f"sum by (model) (rate({histogram}_sum{{{M}}}[{RATE}])) / (sum by (model) (rate({histogram}_count{{{M}}}[{RATE}])) > 0)"


def quantile_of(q: float, histogram: str, selector: str = M) -> str:
    return f"histogram_quantile({q}, sum by (model, le) (rate({histogram}_bucket{{{selector}}}[{RATE}])))"


def panels() -> list[dict[str, Any]]:
    return [
        # -- at a glance
        stat("Mux / baseline throughput", "Texts/s of each mux model over that of its plain baseline, last minute (recording rule).", f"model:muxserve_baseline_throughput:ratio_rate1m{{{M}}}", "{{model}} / {{baseline}}", "none", (0, 0, 6, 4)),
        stat("Texts/s", "Texts served per second, last minute, all models.", f"sum(model:muxserve_inference_texts:rate1m{{{M}}})", "texts/s", "short", (6, 0, 6, 4), decimals=1),
        stat("Shadow agreement", "Share of shadow-sampled texts whose mux label equals the baseline label, since the server started.", f"muxserve_shadow_agreement_ratio{{{M}}}", "{{model}}", "percentunit", (12, 0, 6, 4), decimals=1),
        stat("Models ready", "Model versions loaded and serving.", f"sum(muxserve_model_ready{{{M}}})", "ready", "none", (18, 0, 6, 4), decimals=0),
        # -- throughput
        timeseries(
            "Throughput: mux vs baseline",
            "Texts/s served successfully per model (recording rule over muxserve_inference_texts_total). A mux model and its baseline side by side.",
            [(f"model:muxserve_inference_texts:rate1m{{{M}}}", "{{model}}")],
            "short", (0, 4, 12, 8),
        ),
        timeseries(
            "Mux / baseline throughput ratio",
            "Throughput of each mux model over its baseline (joined on muxserve_model_info's baseline label): the recording rule (1 min) and the server's own 10 s sliding-window gauge. Meaningful when both carry comparable load.",
            [
                (f"model:muxserve_baseline_throughput:ratio_rate1m{{{M}}}", "{{model}} / {{baseline}} (1m)"),
                (f"muxserve_baseline_throughput_ratio{{{M}}}", "{{model}} / {{baseline}} (server, 10 s)"),
            ],
            "none", (12, 4, 12, 8),
        ),
        # -- latency
        timeseries(
            "End-to-end latency p50 / p99",
            "Duration of one request in the data plane (queue wait + tokenization + forward pass), from muxserve_request_duration_seconds.",
            [
                (f"model:muxserve_request_duration_seconds:p50_rate1m{{{M}}}", "{{model}} p50"),
                (f"model:muxserve_request_duration_seconds:p99_rate1m{{{M}}}", "{{model}} p99"),
            ],
            "s", (0, 12, 12, 8),
        ),
        timeseries(
            "Latency breakdown p99: queue wait, tokenization, forward pass",
            "Where the time goes: p99 of the queue wait of a text, of tokenizing a request and of one forward pass.",
            [
                (quantile_of(0.99, "muxserve_queue_duration_seconds"), "{{model}} queue"),
                (quantile_of(0.99, "muxserve_tokenize_duration_seconds"), "{{model}} tokenize"),
                (quantile_of(0.99, "muxserve_compute_duration_seconds"), "{{model}} forward"),
            ],
            "s", (12, 12, 12, 8),
        ),
        # -- batching
        timeseries(
            "Queue depth",
            "Texts waiting for a forward pass.",
            [(f"sum by (model) (muxserve_queue_depth_texts{{{M}}})", "{{model}}")],
            "short", (0, 20, 8, 8),
        ),
        timeseries(
            "Mux group fill",
            "Mean texts per mux group over N, per forward pass: 100% means every group carried N texts.",
            [(mean_of("muxserve_mux_group_fill_ratio"), "{{model}}")],
            "percentunit", (8, 20, 8, 8), max_value=1,
        ),
        timeseries(
            "Texts per forward pass",
            "Mean texts per forward pass (all mux groups of the batch), and forward passes per second.",
            [
                (mean_of("muxserve_batch_texts"), "{{model}} texts/pass"),
                (f"sum by (model) (rate(muxserve_executions_total{{{M}}}[{RATE}]))", "{{model}} passes/s"),
            ],
            "short", (16, 20, 8, 8),
        ),
        # -- accuracy cost and errors
        timeseries(
            "Agreement rate (shadow sampling)",
            "Share of sampled texts on which a mux model and its baseline give the same label: over 5 minutes (recording rule) and since start (server gauge). Dropped: texts sampled but not compared.",
            [
                (f"model:muxserve_shadow_agreement:ratio_rate5m{{{M}}}", "{{model}} vs {{baseline}} (5m)"),
                (f"muxserve_shadow_agreement_ratio{{{M}}}", "{{model}} vs {{baseline}} (since start)"),
            ],
            "percentunit", (0, 28, 12, 8), max_value=1,
        ),
        timeseries(
            "Errors by reason",
            "Failed requests per second by reason (queue_full, bad_request, not_ready, internal, cancelled; reasons that occur), the share of requests that failed, and shadow-sampled texts dropped per second.",
            [
                (f"model_reason:muxserve_request_failures:rate1m{{{M}}} > 0", "{{model}} {{reason}}/s"),
                (f"model:muxserve_request_errors:ratio_rate1m{{{M}}}", "{{model}} error ratio"),
                (f"sum by (model) (rate(muxserve_shadow_dropped_total{{{M}}}[{RATE}])) > 0", "{{model}} shadow dropped/s"),
            ],
            "short", (12, 28, 12, 8),
        ),
        # -- model families: N follows the load
        timeseries(
            "Family: N-share of texts",
            "Share of a model family's texts served at each mux width N: the load controller's choice, batch by batch.",
            [(f"sum by (family, num_instances) (rate(muxserve_family_texts_total{{{F}}}[{RATE}])) / on (family) group_left () (sum by (family) (rate(muxserve_family_texts_total{{{F}}}[{RATE}])) > 0)", "{{family}} N={{num_instances}}")],
            "percentunit", (0, 36, 12, 8), max_value=1, stack=True,
        ),
        timeseries(
            "Family: load and learned capacity",
            "Arrival rate the family's controller sees, texts it served, and each member's capacity at full batches as the controller has learned it while serving.",
            [
                (f"muxserve_family_arrival_texts_per_second{{{F}}}", "{{family}} arrivals"),
                (f"sum by (family) (rate(muxserve_family_texts_total{{{F}}}[{RATE}]))", "{{family}} served"),
                (f"muxserve_family_member_capacity_texts_per_second{{{F}}}", "{{family}} capacity N={{num_instances}}"),
            ],
            "short", (12, 36, 12, 8),
        ),
        timeseries(
            "Family: p99 queue wait and end to end",
            "The controller keeps a family's queue wait under its target_queue_delay_ms.",
            [
                (quantile_of(0.99, "muxserve_queue_duration_seconds", FAMILY_AS_MODEL), "{{model}} queue wait"),
                (quantile_of(0.99, "muxserve_request_duration_seconds", FAMILY_AS_MODEL), "{{model}} end to end"),
            ],
            "s", (0, 44, 8, 8),
        ),
        timeseries(
            "Family: expected accuracy",
            "Members' recorded dev accuracy (MODELS.json), weighted by their share of the family's texts over the last minute.",
            [(f"muxserve_family_expected_accuracy{{{F}}}", "{{family}}")],
            "percentunit", (8, 44, 8, 8), min_value=None,
        ),
        timeseries(
            "Family: shadow agreement of the mux members",
            "Share of shadow-sampled texts served at N > 1 (a family's, and the members' own) whose label the baseline confirms, over 5 minutes.",
            [(f"model:muxserve_shadow_agreement:ratio_rate5m{{{M}}}", "{{model}} vs {{baseline}}")],
            "percentunit", (16, 44, 8, 8), max_value=1,
        ),
    ]


def query_variable(name: str, metric: str) -> dict[str, Any]:
    """A dashboard filter over the values of label ``name`` of ``metric`` (all by default)."""
    query = f"label_values({metric}, {name})"
    return {
        "type": "query",
        "name": name,
        "label": name,
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def build() -> dict[str, Any]:
    return {
        "uid": "muxserve",
        "title": "muxserve",
        "description": "Data-multiplexed BERT serving: throughput against the plain baseline, latency, batching, live agreement, errors, and model families choosing N by load.",
        "tags": ["muxserve"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [query_variable("model", "muxserve_model_info"), query_variable("family", "muxserve_family_num_instances")]},
        "panels": [{"id": i + 1, **p} for i, p in enumerate(panels())],
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
