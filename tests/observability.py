"""Test support for observability: model repositories of chosen sizes, /metrics scraping, the
metric names in PromQL expressions, a real Prometheus on loopback, and a closed-loop load.

Imported by tests/test_metrics_*.py, tests/test_prometheus.py, tests/test_shadow.py and by
benchmarks/metrics_snapshot.py (which puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml
from helpers import ROOT, free_port, tiny_config
from prometheus_client.parser import text_string_to_metric_families

from muxserve.model.muxbert import MuxBertModel
from muxserve.model.packaging import default_config, package_model
from muxserve.model.weights import minilm_dir, save_model

DOCKER = ROOT / "docker"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
RULES_YML = DOCKER / "prometheus" / "rules.yml"
RULES_TEST_YML = DOCKER / "prometheus" / "rules_test.yml"
DASHBOARD_JSON = DOCKER / "grafana" / "dashboards" / "muxserve.json"

# A model big enough that the forward pass, not the per-request overhead, dominates on a CPU:
# then a mux model's texts/s over its baseline's shows multiplexing, not HTTP parsing.
COMPUTE_BOUND = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)


# ---------------------------------------------------------------------------- repositories


def balance_classifier(model: MuxBertModel, texts: list[str]) -> MuxBertModel:
    """Scale and shift a random model's classifier so that about half of ``texts`` (grouped N
    by N, as a server would) get each of two labels: an untrained model gives almost every
    text the same label, which makes label agreement trivially 0 or 1."""
    from muxserve.model.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", model.config.max_seq_length)
    n = model.config.num_instances
    usable = texts[: len(texts) - len(texts) % n]
    model.eval()
    with torch.inference_mode():
        model.classifier.weight.mul_(100.0)
        model.classifier.bias.mul_(100.0)
        logits = model(*tokenizer(usable))
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    return model


def make_repository(root: Path, models: dict[str, int], configs: dict[str, dict[str, Any]] | None = None, balance_on: list[str] | None = None, **model_overrides: Any) -> Path:
    """Random models (real MiniLM tokenizer) in Triton layout: ``{name: N}``; ``configs`` maps a
    name to ``default_config`` arguments (baseline, shadow_sample_rate, max_queue_size, ...);
    ``balance_on``: texts to balance the two labels on (``balance_classifier``);
    ``model_overrides`` size the models (default: the tiny test size)."""
    tokenizer = minilm_dir() / "tokenizer.json"
    configs = configs or {}
    for i, (name, n) in enumerate(models.items()):
        torch.manual_seed(i)
        model = MuxBertModel(tiny_config(n, seed=i, **model_overrides))
        if balance_on:
            balance_classifier(model, balance_on)
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp, torch.float32, tokenizer)
            cfg = default_config(name, n, model.config.num_labels, **configs.get(name, {}))
            package_model(tmp, root, name, config=cfg)
    return root


def synthetic_texts(count: int, seed: int = 0, words: tuple[int, int] = (12, 20)) -> list[str]:
    """Movie-review-like sentences of ``words`` words (deterministic)."""
    vocab = "the a movie film plot story actors acting scene director it is was very not quite too good bad great awful fine poor boring fun charming dull and but with".split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, int(rng.integers(words[0], words[1] + 1)))) for _ in range(count)]


# ---------------------------------------------------------------------------- /metrics


Samples = dict[tuple[str, frozenset], float]


def parse_exposition(text: str) -> tuple[Samples, dict[str, str]]:
    """Prometheus text -> ({(sample name, labels): value}, {family name: type})."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def scrape(http_url: str) -> Samples:
    response = httpx.get(f"http://{http_url}/metrics", timeout=10)
    response.raise_for_status()
    return parse_exposition(response.text)[0]


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# ---------------------------------------------------------------------------- PromQL

# words of PromQL that are not metric names (functions are recognised by their '(')
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan", "start", "end", "atan2"}
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "model": ".*"}


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's ``$variables`` with values Prometheus accepts."""
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: GRAFANA_VARIABLES.get(m.group(1), ".*"), expr)  # not $1 of label_replace


def promql_metric_names(expr: str) -> set[str]:
    """Metric names (and recording-rule names) a PromQL expression reads."""
    e = grafana_to_promql(expr)
    names = set(re.findall(r'__name__\s*=~?\s*"([^"]+)"', e))
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', e)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def exported_names(samples: Samples) -> set[str]:
    """Every name a query may use: the sample names, as Prometheus stores them (counters with
    ``_total``, histograms as ``_bucket``/``_sum``/``_count``; families without samples yet
    do not count)."""
    return {name for name, _ in samples}


def recording_rules() -> dict[str, str]:
    """{record name: expression} of rules.yml."""
    doc = yaml.safe_load(RULES_YML.read_text())
    return {rule["record"]: rule["expr"] for group in doc["groups"] for rule in group["rules"] if "record" in rule}


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of the dashboard."""
    dashboard = dashboard or json.loads(DASHBOARD_JSON.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"panel {panel.get('title')!r} ref {target.get('refId')}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
        found.append((f"variable {var.get('name')!r}", m.group(1) if m else query))
    return found


# ---------------------------------------------------------------------------- Prometheus


@dataclass
class PrometheusProcess:
    proc: subprocess.Popen
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        doc = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10).json()
        if doc.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {doc}")
        return doc["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"}
        doc = httpx.get(f"{self.url}/api/v1/query_range", params=params, timeout=30).json()
        if doc.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {doc}")
        return doc["data"]["result"]

    def by_model(self, expr: str, label: str = "model") -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns something."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.25)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll until ``condition`` holds: Prometheus scrapes and evaluates on its own clock, so
        the only way to know it has is to ask it. ``timeout`` only ends a wait that failed."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}\n{self.log()[-2000:]}")
            time.sleep(0.1)

    def rules_evaluated_since(self, unix_time: float) -> bool:
        """Whether every rule group has been evaluated at or after ``unix_time``."""
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]

        def seconds(rfc3339: str) -> float:  # Prometheus writes nanoseconds; keep microseconds
            stamp = re.sub(r"(\.\d{6})\d*", r"\1", rfc3339).replace("Z", "+00:00")
            return datetime.fromisoformat(stamp).timestamp()

        return bool(groups) and all(seconds(g["lastEvaluation"]) >= unix_time for g in groups)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def prometheus_config(target: str, interval: str = "1s") -> dict[str, Any]:
    """The project's prometheus.yml, pointed at ``target`` (host:port) with ``interval``."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"]["scrape_interval"] = interval
    cfg["global"]["evaluation_interval"] = interval
    jobs = [job for job in cfg["scrape_configs"] if job["job_name"] == "muxserve"]
    assert jobs, "prometheus.yml has no job 'muxserve'"
    jobs[0]["static_configs"] = [{"targets": [target]}]
    return cfg


def start_prometheus(workdir: Path, target: str, interval: str = "1s", binary: str | None = None, ready_timeout: float = 60) -> PrometheusProcess:
    """A real Prometheus on loopback with the project's config (rewritten for ``target``) and
    rules, its data in ``workdir``."""
    binary = binary or shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus binary not found (apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = prometheus_config(target, interval)
    for rules in cfg.get("rule_files", []):
        shutil.copyfile(PROMETHEUS_YML.parent / rules, workdir / rules)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = free_port()
    cmd = [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    log = open(workdir / "prometheus.log", "w")
    prom = PrometheusProcess(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), port, workdir)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if prom.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {prom.proc.returncode}:\n{prom.log()}")
        try:
            if httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200:
                return prom
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    prom.stop()
    raise RuntimeError(f"prometheus not ready after {ready_timeout}s:\n{prom.log()}")


# ---------------------------------------------------------------------------- load


async def closed_loop(http_url: str, models: list[str], texts: list[str], concurrency: int, texts_per_request: int, duration: float) -> dict[str, int]:
    """The same closed loop against each model at once (tritonclient.http.aio, binary data):
    ``concurrency`` callers per model, each sending ``texts_per_request`` texts and the next
    request when the answer comes, for ``duration`` seconds. Returns texts answered per model."""
    import tritonclient.http.aio as aioclient
    from tritonclient.http import InferInput, InferRequestedOutput

    done = dict.fromkeys(models, 0)
    client = aioclient.InferenceServerClient(http_url, conn_limit=concurrency * len(models) + 4)
    stop = time.monotonic() + duration

    async def caller(model: str, worker: int) -> None:
        i = worker * texts_per_request
        while time.monotonic() < stop:
            batch = [texts[(i + k) % len(texts)].encode() for k in range(texts_per_request)]
            i += concurrency * texts_per_request
            tensor = InferInput("TEXT", [len(batch), 1], "BYTES")
            tensor.set_data_from_numpy(np.array(batch, dtype=object).reshape(-1, 1))
            result = await client.infer(model, [tensor], outputs=[InferRequestedOutput("LABEL")])
            done[model] += len(result.as_numpy("LABEL"))

    try:
        await asyncio.gather(*(caller(m, w) for m in models for w in range(concurrency)))
    finally:
        await client.close()
    return done
