"""``muxserve bench``: benchmarks, one subcommand each.

``bench model``: forward-pass throughput of several models at equal texts per batch and equal
sequence length, all in one process, measured in interleaved rounds so that a noisy machine (other
jobs, frequency scaling) hurts every model alike. Prints a JSON list with ``--json``.

A new subcommand (e.g. ``bench serve``) is a pair ``(add_parser, run)`` in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Sequence

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
    dtype: str = "float32",
    stat: str = "best",
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Texts/s of each model's forward pass (``forward_throughput``) on ``batch_texts`` random texts
    of ``seq_len`` tokens. Every round measures every model for at least ``seconds`` (the model
    order rotates from round to round); a model's ``texts_per_s`` is its ``best`` (default) or
    ``median`` round. ``ratio_to_first`` is relative to the first model, ``ratio_to_baseline`` to
    the first N=1 model (null without one)."""
    import torch

    from muxserve.model.weights import load_model
    from muxserve.repository import resolve_model_dir
    from muxserve.training.evaluate import forward_throughput

    if not models:
        raise ValueError("no models to benchmark")
    if stat not in ("best", "median"):
        raise ValueError(f"stat must be 'best' or 'median', not {stat!r}")
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    loaded = []
    for name in models:
        directory = resolve_model_dir(repository, name)
        model = load_model(directory, device=device, dtype=torch_dtype)
        loaded.append((name, directory, model))
    bad = [f"{name} (N={m.config.num_instances})" for name, _, m in loaded if batch_texts % m.config.num_instances]
    if bad:
        lcm = math.lcm(*(m.config.num_instances for _, _, m in loaded))
        raise ValueError(f"--batch-texts {batch_texts} is not a multiple of N for {', '.join(bad)}: use a multiple of {lcm}")

    samples: list[list[float]] = [[] for _ in loaded]
    for r in range(max(1, rounds)):
        for k in range(len(loaded)):
            i = (k + r) % len(loaded)
            name, _, model = loaded[i]
            result = forward_throughput(model, batch_texts, seq_len, min_seconds=seconds, warmup=2 if r == 0 else 1)
            samples[i].append(result.texts_per_s)
            if log is not None:
                log(f"round {r + 1}/{rounds} {name}: {result.texts_per_s:.1f} texts/s ({result.seconds:.1f} s)")

    out = []
    for (name, directory, model), values in zip(loaded, samples, strict=True):
        best, median = max(values), statistics.median(values)
        cfg = model.config
        out.append({
            "model": name, "path": str(directory), "num_instances": cfg.num_instances, "muxing_variant": cfg.muxing_variant if cfg.is_mux else None,
            "parameters": model.num_parameters(), "texts_per_s": best if stat == "best" else median, "texts_per_s_best": best, "texts_per_s_median": median,
            "rounds": [round(v, 2) for v in values], "seq_len": seq_len, "batch_texts": batch_texts, "seconds_per_round": seconds,
            "device": device, "dtype": dtype, "threads": torch.get_num_threads(), "stat": stat,
        })
    first = out[0]["texts_per_s"]
    baseline = next((o["texts_per_s"] for o in out if o["num_instances"] == 1), None)
    for o in out:
        o["ratio_to_first"] = o["texts_per_s"] / first if first > 0 else None
        o["ratio_to_baseline"] = o["texts_per_s"] / baseline if baseline else None
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
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print only the JSON list")


def _run_model(a: argparse.Namespace) -> int:
    import sys

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    log = None if a.json else (lambda line: print(line, file=sys.stderr, flush=True))
    results = bench_models(a.model_repository, models, a.seq_len, a.batch_texts, a.seconds, a.rounds, a.threads, a.device, a.dtype, a.stat, log)
    if a.json:
        print(json.dumps(results))
        return 0
    print(f"seq_len {a.seq_len}, {a.batch_texts} texts per batch, {results[0]['threads']} threads, {a.device} {a.dtype}, {a.stat} of {a.rounds} rounds")
    print(f"{'model':<24} {'N':>3} {'texts/s':>10} {'x first':>8} {'x N=1':>7}")
    for r in results:
        base = f"{r['ratio_to_baseline']:.2f}" if r["ratio_to_baseline"] is not None else "-"
        print(f"{r['model']:<24} {r['num_instances']:>3} {r['texts_per_s']:>10.1f} {r['ratio_to_first']:>8.2f} {base:>7}")
    return 0


# --------------------------------------------------------------------------- dispatch

SUBCOMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "model": (_add_model, _run_model),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="benchmarks: " + ", ".join(f"bench {k}" for k in SUBCOMMANDS))
    bsub = p.add_subparsers(dest="bench_command", required=True)
    for adder, _ in SUBCOMMANDS.values():
        adder(bsub)


def run(a: argparse.Namespace) -> int:
    return SUBCOMMANDS[a.bench_command][1](a)
