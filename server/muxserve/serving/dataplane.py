"""The protocol-agnostic data plane: validate, tokenize, submit, format.

HTTP (KServe v2 + ``/v1/classify``) and gRPC are thin adapters over this class; every rule
about what a valid request is and what an answer looks like lives here, once. It runs in each
frontend process and reaches the models through an ``EngineClient`` (the engine process);
``registry`` is the frontend's copy of the engine's model index.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from muxserve import __version__
from muxserve.serving.admission import Admission, ReceivingBudget
from muxserve.serving.codecs import CONFIG_DATATYPES, element_count
from muxserve.serving.engine_client import EngineClient
from muxserve.serving.engine_client import ModelView as ServedModel
from muxserve.serving.errors import BadRequest, ClientClosed, ModelNotFound, NotReady, Overloaded, PayloadTooLarge, ServingError
from muxserve.serving.settings import Settings
from muxserve.serving.types import InferRequest, InferResponse, OutputTensor, RequestOptions

SERVER_NAME = "muxserve"
EXTENSIONS = ["classification", "model_repository", "schedule_policy", "model_configuration", "statistics", "binary_tensor_data"]
TEXT, LOGITS, LABEL = "TEXT", "LOGITS", "LABEL"
# request parameters (KServe v2 ``parameters``, and ``/v1/classify``'s) and the response's
MAX_NUM_INSTANCES, ENSEMBLE, NUM_INSTANCES = "max_num_instances", "ensemble", "num_instances"
# tokenizing a big request on the event loop would stall every other caller
OFFLOOP_TOKENIZE_CHARS = 64 * 1024
DRAIN_QUIET_S = 0.5  # a draining frontend closes its listeners once no request came for this long
# what an input tensor declares before its data is decoded: (name, datatype, shape)
Declared = tuple[str, str, Sequence[int]]


class DataPlane:
    def __init__(self, engine: EngineClient, settings: Settings) -> None:
        self.engine = engine
        self.registry = engine.models
        self.settings = settings
        self.draining = False
        self.admission = Admission(settings.max_texts_in_flight, settings.max_queue_wait_s)
        self.receiving = ReceivingBudget(settings.max_receiving_bytes)  # HTTP bodies and gRPC messages arriving
        self._requests = 0  # inference requests in this frontend (drain waits for none)
        self._in_flight = InferenceInFlight(self)
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_request = 0.0

    # ------------------------------------------------------------------ health & metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when a model serves; in explicit mode with nothing asked for at start, at once (as Triton)."""
        if self.draining or not self.engine.connected:
            return False
        nothing_asked = self.settings.model_control_mode == "explicit" and not self.settings.load_models
        return any(m.ready for m in self.registry.all()) or (nothing_asked and not self.registry.models)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.registry.find(name, version).ready and self.engine.connected and not self.draining

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        served = self.registry.find(name, version)
        cfg = served.config
        batch_dim = [-1] if cfg.max_batch_size > 0 else []

        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "datatype": CONFIG_DATATYPES[mc.DataType.Name(t.data_type)], "shape": batch_dim + list(t.dims)}

        versions = sorted((v for v in self.registry.models[name] if v), key=int)
        return {"name": served.name, "versions": versions, "platform": cfg.platform or cfg.backend or SERVER_NAME, "inputs": [tensor(t) for t in cfg.input], "outputs": [tensor(t) for t in cfg.output]}

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        return self.registry.find(name, version).config

    async def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Triton statistics entries (``observability.stats.model_statistics``), from the engine."""
        if name:
            served = self.registry.find(name, version)
            return await self.engine.query("stats", served.name, served.version)
        return await self.engine.query("stats")

    async def metrics(self) -> bytes:
        """The Prometheus exposition of the whole server (every count is made in the engine)."""
        return await self.engine.query("metrics")

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every loaded version with its state, then (unless ``ready_only``) the repository's models
        that are not loaded, by name alone (as Triton lists them)."""
        rows = []
        for m in self.registry.all():
            if ready_only and not m.ready:
                continue
            row = {"name": m.name, "version": m.version, "state": m.state}
            if m.reason:
                row["reason"] = m.reason
            rows.append(row)
        if not ready_only:
            rows += [{"name": name} for name in self.registry.unloaded()]
        return rows

    async def load_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Triton's RepositoryModelLoad: (re)load ``name`` from the repository."""
        if parameters:
            raise BadRequest(f"load parameters {sorted(parameters)} are not supported: put the model's config and files in the repository")
        await self.engine.control("load", name)

    async def unload_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Triton's RepositoryModelUnload (``unload_dependents`` is accepted: a model's families
        are always unloaded with it, as they cannot serve without it)."""
        unknown = set(parameters) - {"unload_dependents"}
        if unknown:
            raise BadRequest(f"unload parameters {sorted(unknown)} are not supported")
        await self.engine.control("unload", name)

    async def drain(self) -> None:
        """Stop accepting inference requests (503) and wait for those accepted to be answered,
        then for callers to stop trying: refused ones until DRAIN_QUIET_S pass without a
        request, so that none is cut off by the listeners closing while it is under way."""
        self.draining = True
        while True:
            await self._idle.wait()
            quiet = self._last_request + DRAIN_QUIET_S - time.monotonic()
            if quiet <= 0 and self._idle.is_set():
                return
            await asyncio.sleep(max(quiet, 0.0))

    # ------------------------------------------------------------------ inference

    async def infer(self, request: InferRequest, arrived: float | None = None, served: ServedModel | None = None) -> InferResponse:
        """``arrived``: when the adapter read the request (``time.monotonic()``); the request's
        time in the server, which its duration and the queue-wait bound cover, starts there.
        ``served``: the model version an adapter looked up for the request
        (``registry.find``) and whose ``check_inputs`` the request's inputs already passed."""
        if served is None:
            served = self.registry.get_ready(request.model_name, request.model_version)
            checked = False
        else:
            self.registry.require_ready(request.model_name, served)
            checked = True
        with self._request():
            return await self._infer(served, request, arrived, checked)

    async def _infer(self, served: ServedModel, request: InferRequest, arrived: float | None = None, checked: bool = False) -> InferResponse:
        start = time.monotonic() if arrived is None else arrived
        async with self.counting_failures(served, start):
            self._accepting(served)
            texts = self._texts(served, request, checked)
            wanted = self._requested_outputs(served, request)
            options = request_options(served, request.parameters)
            logits, truncated, version = await self._run(served, texts, start, options, request.model_version)
        outputs = [self._output(served, name, params, logits) for name, params in wanted]
        params: dict[str, Any] = {NUM_INSTANCES: max(options.num_instances)}
        if truncated:
            params["truncated_count"] = len(truncated)
            params["truncated_indices"] = ",".join(map(str, truncated))
        return InferResponse(served.name, version, outputs, request.id, params)

    async def classify(self, model: str, texts: list[str], parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The simple API: one {label, score, num_instances} per text (score: softmax
        probability; num_instances: the N that served it). Up to ``max_client_batch_size``
        texts; more than the model's ``max_batch_size`` are split into several of its batches."""
        served = self.registry.get_ready(model)
        with self._request():
            return await self._classify(served, texts, parameters or {})

    async def _classify(self, served: ServedModel, texts: list[str], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        start = time.monotonic()
        async with self.counting_failures(served, start):
            self._accepting(served)
            limit = self.settings.max_client_batch_size
            if not texts:
                raise BadRequest("'inputs' must be a non-empty list of strings")
            if len(texts) > limit:
                raise PayloadTooLarge(f"{len(texts)} inputs exceed the limit of {limit} texts per request (max_client_batch_size)")
            for i, text in enumerate(texts):
                if not text.strip():
                    raise BadRequest(f"inputs[{i}] is empty")
            options = request_options(served, parameters)
            logits, _, _ = await self._run(served, texts, start, options)
        answers = []
        for row, n in zip(logits.tolist(), options.num_instances, strict=True):
            best = row.index(max(row))
            answers.append({"label": _label(served, best), "score": _top_probability(row, best), NUM_INSTANCES: n})
        return answers

    def counting_failures(self, served: ServedModel, start: float | None = None) -> FailureCount:
        """Count a request that fails inside the ``async with`` block in its model's failure
        counters (also one the adapter refuses before the data plane sees it, e.g. malformed
        JSON). The counts live in the engine: a failure found here is counted there before the
        caller hears of it (an overload refusal: sent before, counted before any later request
        of this frontend reaches the engine); one the engine found (queue full, a failed pass)
        it has counted itself."""
        return FailureCount(self.engine, served, time.monotonic() if start is None else start)

    def _request(self) -> InferenceInFlight:
        """An inference request in this frontend, from lookup to answer (drain waits for all)."""
        return self._in_flight

    def _accepting(self, served: ServedModel) -> None:
        if self.draining:
            raise NotReady(f"model {served.name} is not accepting requests (shutting down)")

    async def _run(self, served: ServedModel, texts: list[str], start: float, options: RequestOptions, version: str = "") -> tuple[np.ndarray, list[int], str]:
        """Tokenize here; queue, run, count (and shadow-sample) in the engine. More texts than
        the model's ``max_batch_size`` run there as several of its batches; ``options.num_instances``
        gets the N of every text. Returns (logits, truncated texts, the version that served them):
        without a ``version`` asked for, the engine's current one, which a reload may have
        changed since this frontend looked."""
        assert served.tokenizer is not None
        limit = self.settings.max_text_chars
        with self.admission.admitted(served.name, len(texts), start):
            chars = sum(map(len, texts))
            cut = [i for i, t in enumerate(texts) if len(t) > limit] if chars > limit else []
            if cut:
                texts = [t[:limit] for t in texts]
                chars = sum(map(len, texts))
            t0 = time.monotonic()
            if chars > OFFLOOP_TOKENIZE_CHARS:
                encoded = await asyncio.to_thread(served.tokenizer.encode, texts)
            else:
                encoded = served.tokenizer.encode(texts)
            truncated = sorted(set(cut) | {i for i, t in enumerate(encoded.truncated) if t}) if cut or any(encoded.truncated) else []
            logits, options.num_instances, version = await self.engine.infer(served, version, encoded.ids, start, time.monotonic() - t0, options)
        return logits, truncated, version

    # ------------------------------------------------------------------ validation & formatting

    def check_inputs(self, served: ServedModel, declared: Sequence[Declared]) -> None:
        """Everything about the inputs that their declarations show, checked before any data is
        decoded: one BYTES tensor TEXT of shape [batch] or [batch, 1], 1 <= batch <=
        max_batch_size, and no tensor over ``max_tensor_elements``."""
        limit = self.settings.max_tensor_elements
        for name, _, shape in declared:
            count = element_count(list(shape))
            if count > limit:
                raise PayloadTooLarge(f"input '{name}' declares {count} elements; the limit is {limit} per tensor (max_tensor_elements)")
        if len(declared) != 1 or declared[0][0] != TEXT:
            raise BadRequest(f"expected exactly one input named '{TEXT}', got {[d[0] for d in declared]}")
        _, datatype, shape = declared[0]
        if datatype != "BYTES":
            raise BadRequest(f"input '{TEXT}' must have datatype BYTES, got {datatype}")
        shape = list(shape)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"input '{TEXT}' must have shape [batch] or [batch, 1], got {shape}")
        batch = element_count(shape)
        if batch == 0:
            raise BadRequest(f"input '{TEXT}' is empty: batch size must be at least 1")
        if batch > served.max_batch_size:
            raise BadRequest(f"batch of {batch} texts exceeds max_batch_size {served.max_batch_size} of model '{served.name}'")

    def _texts(self, served: ServedModel, request: InferRequest, checked: bool = False) -> list[str]:
        if not checked:
            self.check_inputs(served, [(t.name, t.datatype, t.shape) for t in request.inputs])
        tensor = request.inputs[0]
        batch = element_count(list(tensor.shape))
        if len(tensor.data) != batch:
            raise BadRequest(f"input '{TEXT}' has shape {list(tensor.shape)} ({batch} elements) but {len(tensor.data)} values")
        texts = []
        for i, item in enumerate(tensor.data):
            if type(item) is not str:
                item = _decoded_text(i, item)
            if not item.strip():
                raise BadRequest(f"input '{TEXT}' element {i} is empty")
            texts.append(item)
        return texts

    @staticmethod
    def _requested_outputs(served: ServedModel, request: InferRequest) -> list[tuple[str, dict[str, Any]]]:
        declared = served.output_names
        if request.outputs is None:
            return [(name, {}) for name in declared]
        wanted = []
        for out in request.outputs:
            if out.name not in declared:
                raise BadRequest(f"unknown output '{out.name}' for model '{served.name}' (outputs: {', '.join(declared)})")
            wanted.append((out.name, out.parameters))
        return wanted

    @staticmethod
    def _output(served: ServedModel, name: str, params: dict[str, Any], logits: np.ndarray) -> OutputTensor:
        batch = logits.shape[0]
        k = int(params.get("classification", 0) or 0)
        if k > 0:  # Triton's classification extension: "score:index:label", best first
            k = min(k, logits.shape[1])
            order = np.argsort(-logits, axis=1)[:, :k]
            entries = [f"{logits[b, c]:f}:{c}:{_label(served, c)}".encode() for b in range(batch) for c in order[b]]
            return OutputTensor(name, "BYTES", [batch, k], entries)
        if name == LOGITS:
            return OutputTensor(LOGITS, "FP32", [batch, logits.shape[1]], logits.astype(np.float32, copy=False))
        names = served.label_bytes
        labels = [names[i] if i < len(names) else str(i).encode() for i in logits.argmax(-1).tolist()]
        return OutputTensor(LABEL, "BYTES", [batch, 1], labels)


class FailureCount:
    """``DataPlane.counting_failures``: a class rather than a generator, as every request enters it."""

    __slots__ = ("engine", "served", "start")

    def __init__(self, engine: EngineClient, served: ServedModel, start: float) -> None:
        self.engine, self.served, self.start = engine, served, start

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or getattr(exc, "counted", False):
            return False
        seconds = time.monotonic() - self.start
        if isinstance(exc, Overloaded | ClientClosed):  # refused at once, or nobody waits: no wait for the count
            self.engine.count_failure(self.served, exc.reason, seconds)
        elif isinstance(exc, ServingError):
            await self.engine.report_failure(self.served, exc.reason, seconds)
        elif isinstance(exc, asyncio.CancelledError):
            asyncio.ensure_future(self.engine.report_failure(self.served, "cancelled", seconds))
        return False


class InferenceInFlight:
    """The data plane's count of inference requests under way (``DataPlane._request``)."""

    __slots__ = ("plane",)

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def __enter__(self) -> None:
        plane = self.plane
        plane._requests += 1
        plane._last_request = time.monotonic()
        plane._idle.clear()

    def __exit__(self, *exc: object) -> None:
        plane = self.plane
        plane._requests -= 1
        if not plane._requests:
            plane._idle.set()


def request_options(served: ServedModel, parameters: dict[str, Any]) -> RequestOptions:
    """The request's ``max_num_instances`` and ``ensemble`` parameters, checked against the model."""
    limit = parameters.get(MAX_NUM_INSTANCES, 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise BadRequest(f"parameter '{MAX_NUM_INSTANCES}' must be a positive integer, got {limit!r}")
    ensemble = parameters.get(ENSEMBLE, False)
    if not isinstance(ensemble, bool):
        raise BadRequest(f"parameter '{ENSEMBLE}' must be a boolean, got {ensemble!r}")
    if limit and not served.is_family and limit < served.num_instances:
        raise BadRequest(f"model '{served.name}' serves at N={served.num_instances}, above max_num_instances {limit} (a model family can serve at a narrower N)")
    return RequestOptions(ensemble=ensemble, max_num_instances=limit)


def _decoded_text(i: int, item: Any) -> str:
    """Element ``i`` of the TEXT input that is not a ``str``: UTF-8 bytes, or refused."""
    if isinstance(item, bytes | bytearray):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"input '{TEXT}' element {i} is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    if isinstance(item, str):
        return item
    raise BadRequest(f"input '{TEXT}' element {i} is not a string")


def _label(served: ServedModel, index: int) -> str:
    """The label of a logits column; columns past the labels (the echo engine's) by number."""
    index = int(index)
    return served.labels[index] if index < len(served.labels) else str(index)


def _top_probability(row: list[float], best: int) -> float:
    """softmax(row)[best] for ``best`` the row's largest logit. In plain Python: a request's few
    logits cost microseconds this way against tens in numpy's per-call overhead."""
    top = row[best]
    return 1.0 / sum(math.exp(v - top) for v in row)


__all__ = ["DataPlane", "ModelNotFound"]
