"""Locust load test for muxserve: KServe v2 over HTTP (binary or JSON tensors), /v1/classify, gRPC.

Headless, e.g. 32 users on sst2-mux5 for 30 s, 8 texts per request, binary tensors over HTTP:

    locust -f benchmarks/locustfile.py --headless -u 32 -r 32 -t 30s --stop-timeout 10 \\
        --host http://127.0.0.1:8000 --csv out/mux5 --model sst2-mux5 --texts-per-request 8

(``--stop-timeout`` lets each user finish its request when the time is up: without it locust
kills requests in flight, which the server counts as cancelled.)

Users (pick with --api, comma-separated, or name the classes after the options as locust allows):

    http-binary  HttpBinaryUser  POST /v2/models/{m}/infer, binary tensor extension (tritonclient's
                                 default encoding, built with tritonclient.http's request encoder)
    http-json    HttpJsonUser    the same request with JSON tensors
    classify     ClassifyUser    POST /v1/classify {"model", "inputs"}
    grpc         GrpcUser        tritonclient.grpc ModelInfer, reported to locust's request events

Every user is closed-loop (no wait between requests) and checks each answer: one label per text,
else the request counts as a failure. Texts come from SST-2 dev (``../shared/data/sst2/dev.tsv``)
or ``--texts FILE`` (a .tsv with a header, or one text per line), cycled in order.

``--server-check`` (on by default) reads the server's own ``/metrics`` when the test starts and
stops, logs both counts and writes them to ``{csv prefix}_server.json``: locust's request count
and the server's ``muxserve_requests_total`` over the same window should agree.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import urlopen

import gevent
import grpc.experimental.gevent as grpc_gevent
import numpy as np
import orjson
from locust import FastHttpUser, User, constant, events, task
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

grpc_gevent.init_gevent()  # before any channel: grpc calls must yield to gevent, not block it

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from muxserve.bench.run import counts_delta, load_texts, parse_counts  # noqa: E402

log = logging.getLogger("muxserve.locust")
HEADER_LENGTH = "Inference-Header-Content-Length"
APIS = ("http-binary", "http-json", "classify", "grpc")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--model", default="sst2-mux5", help="model to load (default sst2-mux5)")
    parser.add_argument("--texts-per-request", type=int, default=1, help="texts per request (default 1)")
    parser.add_argument("--texts", default="", help="text source: .tsv with a header (first column) or one text per line; default SST-2 dev")
    parser.add_argument("--api", default="", help=f"users to run, comma-separated: {', '.join(APIS)} (default http-binary, unless user classes are named)")
    parser.add_argument("--grpc-url", default="", help="gRPC host:port (default: --host's host, port 8001)")
    parser.add_argument("--server-check", choices=["on", "off"], default="on", help="compare with the server's /metrics at the end (default on)")


class _Texts:
    """The shared text source; each request takes the next ``k`` texts."""

    texts: list[str] = []
    counter = itertools.count()

    @classmethod
    def next(cls, k: int) -> list[str]:
        start = next(cls.counter) * k
        return [cls.texts[(start + i) % len(cls.texts)] for i in range(k)]


def _batch(k: int) -> np.ndarray:
    return np.array([[t.encode()] for t in _Texts.next(k)], dtype=object)


def _check(labels: np.ndarray | list | None, k: int) -> None:
    if labels is None or len(labels) != k:
        raise ValueError(f"expected {k} labels, got {None if labels is None else len(labels)}")


class _V2User(FastHttpUser):
    abstract = True
    wait_time = constant(0)
    binary = True

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.model, self.k = o.model, o.texts_per_request
        self.path = f"/v2/models/{self.model}/infer"
        self.label = f"v2 {'binary' if self.binary else 'json'} {self.model} [{self.k}]"

    @task
    def infer(self) -> None:
        tensor = httpclient.InferInput("TEXT", [self.k, 1], "BYTES")
        tensor.set_data_from_numpy(_batch(self.k), binary_data=self.binary)
        outputs = [httpclient.InferRequestedOutput("LABEL", binary_data=self.binary), httpclient.InferRequestedOutput("LOGITS", binary_data=self.binary)]
        body, json_size = httpclient.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
        headers = {"Accept-Encoding": "identity"}
        if json_size is not None:
            headers[HEADER_LENGTH] = str(json_size)
            headers["Content-Type"] = "application/octet-stream"
        else:
            headers["Content-Type"] = "application/json"
        with self.client.post(self.path, data=body, headers=headers, name=self.label, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                length = r.headers.get(HEADER_LENGTH)
                result = httpclient.InferenceServerClient.parse_response_body(r.content, header_length=int(length) if length else None, content_encoding=r.headers.get("Content-Encoding"))
                _check(result.as_numpy("LABEL"), self.k)
            except Exception as exc:
                r.failure(f"bad answer: {type(exc).__name__}: {exc}"[:300])


class HttpBinaryUser(_V2User):
    """KServe v2 infer with the binary tensor data extension (what tritonclient sends)."""

    binary = True


class HttpJsonUser(_V2User):
    """KServe v2 infer with JSON tensors."""

    binary = False


class ClassifyUser(FastHttpUser):
    """The simple JSON API: POST /v1/classify."""

    wait_time = constant(0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.model, self.k = o.model, o.texts_per_request
        self.label = f"/v1/classify {self.model} [{self.k}]"

    @task
    def classify(self) -> None:
        body = orjson.dumps({"model": self.model, "inputs": _Texts.next(self.k)})
        with self.client.post("/v1/classify", data=body, headers={"Content-Type": "application/json"}, name=self.label, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                answer = orjson.loads(r.content)
                _check(answer, self.k)
                if not all("label" in a for a in answer):
                    raise ValueError("answer without label")
            except Exception as exc:
                r.failure(f"bad answer: {type(exc).__name__}: {exc}"[:300])


def _grpc_url(environment: Environment) -> str:
    o = environment.parsed_options
    if o.grpc_url:
        return o.grpc_url
    host = urlsplit(environment.host or "http://127.0.0.1:8000").hostname or "127.0.0.1"
    return f"{host}:8001"


class GrpcUser(User):
    """tritonclient.grpc ModelInfer; each call is fired as a locust request event."""

    wait_time = constant(0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.model, self.k = o.model, o.texts_per_request
        self.label = f"grpc {self.model} [{self.k}]"
        self.client = grpcclient.InferenceServerClient(_grpc_url(self.environment))
        self.outputs = [grpcclient.InferRequestedOutput("LABEL"), grpcclient.InferRequestedOutput("LOGITS")]

    def on_stop(self) -> None:
        self.client.close()

    @task
    def infer(self) -> None:
        tensor = grpcclient.InferInput("TEXT", [self.k, 1], "BYTES")
        tensor.set_data_from_numpy(_batch(self.k))
        start = time.perf_counter()
        exception, length = None, 0
        try:
            result = self.client.infer(self.model, [tensor], outputs=self.outputs)
            response = result.get_response()
            length = response.ByteSize()
            _check(result.as_numpy("LABEL"), self.k)
        except Exception as exc:
            exception = exc
        self.environment.events.request.fire(request_type="grpc", name=self.label, response_time=(time.perf_counter() - start) * 1000, response_length=length, exception=exception, context={})


CLASSES = {"http-binary": HttpBinaryUser, "http-json": HttpJsonUser, "classify": ClassifyUser, "grpc": GrpcUser}


# ---------------------------------------------------------------------------- setup and the server check

_server: dict = {}


def _metrics_url(environment: Environment) -> str:
    return (environment.host or "http://127.0.0.1:8000").rstrip("/")


def server_counts(base: str, model: str) -> dict:
    """The model's request and text counters from the server's /metrics (urllib: gevent-safe)."""
    with urlopen(f"{base}/metrics", timeout=10) as r:
        return parse_counts(r.read().decode(), model)


@events.init.add_listener
def _init(environment: Environment, **_kwargs) -> None:
    o = environment.parsed_options
    if o is None:  # imported as a library
        return
    _Texts.texts = load_texts(o.texts or None)
    if o.texts_per_request < 1:
        raise ValueError("--texts-per-request must be at least 1")
    named = bool(getattr(o, "user_classes", None))
    if o.api or not named:
        apis = [a.strip() for a in (o.api or "http-binary").split(",") if a.strip()]
        unknown = [a for a in apis if a not in CLASSES]
        if unknown:
            raise ValueError(f"--api: unknown {unknown}; choose from {', '.join(APIS)}")
        environment.user_classes = [CLASSES[a] for a in apis]
    log.info("users %s on model %s, %d text(s) per request, %d texts", [c.__name__ for c in environment.user_classes], o.model, o.texts_per_request, len(_Texts.texts))


@events.test_start.add_listener
def _test_start(environment: Environment, **_kwargs) -> None:
    o = environment.parsed_options
    if o is not None and o.server_check == "on":
        try:
            _server["before"] = server_counts(_metrics_url(environment), o.model)
        except Exception as exc:  # the load test goes on without the check
            log.warning("server check off: cannot read %s/metrics: %s", _metrics_url(environment), exc)


@events.test_stop.add_listener
def _test_stop(environment: Environment, **_kwargs) -> None:
    o = environment.parsed_options
    if o is not None and o.csv_prefix:
        # locust rewrites its CSV files every CSV_STATS_INTERVAL_SEC and not at exit: let it catch
        # up with the last second of the run, or the CSV misses up to a second of requests
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)
    if o is None or o.server_check != "on" or "before" not in _server:
        return
    try:
        after = server_counts(_metrics_url(environment), o.model)
    except Exception as exc:
        log.warning("server check: cannot read /metrics at the end: %s", exc)
        return
    delta = counts_delta(_server["before"], after)
    total = environment.stats.total
    check = {
        "model": o.model,
        "locust_requests": total.num_requests,
        "locust_failures": total.num_failures,
        "server_requests": delta["requests"],
        "server_failures": delta["failure"],
        "server_texts": delta["texts"],
        "texts_per_request": o.texts_per_request,
        "ratio": total.num_requests / delta["requests"] if delta["requests"] else None,
    }
    log.info("server check: locust %d requests (%d failures), server %d requests (%d failures), %d texts; ratio %s", check["locust_requests"], check["locust_failures"], check["server_requests"], check["server_failures"], check["server_texts"], f"{check['ratio']:.3f}" if check["ratio"] else "-")
    if o.csv_prefix:
        Path(f"{o.csv_prefix}_server.json").write_text(json.dumps(check, indent=2) + "\n")
