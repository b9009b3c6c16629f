"""Pieces shared by the serving benchmarks (``muxserve bench serve|profile``, ``benchmarks/``).

- the text source (SST-2 dev sentences by default, or a file) and the machine's description;
- the real server as a subprocess on loopback (``muxserve.launch``);
- the server's own counters: ``/metrics`` (``server_counts``) and Triton statistics
  (``model_stats``), and the per-request time breakdown between two snapshots (``breakdown``);
- offline measurements on the same machine: the engine's forward pass alone at the served
  batch shape (``forward_only``), the physical limit from FLOPs and the matmul rate
  (``physical_limit``), and accuracy on labeled data (``model_accuracy``).
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[3]  # the checkout (editable install): server/muxserve/bench/run.py
SST2_DEV_RELATIVE = Path("shared") / "data" / "sst2" / "dev.tsv"


# ---------------------------------------------------------------------------- texts & machine


def default_sst2_dev() -> Path:
    """``../shared/data/sst2/dev.tsv`` beside the working directory or beside the checkout."""
    for base in (Path.cwd().parent, ROOT.parent):
        candidate = base / SST2_DEV_RELATIVE
        if candidate.exists():
            return candidate
    return ROOT.parent / SST2_DEV_RELATIVE


def load_texts(source: str | Path | None = None) -> list[str]:
    """Sentences of a ``.tsv`` with a header (first column), or one text per line of any other
    file; default: SST-2 dev."""
    path = Path(source) if source else default_sst2_dev()
    if not path.exists():
        raise FileNotFoundError(f"text source {path} not found (SST-2 dev lives in ../shared/data/sst2/dev.tsv; pass a file)")
    if path.suffix == ".tsv":
        from muxserve.training.data import read_tsv_sentences

        texts = read_tsv_sentences(path)
    else:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"no texts in {path}")
    return texts


def machine_info() -> dict:
    import torch

    from muxserve.model.precision import BF16_CPU_FLAGS, cpu_flags, resolve_precision
    from muxserve.serving.cpus import available_cores
    from muxserve.serving.engine import default_threads

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # what decides the CPU's serving precision (``auto``): bf16 matrix units, or none (fp32)
    bf16_units = sorted(BF16_CPU_FLAGS & cpu_flags())
    return {"platform": platform.platform(), "cpu": cpu, "cores": available_cores(), "bf16_units": bf16_units, "cpu_precision": resolve_precision("auto", "cpu"), "engine_threads": default_threads(), "python": platform.python_version(), "torch": torch.__version__, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def units_text(machine: dict) -> str:
    """The CPU's bf16 matrix units and the precision ``auto`` serves on it, for a report."""
    units = machine.get("bf16_units")
    if units is None:  # a report made before these were recorded
        return "bf16 units not recorded"
    return f"bf16 units: {', '.join(units) or 'none'}, CPU precision {machine.get('cpu_precision')}"


# ---------------------------------------------------------------------------- the server's own numbers


def parse_counts(metrics_text: str, model: str, version: str | None = None) -> dict:
    """Requests (success, failure, failures by reason as ``failure:REASON``) and texts of one
    model (all versions, or only ``version``) from /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"success": 0.0, "failure": 0.0, "texts": 0.0, "executions": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.labels.get("model") != model or (version is not None and sample.labels.get("version") != version):
                continue
            if sample.name == "muxserve_requests_total":
                if sample.labels.get("outcome") == "success":
                    out["success"] += sample.value
                else:
                    out["failure"] += sample.value
                    reason = f"failure:{sample.labels.get('reason', '')}"
                    out[reason] = out.get(reason, 0.0) + sample.value
            elif sample.name == "muxserve_inference_texts_total":
                out["texts"] += sample.value
            elif sample.name == "muxserve_executions_total":
                out["executions"] += sample.value
    out["requests"] = out["success"] + out["failure"]
    return out


def server_counts(http_url: str, model: str, timeout: float = 10, version: str | None = None) -> dict:
    """``parse_counts`` of ``GET /metrics`` (``http_url``: host:port or http://host:port)."""
    base = http_url if "://" in http_url else f"http://{http_url}"
    return parse_counts(httpx.get(f"{base.rstrip('/')}/metrics", timeout=timeout).text, model, version)


def counts_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def failures_except_cancelled(counts: dict) -> float:
    """Failures other than clients that went away (a load generator stopping mid-request)."""
    return counts.get("failure", 0.0) - counts.get("failure:cancelled", 0.0)


def model_stats(http_url: str, model: str, timeout: float = 10) -> dict:
    """The Triton statistics entry of a model (its served version) from ``/v2/models/{m}/stats``."""
    base = http_url if "://" in http_url else f"http://{http_url}"
    return httpx.get(f"{base.rstrip('/')}/v2/models/{model}/stats", timeout=timeout).json()["model_stats"][0]


async def model_stats_async(client: httpx.AsyncClient, http_url: str, model: str) -> dict:
    base = http_url if "://" in http_url else f"http://{http_url}"
    return (await client.get(f"{base.rstrip('/')}/v2/models/{model}/stats")).json()["model_stats"][0]


_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def stats_delta(before: dict, after: dict) -> dict:
    """Triton statistics accumulated between two snapshots of the same model version."""

    def dur(s: dict, key: str) -> tuple[int, int]:
        d = s.get("inference_stats", {}).get(key, {})
        return int(d.get("count", 0)), int(d.get("ns", 0))

    out: dict = {"inference_count": int(after.get("inference_count", 0)) - int(before.get("inference_count", 0)), "execution_count": int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))}
    for key in _DURATIONS:
        (c0, n0), (c1, n1) = dur(before, key), dur(after, key)
        out[key] = {"count": c1 - c0, "ns": n1 - n0}
    prior = {int(b["batch_size"]): (int(b["compute_infer"]["count"]), int(b["compute_infer"]["ns"])) for b in before.get("batch_stats", [])}
    batch = {}
    for b in after.get("batch_stats", []):
        size = int(b["batch_size"])
        c0, n0 = prior.get(size, (0, 0))
        c, n = int(b["compute_infer"]["count"]) - c0, int(b["compute_infer"]["ns"]) - n0
        if c:
            batch[size] = {"count": c, "ns": n}
    out["batch"] = batch
    return out


def breakdown(delta: dict, client_latencies_ms: Sequence[float], seconds: float) -> dict:
    """Where a request's time goes, in ms per request, from the server's statistics over a window
    and the client's latencies over the same window:

    - ``tokenize``: the data plane's tokenization (Triton's compute_input);
    - ``queue``: a text's wait in the scheduler queue for its forward pass (includes waiting for
      the engine to finish the previous batch);
    - ``forward``: the forward pass the text rode in (pass durations weighted by their texts);
    - ``server_other``: the rest of the data plane's time (scheduling, demux of results, the
      event loop's delays in resuming the request);
    - ``protocol_client``: client latency minus the data plane's time: HTTP/gRPC encode and
      decode on both ends, the transport, the web framework, and the client's own event loop.

    Also the engine's busy share of the window and the mean texts per forward pass.
    """

    def mean_ms(d: dict) -> float:
        return d["ns"] / d["count"] / 1e6 if d["count"] else float("nan")

    weighted_texts = sum(size * b["count"] for size, b in delta["batch"].items())
    forward = sum(size * b["ns"] for size, b in delta["batch"].items()) / weighted_texts / 1e6 if weighted_texts else float("nan")
    client = statistics.fmean(client_latencies_ms) if client_latencies_ms else float("nan")
    server, tokenize, queue = mean_ms(delta["success"]), mean_ms(delta["compute_input"]), mean_ms(delta["queue"])
    parts = {"tokenize": tokenize, "queue": queue, "forward": forward, "server_other": server - tokenize - queue - forward, "protocol_client": client - server}
    executions = delta["execution_count"]
    return {
        "client_ms": client,
        "server_ms": server,
        "parts_ms": parts,
        "parts_share": {k: (v / client if client and client == client else float("nan")) for k, v in parts.items()},
        "engine_busy": delta["compute_infer"]["ns"] / 1e9 / seconds if seconds else float("nan"),
        "texts_per_forward": delta["inference_count"] / executions if executions else float("nan"),
        "server_requests": delta["success"]["count"],
        "server_texts": delta["inference_count"],
        "forwards": executions,
    }


# ---------------------------------------------------------------------------- offline measurements


def repository_models(repository: str | Path) -> list[str]:
    """The repository's models that have weights, plain baselines (N=1) first, then by N and name."""
    from muxserve.serving.repository import scan

    entries = [e for e in scan(repository).values() if e.served_versions()]
    return [e.name for e in sorted(entries, key=lambda e: (int(e.parameter("num_instances", "1") or 1), e.name))]


def served_batch_texts(repository: str | Path, model: str, num_instances: int) -> int:
    from muxserve.serving.registry import batch_texts
    from muxserve.serving.repository import scan

    return batch_texts(scan(repository)[model], num_instances)


def forward_only(repository: str | Path, model: str, texts: Sequence[str], seconds: float, settings: object | None = None, rounds: int = 3, pass_texts: int = 0) -> dict:
    """``forward_pass_alone`` in a process of its own, as the server's engine runs in one: a
    thread pool that this process's main thread made for earlier work (accuracy, the matmul
    rate) would slow multi-thread instances (``muxserve.serving.engine.serial_thread``)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(forward_pass_alone, str(repository), model, list(texts), seconds, settings, rounds, pass_texts).result()


def forward_pass_alone(repository: str | Path, model: str, texts: Sequence[str], seconds: float, settings: object | None = None, rounds: int = 3, pass_texts: int = 0) -> dict:
    """Texts/s of the engine alone on the served texts, as a saturated server runs them: with
    the engine options the server chooses for the model (precision; its instances running side by
    side, each at its threads) and the batches its scheduler forms from a full queue of these
    texts (token budget or fixed batch size, length-aware grouping). ``settings``: the server's
    ``Settings`` (default: its defaults). ``seconds`` are split into ``rounds`` of whole passes
    over the texts; the result is the best round (other jobs on the cores only ever slow it),
    every round is in ``rounds_texts_per_s``. ``pass_texts``: passes of that many texts instead
    (in whole mux groups, length-aware as the scheduler picks them), e.g. the mean pass a served
    load formed."""
    from muxserve.model.tokenizer import TextTokenizer
    from muxserve.serving.engine import Engine
    from muxserve.serving.registry import batch_texts, engine_options, max_texts, token_budget
    from muxserve.serving.repository import resolve_model_dir, scan
    from muxserve.serving.scheduler import order_groups, split_queue
    from muxserve.serving.settings import Settings

    settings = settings if isinstance(settings, Settings) else Settings()
    entry = scan(repository)[model]
    directory = resolve_model_dir(repository, model)
    engine = Engine.load(directory, engine_options(entry, settings), name=model)
    try:
        cfg = engine.config
        rows = TextTokenizer(directory / "tokenizer.json", cfg.max_seq_length).encode(list(texts)).ids
        budget = token_budget(entry, settings, cfg.num_instances, cfg.max_seq_length, engine.options.pad_multiple, engine.options.device)
        cap = max_texts(entry, cfg.num_instances) if budget else batch_texts(entry, cfg.num_instances)
        if pass_texts > 0:
            budget, cap = None, max(cfg.num_instances, pass_texts - pass_texts % cfg.num_instances)
        batches, queue = [], list(rows)
        while queue:
            batch, queue = split_queue(queue, len, lambda _: False, cap, settings.length_aware, budget)
            order_groups(batch, len, not queue, settings.length_aware)
            batches.append(batch)
        # every batch shape once on every instance: the first pass at a new shape builds its kernels
        engine.infer_all(b for b in batches for _ in range(engine.options.instances))
        rates, total = [], 0.0
        for _ in range(max(1, rounds)):
            done, start = 0, time.perf_counter()
            while True:  # whole cycles over the batches, so that every round has the texts' mix of lengths
                engine.infer_all(batches)  # on the server's instances, side by side
                done += len(rows)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / max(1, rounds):
                    break
            rates.append(done / elapsed)
            total += elapsed
    finally:
        engine.close()
    return {
        "batch_texts": cap, "max_batch_tokens": budget.max_tokens if budget else None, "mean_batch_texts": len(rows) / len(batches),
        "precision": engine.options.precision, "instances": engine.options.instances, "threads": engine.threads, "forward_texts_per_s": max(rates), "rounds_texts_per_s": rates, "forward_seconds": total,
    }


def physical_limit(repository: str | Path, model: str, texts: Sequence[str], matmul_seconds: float = 2.0, threads: int = 0, precision: str = "fp32") -> dict:
    """The ceiling on texts/s: the matmul rate of this machine (at the encoder's feed-forward
    shape, with the engine's thread count, at the served ``precision``) over the model's FLOPs
    per text on these texts, each text at its own token length (the least work: no padding, mux
    groups of equal lengths).

    Also at the length the engine pads to when a batch of the configured size is taken in
    arrival order (``*_padded``): the work without length-aware grouping."""
    from muxserve.bench.flops import flops_per_text, mean_flops_per_text, measure_matmul_rate
    from muxserve.model.tokenizer import TextTokenizer
    from muxserve.model.weights import load_model
    from muxserve.serving.engine import default_threads
    from muxserve.serving.repository import resolve_model_dir

    directory = resolve_model_dir(repository, model)
    cfg = load_model(directory).config
    tok = TextTokenizer(directory / "tokenizer.json", cfg.max_seq_length)
    lengths = [len(r) for r in tok.encode(list(texts)).ids]
    size = served_batch_texts(repository, model, cfg.num_instances)
    exact = mean_flops_per_text(cfg, lengths, 1, bucketed=False)
    padded = mean_flops_per_text(cfg, lengths, size, bucketed=True)
    length = max(1, round(padded["mean_padded_length"]))
    rows = max(1, size // cfg.num_instances) * length
    rate = measure_matmul_rate(rows, cfg.hidden_size, cfg.intermediate_size, threads or default_threads(), matmul_seconds, dtype=precision)
    return {
        "num_instances": cfg.num_instances,
        "muxing_variant": cfg.muxing_variant if cfg.is_mux else None,
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "batch_texts": size,
        "mean_text_tokens": exact["mean_padded_length"],
        "mean_padded_length": padded["mean_padded_length"],
        "flops_per_text": exact["flops_per_text"],
        "flops_per_text_padded": padded["flops_per_text"],
        "flops_parts_at_mean_length": flops_per_text(cfg, max(1, round(exact["mean_padded_length"]))).as_dict(),
        "matmul": rate,
        "limit_texts_per_s": rate["flops_per_s"] / exact["flops_per_text"],
        "limit_texts_per_s_padded": rate["flops_per_s"] / padded["flops_per_text"],
    }


def accuracy_key(repository: str | Path, model: str, data: str | Path, limit: int | None) -> str:
    """Identifies an accuracy result: the weights (path, size, mtime), the data and the limit."""
    from muxserve.serving.repository import resolve_model_dir

    directory = resolve_model_dir(repository, model)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    stamp = ",".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)
    return f"{os.path.relpath(directory)}|{stamp}|{os.path.relpath(data)}|{limit}"


def model_accuracy(repository: str | Path, model: str, data: str | Path, limit: int | None = None, batch_texts: int = 256) -> dict:
    """``muxserve.training.evaluate.accuracy`` of a repository model on a labeled TSV."""
    from muxserve.model.tokenizer import TextTokenizer
    from muxserve.model.weights import TOKENIZER_FILE, load_model
    from muxserve.serving.repository import resolve_model_dir
    from muxserve.training.data import read_tsv
    from muxserve.training.evaluate import accuracy

    directory = resolve_model_dir(repository, model)
    net = load_model(directory)
    labeled = read_tsv(data, net.config.labels, limit)
    tok = TextTokenizer(directory / TOKENIZER_FILE, net.config.max_seq_length)
    start = time.perf_counter()
    result = accuracy(net, tok, labeled, batch_texts)
    return {**result, "data": os.path.relpath(data), "limit": limit, "seconds": time.perf_counter() - start, "key": accuracy_key(repository, model, data, limit)}
