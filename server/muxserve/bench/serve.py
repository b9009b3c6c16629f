"""``muxserve bench serve`` and ``bench profile``: the served-throughput report.

``run_sweep`` measures, on one machine in one run:

1. per model, before the server starts (nothing else of ours running): accuracy on SST-2 dev
   (cached in ``results.json`` by weights and data), the engine's forward pass alone at the
   served batch shape, and the physical limit (FLOPs per text against the matmul rate);
2. one server with all models loaded, driven by a native load generator (``wrk`` over HTTP,
   ``h2load`` over gRPC: ``muxserve.bench.native``) in a closed loop over protocols x texts per
   request x concurrency x models (models innermost, so that a noisy moment hurts neighbouring
   models alike); for every point the server's CPU time over the window (all its processes, from
   ``/proc``) and its own statistics over the same window give the CPU per request and the
   per-request time breakdown (tokenize, queue, forward, rest);
3. a server of the echo engine (no model: the serving stack alone) on the first model, for the
   server's CPU per request over each protocol.

``write_report`` writes ``results.json``, ``results.md`` and the PNG plots.
``run_profile`` is the focused version for one or more models at one load, optionally with a
py-spy sample of the server's processes (the supervisor, its engine and its frontends).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from muxserve.bench import native
from muxserve.bench.run import (
    accuracy_key,
    breakdown,
    default_sst2_dev,
    forward_only,
    load_texts,
    machine_info,
    model_accuracy,
    model_stats,
    physical_limit,
    server_counts,
    stats_delta,
    units_text,
)
from muxserve.launch import ServerHandle, start_server

Log = Callable[[str], None]
PLOTS = ("throughput_vs_concurrency.png", "latency_vs_throughput.png", "accuracy_vs_throughput.png")


@dataclass
class SweepOptions:
    repository: str = "model_repository"
    models: list[str] = field(default_factory=lambda: ["sst2-bert", "sst2-mux2", "sst2-mux5"])
    concurrency: list[int] = field(default_factory=lambda: [64])
    texts_per_request: list[int] = field(default_factory=lambda: [1, 8])
    protocols: list[str] = field(default_factory=lambda: ["classify"])  # of native.PROTOCOLS
    duration: float = 10.0
    warmup: float = 3.0  # unmeasured load before each point, on the same server
    client_threads: int = 1  # load generator threads (it shares the machine with the server)
    echo_protocols: list[str] = field(default_factory=lambda: list(native.PROTOCOLS))  # [] skips the echo server
    out: str = "bench-results"
    texts: str = ""  # text source for the load; default SST-2 dev
    accuracy: bool = True
    accuracy_data: str = ""  # labeled TSV; default SST-2 dev
    accuracy_limit: int | None = None
    forward_seconds: float = 3.0  # 0: skip the forward-only measurement
    matmul_seconds: float = 2.0  # 0: skip the physical limit
    server_args: list[str] = field(default_factory=list)
    command: str = ""


def num_instances_of(repository: str, model: str) -> int:
    from muxserve.serving.repository import scan

    value = scan(repository)[model].parameter("num_instances", "1")
    return int(value or 1)


def measure_point(server: ServerHandle, model: str, texts: Sequence[str], protocol: str, concurrency: int, texts_per_request: int, duration: float, warmup: float, client_threads: int = 1, window_start: Callable[[], object] | None = None) -> dict:
    """One closed-loop point of the native load generator (``warmup`` seconds unmeasured, then
    ``duration``), with the server's CPU time, its counters and its statistics over the measured
    run. ``window_start`` runs as the measured run begins."""
    run = native.drive(protocol, server.http_url, server.grpc_url, model, texts, texts_per_request, concurrency, client_threads)
    if warmup > 0:
        run(warmup)
    before = model_stats(server.http_url, model)
    if window_start is not None:
        window_start()
    m = native.measure(server.proc.pid, run, duration, counters=lambda: server_counts(server.http_url, model))
    after = model_stats(server.http_url, model)
    point = {"model": model, "protocol": protocol, "concurrency": concurrency, **m.summary()}
    point["profile"] = breakdown(stats_delta(before, after), [m.load.mean_ms], m.load.seconds)
    return point


def point_text(p: dict) -> str:
    errors = f", errors {p['errors']}" if p["error_count"] else ""
    return f"{p['protocol']} {p['model']} c={p['concurrency']} texts/req={p['texts_per_request']}: {p['requests_per_s']:.1f} req/s, {p['texts_per_s']:.1f} texts/s, p50 {cell(p['p50_ms'])} ms, p99 {cell(p['p99_ms'])} ms, server CPU {cell(p['cpu_ms_per_request'], '.3f')} ms/request{errors}"


def measure_echo(opts: SweepOptions, texts: Sequence[str], out: Path, log: Log) -> list[dict]:
    """The serving stack alone: the first model on the echo engine (no forward pass), 1 text
    per request at the highest concurrency, the server's CPU per request over each protocol."""
    model, concurrency = opts.models[0], max(opts.concurrency)
    server = start_server(opts.repository, [model], out / "server-echo.log", extra=[*opts.server_args, "--engine", "echo"], grpc="grpc" in opts.echo_protocols)
    points = []
    try:
        for protocol in opts.echo_protocols:
            p = measure_point(server, model, texts, protocol, concurrency, 1, opts.duration, opts.warmup, opts.client_threads)
            points.append({**p, "engine": "echo"})
            log("echo engine: " + point_text(p))
    finally:
        server.stop()
    return points


def server_settings(server_args: Sequence[str]) -> object:
    """The ``Settings`` that ``muxserve serve`` would run with these extra arguments."""
    import argparse

    from muxserve.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers(dest="command"))
    return serve_cli.settings_from_args(parser.parse_args([serve_cli.NAME, *server_args]))


def layout(forward: dict) -> str:
    """'2 instance(s) x 1 thread(s)' of a forward-only result (older results: threads only)."""
    return f"{forward.get('instances', 1)} instance(s) × {forward['threads']} thread(s)"


def _offline(opts: SweepOptions, texts: list[str], previous: dict, log: Log) -> dict[str, dict]:
    """Accuracy (cached), forward-only throughput (at the served settings) and physical limit per model."""
    from muxserve.model.precision import resolve_precision

    info: dict[str, dict] = {}
    settings = server_settings(opts.server_args)
    acc_data = opts.accuracy_data or str(default_sst2_dev())
    for model in opts.models:
        entry: dict = {"num_instances": num_instances_of(opts.repository, model)}
        if opts.accuracy:
            key = accuracy_key(opts.repository, model, acc_data, opts.accuracy_limit)
            cached = previous.get(model, {}).get("accuracy")
            if cached and cached.get("key") == key:
                entry["accuracy"] = {**cached, "cached": True}
                log(f"{model}: accuracy {cached['accuracy']:.4f} (cached)")
            else:
                entry["accuracy"] = model_accuracy(opts.repository, model, acc_data, opts.accuracy_limit)
                log(f"{model}: accuracy {entry['accuracy']['accuracy']:.4f} on {entry['accuracy']['n']} texts ({entry['accuracy']['seconds']:.1f} s)")
        if opts.forward_seconds > 0:
            entry["forward"] = forward_only(opts.repository, model, texts, opts.forward_seconds, settings)
            f = entry["forward"]
            log(f"{model}: forward pass alone {f['forward_texts_per_s']:.1f} texts/s ({f['precision']}, {layout(f)}, {f['mean_batch_texts']:.0f} texts per pass)")
        if opts.matmul_seconds > 0:
            precision = entry["forward"]["precision"] if "forward" in entry else resolve_precision(settings.precision or "auto", settings.device or "cpu", engine=settings.engine or "eager")
            entry["limit"] = physical_limit(opts.repository, model, texts, opts.matmul_seconds, precision=precision)
            lim = entry["limit"]
            log(f"{model}: {lim['flops_per_text'] / 1e6:.1f} MFLOP/text at {lim['mean_text_tokens']:.1f} tokens ({lim['flops_per_text_padded'] / 1e6:.1f} padded in arrival order); matmul {lim['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s -> limit {lim['limit_texts_per_s']:.1f} texts/s")
        info[model] = entry
    return info


def _forward_after(opts: SweepOptions, texts: list[str], models: dict[str, dict], log: Log) -> None:
    """The full-queue forward-only capacity again, after the served points: on a shared machine
    the neighbours' load drifts over a run, so the capacity served is held to is the mean of the
    measurements before and after the served points (both kept, ``before_texts_per_s`` and
    ``after_texts_per_s``)."""
    settings = server_settings(opts.server_args)
    for model, info in models.items():
        f = info.get("forward")
        if not f:
            continue
        again = forward_only(opts.repository, model, texts, opts.forward_seconds, settings)
        before, after = f["forward_texts_per_s"], again["forward_texts_per_s"]
        f.update(before_texts_per_s=before, after_texts_per_s=after, forward_texts_per_s=(before + after) / 2, forward_seconds=f["forward_seconds"] + again["forward_seconds"])
        f["rounds_texts_per_s"] = f["rounds_texts_per_s"] + again["rounds_texts_per_s"]
        log(f"{model}: forward pass alone after the served points {after:.1f} texts/s (before {before:.1f}; capacity: their mean {f['forward_texts_per_s']:.1f})")


def _forward_at_served_passes(opts: SweepOptions, texts: list[str], points: list[dict], log: Log) -> None:
    """Forward-only texts/s at the mean pass each point's load formed (``forward_at_served_pass``
    of the point), beside the full-queue figure, which stays the capacity served is held to:
    how much of the gap is the passes the load makes, how much the serving stack."""
    settings = server_settings(opts.server_args)
    for p in points:
        size = round(p.get("profile", {}).get("texts_per_forward") or 0)
        if size > 0:
            f = forward_only(opts.repository, p["model"], texts, opts.forward_seconds, settings, pass_texts=size)
            p["forward_at_served_pass"] = {"pass_texts": size, "forward_texts_per_s": f["forward_texts_per_s"]}
            log(f"{p['model']}: forward pass alone at {size} texts per pass {f['forward_texts_per_s']:.1f} texts/s")


def _previous_models(out: Path) -> dict:
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get("models", {})
    except (OSError, ValueError):
        return {}


def summarize(report: dict) -> list[dict]:
    """One row per (protocol, texts per request, model): the point of highest texts/s over the
    concurrencies (without errors), with the ratios to the baseline and to the forward pass."""
    rows = []
    models, settings = report["models"], report["settings"]
    for protocol in settings["protocols"]:
        for tpr in settings["texts_per_request"]:
            peaks: dict[str, dict] = {}
            for p in report["points"]:
                if p["protocol"] == protocol and p["texts_per_request"] == tpr and p["error_count"] == 0 and (p["model"] not in peaks or p["texts_per_s"] > peaks[p["model"]]["texts_per_s"]):
                    peaks[p["model"]] = p
            baseline = next((m for m in settings["models"] if models[m]["num_instances"] == 1 and m in peaks), None)
            for model in settings["models"]:
                info, peak = models[model], peaks.get(model)
                row = {"protocol": protocol, "texts_per_request": tpr, "model": model, "num_instances": info["num_instances"], "accuracy": info.get("accuracy", {}).get("accuracy")}
                if peak is not None:
                    row.update(peak_texts_per_s=peak["texts_per_s"], peak_requests_per_s=peak["requests_per_s"], at_concurrency=peak["concurrency"], p50_ms=peak["p50_ms"], p99_ms=peak["p99_ms"], cpu_ms_per_request=peak["cpu_ms_per_request"])
                    row["ratio_to_baseline"] = peak["texts_per_s"] / peaks[baseline]["texts_per_s"] if baseline and peaks[baseline]["texts_per_s"] else None
                    if "forward" in info:
                        row["forward_texts_per_s"] = info["forward"]["forward_texts_per_s"]
                        row["served_over_forward"] = peak["texts_per_s"] / info["forward"]["forward_texts_per_s"]
                    if "limit" in info:
                        row["limit_texts_per_s"] = info["limit"]["limit_texts_per_s"]
                        row["served_over_limit"] = peak["texts_per_s"] / info["limit"]["limit_texts_per_s"]
                        row["served_over_limit_padded"] = peak["texts_per_s"] / info["limit"]["limit_texts_per_s_padded"]
                    if "profile" in peak:
                        row["profile"] = peak["profile"]
                    if "forward_at_served_pass" in peak:
                        row["forward_at_served_pass"] = {**peak["forward_at_served_pass"], "served_over_forward": peak["texts_per_s"] / peak["forward_at_served_pass"]["forward_texts_per_s"]}
                rows.append(row)
    return rows


def run_sweep(opts: SweepOptions, log: Log = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    start = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_texts(opts.texts or None)
    machine = machine_info()
    models = _offline(opts, texts, _previous_models(out), log)
    offline_s = time.perf_counter() - start
    points: list[dict] = []
    server = start_server(opts.repository, opts.models, out / "server.log", extra=opts.server_args, grpc="grpc" in opts.protocols)
    log(f"server ready (HTTP {server.http_port}, gRPC {server.grpc_port or '-'}); {len(opts.protocols) * len(opts.texts_per_request) * len(opts.concurrency) * len(opts.models)} points of {opts.warmup:g}+{opts.duration:g} s")
    try:
        for protocol in opts.protocols:
            for tpr in opts.texts_per_request:
                for concurrency in opts.concurrency:
                    for model in opts.models:
                        points.append(measure_point(server, model, texts, protocol, concurrency, tpr, opts.duration, opts.warmup, opts.client_threads))
                        log(point_text(points[-1]))
    finally:
        server.stop()
    if opts.forward_seconds > 0:
        _forward_after(opts, texts, models, log)
        _forward_at_served_passes(opts, texts, points, log)
    echo = measure_echo(opts, texts, out, log) if opts.echo_protocols else []
    report = {
        "machine": machine,
        "command": opts.command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {k: v for k, v in asdict(opts).items() if k != "command"},
        "texts": {"source": os.path.relpath(opts.texts or default_sst2_dev()), "count": len(texts)},
        "models": models,
        "points": points,
        "echo": echo,
        "seconds": {"offline": offline_s, "total": time.perf_counter() - start},
    }
    report["summary"] = summarize(report)
    write_report(report, out)
    report["seconds"]["total"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(strict_json(report), indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------- report


def strict_json(x: object) -> object:
    """NaN/inf -> None, so that results.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [strict_json(v) for v in x]
    return x


def cell(x: object, fmt: str = ".1f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:{fmt}}{suffix}"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# muxserve: served throughput, latency and accuracy",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores available, {units_text(m)}, engine threads {m['engine_threads']}), {m['platform']}, Python {m['python']}, torch {m['torch']}; load average at start {m.get('load_average')}.",
        f"Date: {report['date']}. Native load generators in a closed loop (wrk with a Lua script over HTTP, h2load over gRPC, {s['client_threads']} client thread(s)): {s['warmup']:g} s unmeasured, then {s['duration']:g} s measured per point; texts: {Path(report['texts']['source']).name} ({report['texts']['count']}). Server CPU: all its processes, from /proc. Total time {report['seconds']['total']:.0f} s.",
        "",
        f"Command: `{report['command']}`" if report.get("command") else "",
        "",
        "## Summary (the concurrency of highest texts/s, no errors)",
        "",
        "| protocol | texts/req | model | N | SST-2 dev acc. | req/s | texts/s | conc. | p50 ms | p99 ms | server CPU ms/req | × baseline | forward-only texts/s | served / forward | limit texts/s | served / limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        lines.append(
            f"| {r['protocol']} | {r['texts_per_request']} | {r['model']} | {r['num_instances']} | {cell(r.get('accuracy'), '.3f')} | {cell(r.get('peak_requests_per_s'))} | {cell(r.get('peak_texts_per_s'))} | {r.get('at_concurrency', '–')} | {cell(r.get('p50_ms'))} | {cell(r.get('p99_ms'))} | {cell(r.get('cpu_ms_per_request'), '.3f')} | {cell(r.get('ratio_to_baseline'), '.2f', '×')} | {cell(r.get('forward_texts_per_s'))} | {cell(r.get('served_over_forward'), '.0%')} | {cell(r.get('limit_texts_per_s'))} | {cell(r.get('served_over_limit'), '.1%')} |"
        )
    forwards = [f"{model}: {f['precision']}, {layout(f)}, {f['mean_batch_texts']:.0f} texts per pass" + (f" (budget {f['max_batch_tokens']} tokens)" if f.get("max_batch_tokens") else "") + (f", {f['before_texts_per_s']:.1f} before and {f['after_texts_per_s']:.1f} after" if "after_texts_per_s" in f else "") for model, info in report["models"].items() if (f := info.get("forward"))]
    if forwards:
        lines += ["", "Forward-only: the engine alone on the same texts, with the server's precision, instances side by side, threads and batches (those its scheduler forms from a full queue), measured before and after the served points, the mean of the two: " + "; ".join(forwards) + "."]
    if report.get("echo"):
        lines += ["", "## The serving stack alone (echo engine: no forward pass, 1 text per request)", "", "| protocol | conc. | req/s | p50 ms | p99 ms | server CPU ms/req | errors |", "|---|---|---|---|---|---|---|"]
        for p in report["echo"]:
            lines.append(f"| {p['protocol']} | {p['concurrency']} | {p['requests_per_s']:.1f} | {cell(p['p50_ms'])} | {cell(p['p99_ms'])} | {cell(p['cpu_ms_per_request'], '.3f')} | {p['error_count']} |")
    lines += ["", "## Where a request's time goes at the peak (ms per request, server statistics over the same window)", "", "| protocol | model | conc. × texts/req | client e2e | tokenize | queue | forward | server other | HTTP/gRPC + client | engine busy | texts / forward pass | forward-only texts/s at that pass | served / that |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["summary"]:
        pr = r.get("profile")
        if not pr:
            continue
        parts, fs = pr["parts_ms"], r.get("forward_at_served_pass", {})
        lines.append(f"| {r['protocol']} | {r['model']} | {r['at_concurrency']} × {r['texts_per_request']} | {cell(pr['client_ms'], '.2f')} | {cell(parts['tokenize'], '.2f')} | {cell(parts['queue'], '.2f')} | {cell(parts['forward'], '.2f')} | {cell(parts['server_other'], '.2f')} | {cell(parts['protocol_client'], '.2f')} | {cell(pr['engine_busy'], '.0%')} | {cell(pr['texts_per_forward'], '.1f')} | {cell(fs.get('forward_texts_per_s'))} | {cell(fs.get('served_over_forward'), '.0%')} |")
    lines += [
        "",
        "## Physical limit (FLOPs per text against this machine's matmul rate)",
        "",
        "Limit: each text at its own token length (no padding). Padded: batches of the configured size in arrival order, padded to the engine's length buckets.",
        "",
        "| model | N | mean tokens | MFLOP / text | matmul GFLOP/s (shape, dtype, threads) | limit texts/s | peak served texts/s | served / limit | mean padded length | MFLOP / text padded | limit padded | served / limit padded |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peaks = {r["model"]: r for r in report["summary"] if r["protocol"] == s["protocols"][0] and r["texts_per_request"] == s["texts_per_request"][0]}
    for model in s["models"]:
        lim = report["models"][model].get("limit")
        if not lim:
            continue
        mm, r = lim["matmul"], peaks.get(model, {})
        lines.append(
            f"| {model} | {lim['num_instances']} | {lim['mean_text_tokens']:.1f} | {lim['flops_per_text'] / 1e6:.1f} | {mm['flops_per_s'] / 1e9:.1f} ({'×'.join(map(str, mm['shape']))}, {mm.get('dtype', 'fp32')}, {mm['threads']}) | {lim['limit_texts_per_s']:.1f} | {cell(r.get('peak_texts_per_s'))} | {cell(r.get('served_over_limit'), '.1%')} "
            f"| {lim['mean_padded_length']:.1f} | {lim['flops_per_text_padded'] / 1e6:.1f} | {lim['limit_texts_per_s_padded']:.1f} | {cell(r.get('served_over_limit_padded'), '.1%')} |"
        )
    lines += ["", "## Every point", "", "| protocol | model | texts/req | conc. | req/s | texts/s | p50 ms | p90 ms | p99 ms | server CPU ms/req | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["points"]:
        lines.append(f"| {p['protocol']} | {p['model']} | {p['texts_per_request']} | {p['concurrency']} | {p['requests_per_s']:.1f} | {p['texts_per_s']:.1f} | {cell(p['p50_ms'])} | {cell(p['p90_ms'])} | {cell(p['p99_ms'])} | {cell(p['cpu_ms_per_request'], '.3f')} | {p['error_count']} |")
    lines += ["", *(f"![{name[:-4]}]({name})" for name in PLOTS), ""]
    return "\n".join(lines)


def _plain_log_ticks(axis) -> None:
    """A log axis labelled 1, 2, 5, 10, 20, ... in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    s, pts = report["settings"], report["points"]
    models, tprs, protocols = s["models"], s["texts_per_request"], s["protocols"]
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    styles = {p: st for p, st in zip(protocols, ["-", "--", ":", "-."], strict=False)}
    label_of = {m: f"{m} (N={report['models'][m]['num_instances']})" for m in models}
    written = []

    def series(model: str, protocol: str, tpr: int) -> list[dict]:
        return sorted((p for p in pts if p["model"] == model and p["protocol"] == protocol and p["texts_per_request"] == tpr), key=lambda p: p["concurrency"])

    # throughput vs concurrency, one panel per texts/request
    fig, axes = plt.subplots(1, len(tprs), figsize=(6 * len(tprs), 4.5), squeeze=False)
    for ax, tpr in zip(axes[0], tprs, strict=True):
        for model in models:
            for protocol in protocols:
                ser = series(model, protocol, tpr)
                if ser:
                    ax.plot([p["concurrency"] for p in ser], [p["texts_per_s"] for p in ser], styles[protocol], marker="o", color=colors[model], label=label_of[model] + (f" {protocol}" if len(protocols) > 1 else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["concurrency"])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("texts/s")
        ax.set_title(f"throughput, {tpr} text(s) per request")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / PLOTS[0])
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # latency vs throughput: p50 solid, p99 dashed
    fig, axes = plt.subplots(1, len(tprs), figsize=(6 * len(tprs), 4.5), squeeze=False)
    for ax, tpr in zip(axes[0], tprs, strict=True):
        for model in models:
            ser = series(model, protocols[0], tpr)
            if ser:
                x = [p["texts_per_s"] for p in ser]
                ax.plot(x, [p["p50_ms"] for p in ser], "-", marker="o", color=colors[model], label=f"{label_of[model]} p50")
                ax.plot(x, [p["p99_ms"] for p in ser], "--", marker="^", color=colors[model], label=f"{label_of[model]} p99")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.set_xlabel("texts/s")
        ax.set_ylabel("latency ms")
        ax.set_title(f"latency vs throughput ({protocols[0]}, {tpr} text(s)/request; concurrency rises along each line)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / PLOTS[1])
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # accuracy vs throughput: the paper's trade-off, from this server
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = [r for r in report["summary"] if r["protocol"] == protocols[0] and r["texts_per_request"] == tprs[0] and r.get("accuracy") is not None and r.get("peak_texts_per_s")]
    for i, r in enumerate(rows):
        ax.scatter(r["peak_texts_per_s"], r["accuracy"], color=colors[r["model"]], s=60, zorder=3)
        ax.annotate(f"{r['model']} (N={r['num_instances']})", (r["peak_texts_per_s"], r["accuracy"]), textcoords="offset points", xytext=(6, 4 - 12 * (i % 2)), fontsize=8)
        lim = report["models"][r["model"]].get("limit")
        if lim:
            ax.scatter(lim["limit_texts_per_s"], r["accuracy"], color=colors[r["model"]], marker="x", s=40, zorder=3)
            ax.plot([r["peak_texts_per_s"], lim["limit_texts_per_s"]], [r["accuracy"]] * 2, ":", color=colors[r["model"]], alpha=0.6)
    if len(rows) > 1:
        ordered = sorted(rows, key=lambda r: r["peak_texts_per_s"])
        ax.plot([r["peak_texts_per_s"] for r in ordered], [r["accuracy"] for r in ordered], "-", color="grey", alpha=0.4, zorder=1)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("peak served texts/s (×: physical limit)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title(f"accuracy vs throughput ({protocols[0]})")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    written.append(out / PLOTS[2])
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(strict_json(report), indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    plot(report, out)


# ---------------------------------------------------------------------------- profile


def summarize_pyspy(raw: str, top: int = 15) -> dict:
    """py-spy ``--format raw`` (collapsed stacks) -> sample shares by stage and the top leaves."""
    stages = {  # a frame goes to the first stage whose keys it holds
        "forward (engine)": ("engine.py", "muxbert.py", "torch/"),
        "tokenize": ("tokenizer.py",),
        "HTTP server (connections, parsing, FastAPI)": ("serving/http/server.py", "starlette", "fastapi", "httptools"),
        "HTTP codec (body parse/encode)": ("serving/http/", "codecs.py", "orjson"),
        "gRPC": ("serving/grpc/", "grpc/"),
        "scheduler & data plane": ("scheduler.py", "dataplane.py"),
        "metrics": ("metrics.py", "prometheus_client"),
        "asyncio loop": ("asyncio/", "uvloop"),
    }
    total = 0
    by_stage: dict[str, int] = {k: 0 for k in stages}
    by_stage["other"] = 0
    leaves: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        leaves[leaf] = leaves.get(leaf, 0) + n
        # the innermost frame that belongs to a named stage decides
        for frame in reversed(frames):
            stage = next((k for k, keys in stages.items() if any(key in frame for key in keys)), None)
            if stage:
                by_stage[stage] += n
                break
        else:
            by_stage["other"] += n
    share = {k: v / total for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1]) if v} if total else {}
    top_leaves = [{"frame": f, "share": n / total} for f, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]] if total else []
    return {"samples": total, "by_stage": share, "top_leaves": top_leaves}


def run_profile(repository: str, models: list[str], concurrency: int, texts_per_request: int, protocol: str, duration: float, warmup: float, out: Path, texts_source: str = "", matmul_seconds: float = 2.0, py_spy: bool = False, server_args: Sequence[str] = (), log: Log = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Per model at one load: the time breakdown per request, the physical limit and served
    fraction of it, and (``py_spy``) where the server's processes spend their samples."""
    out.mkdir(parents=True, exist_ok=True)
    texts = load_texts(texts_source or None)
    limits = {m: physical_limit(repository, m, texts, matmul_seconds) for m in models} if matmul_seconds > 0 else {}
    server = start_server(repository, models, out / "server.log", extra=server_args, grpc=protocol == "grpc")
    results = []
    try:
        for model in models:
            spy: dict[str, subprocess.Popen] = {}
            spy_path = out / f"{model}.pyspy.txt"

            def start_spy(path: Path = spy_path, spy: dict = spy) -> None:
                cmd = ["py-spy", "record", "--pid", str(server.proc.pid), "--subprocesses", "--duration", str(max(1, round(duration))), "--rate", "100", "--nonblocking", "--format", "raw", "--output", str(path)]
                try:
                    spy["proc"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                except FileNotFoundError:
                    log("py-spy not found: pip install py-spy (it needs ptrace permission)")

            point = measure_point(server, model, texts, protocol, concurrency, texts_per_request, duration, warmup, window_start=start_spy if py_spy else None)
            entry = {"model": model, "point": point}
            if model in limits:
                entry["limit"] = limits[model]
                entry["served_over_limit"] = point["texts_per_s"] / limits[model]["limit_texts_per_s"]
            if "proc" in spy:
                _, err = spy["proc"].communicate(timeout=duration + 60)
                if spy["proc"].returncode == 0 and spy_path.exists():
                    entry["py_spy"] = {**summarize_pyspy(spy_path.read_text()), "raw": str(spy_path)}
                else:
                    entry["py_spy"] = {"error": err.decode(errors="replace")[-500:]}
            results.append(entry)
            log(profile_text(entry))
    finally:
        server.stop()
    report = {"machine": machine_info(), "command": " ".join(shlex.quote(a) for a in sys.argv), "settings": {"repository": repository, "models": models, "concurrency": concurrency, "texts_per_request": texts_per_request, "protocol": protocol, "duration": duration, "warmup": warmup}, "results": results}
    (out / "profile.json").write_text(json.dumps(strict_json(report), indent=2) + "\n")
    return report


def profile_text(entry: dict) -> str:
    p = entry["point"]
    lines = [f"{entry['model']} ({p['protocol']}, concurrency {p['concurrency']}, {p['texts_per_request']} text(s)/request): {p['texts_per_s']:.1f} texts/s, {p['requests_per_s']:.1f} req/s, p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms, server CPU {cell(p['cpu_ms_per_request'], '.3f')} ms/request, errors {p['error_count']}"]
    pr = p.get("profile")
    if pr:
        lines.append(f"  per request: client {pr['client_ms']:.2f} ms = " + " + ".join(f"{k} {v:.2f}" for k, v in pr["parts_ms"].items()) + f"; engine busy {pr['engine_busy']:.0%}, {pr['texts_per_forward']:.1f} texts per forward pass")
    if "limit" in entry:
        lim = entry["limit"]
        lines.append(f"  limit: {lim['flops_per_text'] / 1e6:.1f} MFLOP/text (mean {lim['mean_text_tokens']:.1f} tokens, unpadded) at {lim['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s = {lim['limit_texts_per_s']:.1f} texts/s; served {entry['served_over_limit']:.1%} of it (padded as in arrival order: {lim['limit_texts_per_s_padded']:.1f} texts/s)")
    spy = entry.get("py_spy")
    if spy and "by_stage" in spy:
        lines.append("  py-spy: " + ", ".join(f"{k} {v:.0%}" for k, v in spy["by_stage"].items()))
    elif spy:
        lines.append(f"  py-spy failed: {spy.get('error', '')[:200]}")
    return "\n".join(lines)
