"""``muxserve bench``: benchmarks, one subcommand each.

``bench model``: forward-pass throughput of several models at equal texts per batch and equal
sequence length, all in one process, measured in interleaved rounds so that a noisy machine (other
jobs, frequency scaling) hurts every model alike. Prints a JSON list with ``--json``.

``bench serve``: starts the server on loopback with all models, sweeps models x concurrency x
texts per request (x protocols) with a native load generator (wrk, h2load) and writes
``results.json``, ``results.md`` and PNG plots (throughput vs concurrency, latency vs throughput,
accuracy vs throughput) to ``--out``: req/s, p50/p99, the server's CPU per request, accuracy,
forward-only throughput, the physical limit per model, and the echo engine's CPU per request.

``bench profile``: where a request's time goes at one load (tokenize, queue, forward, the rest),
the physical limit, and optionally a py-spy sample of the server.

A new subcommand is a pair ``(add_parser, run)`` in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Sequence

from muxserve.bench.native import PROTOCOLS

NAME = "bench"


# --------------------------------------------------------------------------- bench model


def bench_models(
    repository: str,
    models: Sequence[str],
    seq_len: int = 64,
    batch_texts: int = 320,
    seconds: float = 5.0,
    rounds: int = 3,
    threads: int = 0,
    device: str = "cpu",
    precision: str | Sequence[str] = "fp32",
    stat: str = "best",
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Texts/s of each model's forward pass (``forward_throughput``) on ``batch_texts`` random texts
    of ``seq_len`` tokens. Every round measures every model for at least ``seconds`` (the model
    order rotates from round to round); a model's ``texts_per_s`` is its ``best`` (default) or
    ``median`` round. ``precision`` is the serving precision, or several (a list or ``"fp32,bf16"``:
    every model in each, all in the same interleaved rounds); ``auto`` resolves as the server
    does (bf16 on CPUs with bf16 units, fp16 on CUDA, int8 on other x86 CPUs with AVX2). ``ratio_to_first`` is relative to the first
    model, ``ratio_to_baseline`` to the first N=1 model (null without one), both at the same
    precision; ``ratio_to_fp32`` to the same model in fp32 where that was measured too."""
    import torch

    from muxserve.model.precision import DTYPES, resolve_precision
    from muxserve.model.weights import load_for_serving
    from muxserve.serving.repository import resolve_model_dir
    from muxserve.training.evaluate import forward_throughput

    if not models:
        raise ValueError("no models to benchmark")
    if stat not in ("best", "median"):
        raise ValueError(f"stat must be 'best' or 'median', not {stat!r}")
    if threads:
        torch.set_num_threads(threads)
    requested = precision.split(",") if isinstance(precision, str) else list(precision)
    precisions = list(dict.fromkeys(resolve_precision(p.strip(), device) for p in requested if p.strip()))
    loaded = []
    for prec in precisions:
        for name in models:
            directory = resolve_model_dir(repository, name)
            loaded.append((name, prec, directory, load_for_serving(directory, device, prec)))
    bad = sorted({f"{name} (N={m.config.num_instances})" for name, _, _, m in loaded if batch_texts % m.config.num_instances})
    if bad:
        lcm = math.lcm(*(m.config.num_instances for _, _, _, m in loaded))
        raise ValueError(f"--batch-texts {batch_texts} is not a multiple of N for {', '.join(bad)}: use a multiple of {lcm}")

    samples: list[list[float]] = [[] for _ in loaded]
    for r in range(max(1, rounds)):
        for k in range(len(loaded)):
            i = (k + r) % len(loaded)
            name, prec, _, model = loaded[i]
            result = forward_throughput(model, batch_texts, seq_len, min_seconds=seconds, warmup=2 if r == 0 else 1)
            samples[i].append(result.texts_per_s)
            if log is not None:
                log(f"round {r + 1}/{rounds} {name} {prec}: {result.texts_per_s:.1f} texts/s ({result.seconds:.1f} s)")

    out = []
    for (name, prec, directory, model), values in zip(loaded, samples, strict=True):
        best, median = max(values), statistics.median(values)
        cfg = model.config
        out.append({
            "model": name, "path": str(directory), "num_instances": cfg.num_instances, "muxing_variant": cfg.muxing_variant if cfg.is_mux else None,
            "parameters": model.num_parameters(), "texts_per_s": best if stat == "best" else median, "texts_per_s_best": best, "texts_per_s_median": median,
            "rounds": [round(v, 2) for v in values], "seq_len": seq_len, "batch_texts": batch_texts, "seconds_per_round": seconds,
            "device": device, "precision": prec, "dtype": str(DTYPES[prec]).removeprefix("torch."), "threads": torch.get_num_threads(), "stat": stat,
        })
    fp32 = {o["model"]: o["texts_per_s"] for o in out if o["precision"] == "fp32"}
    for prec in precisions:
        rows = [o for o in out if o["precision"] == prec]
        first = rows[0]["texts_per_s"]
        baseline = next((o["texts_per_s"] for o in rows if o["num_instances"] == 1), None)
        for o in rows:
            o["ratio_to_first"] = o["texts_per_s"] / first if first > 0 else None
            o["ratio_to_baseline"] = o["texts_per_s"] / baseline if baseline else None
            o["ratio_to_fp32"] = o["texts_per_s"] / fp32[o["model"]] if fp32.get(o["model"]) else None
    return out


def _add_model(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("model", help="forward throughput of models at equal texts per batch and sequence length, in one run")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--models", required=True, help="comma-separated model names (or model folders); ratios are to the first and to the N=1 model")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-texts", type=int, default=320, help="texts per forward pass, a multiple of every model's N")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per model per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; a model's result is its best (or median) round")
    p.add_argument("--stat", choices=["best", "median"], default="best")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="auto | fp32 | bf16 | fp16 | int8, or several comma-separated (measured in the same rounds); auto: as `muxserve serve` picks it (bf16 on CPUs with bf16 units, fp16 on CUDA, int8 on other x86 CPUs with AVX2)")
    p.add_argument("--json", action="store_true", help="print only the JSON list")


def _run_model(a: argparse.Namespace) -> int:
    import sys

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    log = None if a.json else (lambda line: print(line, file=sys.stderr, flush=True))
    results = bench_models(a.model_repository, models, a.seq_len, a.batch_texts, a.seconds, a.rounds, a.threads, a.device, a.precision, a.stat, log)
    if a.json:
        print(json.dumps(results))
        return 0
    print(f"seq_len {a.seq_len}, {a.batch_texts} texts per batch, {results[0]['threads']} threads, {a.device}, {a.stat} of {a.rounds} rounds")
    print(f"{'model':<24} {'N':>3} {'precision':>9} {'texts/s':>10} {'x first':>8} {'x N=1':>7} {'x fp32':>7}")
    for r in results:
        base, fp32 = (f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("ratio_to_baseline", "ratio_to_fp32"))
        print(f"{r['model']:<24} {r['num_instances']:>3} {r['precision']:>9} {r['texts_per_s']:>10.1f} {r['ratio_to_first']:>8.2f} {base:>7} {fp32:>7}")
    return 0


# --------------------------------------------------------------------------- bench serve / profile


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _protocols(text: str, option: str) -> list[str]:
    protocols = list(PROTOCOLS) if text == "all" else _names(text)
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise SystemExit(f"{option}: unknown {bad or text!r} (comma-separated of {', '.join(PROTOCOLS)}, or all)")
    return protocols


def _add_serve(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("serve", help="served throughput, latency and accuracy: sweep models x concurrency x texts per request; results.json, results.md, plots")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--models", default="", help="comma-separated (default: every model in the repository, N=1 first); the first N=1 model is the baseline of the ratios")
    p.add_argument("--concurrency", default="64", help="requests in flight (connections), comma-separated")
    p.add_argument("--texts-per-request", default="1,8", help="comma-separated")
    p.add_argument("--protocol", default="classify", help=f"comma-separated of {', '.join(PROTOCOLS)} (classify: /v1/classify; json, binary: KServe v2 infer; grpc: ModelInfer), or all")
    p.add_argument("--duration", type=float, default=10.0, help="measuring seconds per point")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load before each point")
    p.add_argument("--client-threads", type=int, default=1, help="load generator threads (they share the machine with the server)")
    p.add_argument("--echo-protocols", default="all", help="protocols for the echo engine's CPU per request (comma-separated, all, or none)")
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument("--texts", default="", help="text source for the load: a .tsv with a header (first column) or one text per line (default: SST-2 dev)")
    p.add_argument("--accuracy-data", default="", help="labeled TSV for accuracy (default: SST-2 dev)")
    p.add_argument("--accuracy-limit", type=int, default=None, help="score only the first K examples")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--forward-seconds", type=float, default=3.0, help="forward-pass-alone measurement per model (0: skip)")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="matmul-rate measurement per model for the physical limit (0: skip)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `muxserve serve` (repeatable), e.g. --server-arg=--threads=1")


def _run_serve(a: argparse.Namespace) -> int:
    import shlex
    import sys
    from pathlib import Path

    from muxserve.bench.run import repository_models
    from muxserve.bench.serve import SweepOptions, run_sweep

    models = _names(a.models) or repository_models(a.model_repository)
    if not models:
        raise SystemExit(f"no models with weights in {a.model_repository}")
    opts = SweepOptions(
        repository=a.model_repository, models=models, concurrency=_ints(a.concurrency), texts_per_request=_ints(a.texts_per_request), protocols=_protocols(a.protocol, "--protocol"),
        duration=a.duration, warmup=a.warmup, client_threads=a.client_threads, echo_protocols=[] if a.echo_protocols == "none" else _protocols(a.echo_protocols, "--echo-protocols"), out=a.out, texts=a.texts, accuracy=not a.no_accuracy, accuracy_data=a.accuracy_data, accuracy_limit=a.accuracy_limit,
        forward_seconds=a.forward_seconds, matmul_seconds=a.matmul_seconds, server_args=a.server_arg, command="muxserve " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
    )
    report = run_sweep(opts)
    print((Path(a.out) / "results.md").read_text())
    print(f"wrote {Path(a.out) / 'results.json'}, results.md and plots in {report['seconds']['total']:.0f} s", file=sys.stderr)
    return 0


def _add_profile(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("profile", help="where a request's time goes at one load (tokenize, queue, forward, protocol) and the physical limit")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--models", default="sst2-bert,sst2-mux5", help="comma-separated")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--protocol", choices=PROTOCOLS, default="classify")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--out", default="bench-profile")
    p.add_argument("--texts", default="", help="text source (default: SST-2 dev)")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="0: skip the physical limit")
    p.add_argument("--py-spy", action="store_true", help="sample the server process with py-spy during each model's run")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `muxserve serve` (repeatable)")


def _run_profile(a: argparse.Namespace) -> int:
    from pathlib import Path

    from muxserve.bench.serve import run_profile

    run_profile(a.model_repository, _names(a.models), a.concurrency, a.texts_per_request, a.protocol, a.duration, a.warmup, Path(a.out), a.texts, a.matmul_seconds, a.py_spy, a.server_arg)
    return 0


# --------------------------------------------------------------------------- dispatch

SUBCOMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "model": (_add_model, _run_model),
    "serve": (_add_serve, _run_serve),
    "profile": (_add_profile, _run_profile),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="benchmarks: " + ", ".join(f"bench {k}" for k in SUBCOMMANDS))
    bsub = p.add_subparsers(dest="bench_command", required=True)
    for adder, _ in SUBCOMMANDS.values():
        adder(bsub)


def run(a: argparse.Namespace) -> int:
    return SUBCOMMANDS[a.bench_command][1](a)
