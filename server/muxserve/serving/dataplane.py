"""The protocol-agnostic data plane: validate, tokenize, submit, format.

HTTP (KServe v2 + ``/v1/classify``) and gRPC are thin adapters over this class; every rule
about what a valid request is and what an answer looks like lives here, once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from muxserve import __version__
from muxserve.serving.codecs import CONFIG_DATATYPES, element_count
from muxserve.serving.errors import BadRequest, ModelNotFound, ServingError
from muxserve.serving.registry import ModelRegistry, ServedModel
from muxserve.serving.settings import Settings
from muxserve.serving.types import InferRequest, InferResponse, OutputTensor

SERVER_NAME = "muxserve"
EXTENSIONS = ["classification", "model_repository", "schedule_policy", "model_configuration", "statistics", "binary_tensor_data"]
TEXT, LOGITS, LABEL = "TEXT", "LOGITS", "LABEL"
# tokenizing a big request on the event loop would stall every other caller
OFFLOOP_TOKENIZE_CHARS = 64 * 1024


class DataPlane:
    def __init__(self, registry: ModelRegistry, settings: Settings, shadow: Any = None) -> None:
        self.registry = registry
        self.settings = settings
        self.shadow = shadow
        self.draining = False

    # ------------------------------------------------------------------ health & metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when a model serves; in explicit mode with nothing asked for at start, at once (as Triton)."""
        if self.draining:
            return False
        nothing_asked = self.settings.model_control_mode == "explicit" and not self.settings.load_models
        return any(m.ready for m in self.registry.all()) or (nothing_asked and not self.registry.models)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.registry.find(name, version).ready and not self.draining

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

    def statistics(self, name: str = "", version: str = "") -> list[ServedModel]:
        if name:
            return [self.registry.find(name, version)]
        return [m for m in self.registry.all() if m.monitor is not None]

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
        self.registry.control_allowed()
        if parameters:
            raise BadRequest(f"load parameters {sorted(parameters)} are not supported: put the model's config and files in the repository")
        await self.registry.load(name)

    async def unload_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Triton's RepositoryModelUnload (``unload_dependents`` is accepted: no model depends on another)."""
        self.registry.control_allowed()
        unknown = set(parameters) - {"unload_dependents"}
        if unknown:
            raise BadRequest(f"unload parameters {sorted(unknown)} are not supported")
        await self.registry.unload(name)

    # ------------------------------------------------------------------ inference

    async def infer(self, request: InferRequest) -> InferResponse:
        with self.registry.use(request.model_name, request.model_version) as served:
            return await self._infer(served, request)

    async def _infer(self, served: ServedModel, request: InferRequest) -> InferResponse:
        start = time.perf_counter()
        try:
            texts = self._texts(served, request)
            wanted = self._requested_outputs(served, request)
            logits, truncated = await self._run(served, texts, start)
        except ServingError as exc:
            if served.monitor is not None:
                served.monitor.request_failed(exc.reason, time.perf_counter() - start)
            raise
        except asyncio.CancelledError:
            if served.monitor is not None:
                served.monitor.request_failed("cancelled", time.perf_counter() - start)
            raise
        outputs = [self._output(served, name, params, logits) for name, params in wanted]
        params: dict[str, Any] = {}
        if truncated:
            params["truncated_count"] = len(truncated)
            params["truncated_indices"] = ",".join(map(str, truncated))
        return InferResponse(served.name, served.version, outputs, request.id, params)

    async def classify(self, model: str, texts: list[str]) -> list[dict[str, Any]]:
        """The simple API: one {label, score} per text (score: softmax probability)."""
        with self.registry.use(model) as served:
            return await self._classify(served, texts)

    async def _classify(self, served: ServedModel, texts: list[str]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        model = served.name
        try:
            if not texts:
                raise BadRequest("'inputs' must be a non-empty list of strings")
            if len(texts) > served.max_batch_size:
                raise BadRequest(f"{len(texts)} inputs exceed max_batch_size {served.max_batch_size} of model '{model}'")
            logits, _ = await self._run(served, texts, start)
        except ServingError as exc:
            served.monitor.request_failed(exc.reason, time.perf_counter() - start)
            raise
        probs = _softmax(logits)
        best = probs.argmax(-1)
        return [{"label": _label(served, i), "score": float(p[i])} for i, p in zip(best, probs, strict=True)]

    async def _run(self, served: ServedModel, texts: list[str], start: float) -> tuple[np.ndarray, list[int]]:
        assert served.tokenizer is not None and served.scheduler is not None and served.monitor is not None
        limit = self.settings.max_text_chars
        cut = [i for i, t in enumerate(texts) if len(t) > limit]
        texts = [t[:limit] for t in texts]
        t0 = time.perf_counter()
        if sum(map(len, texts)) > OFFLOOP_TOKENIZE_CHARS:
            encoded = await asyncio.to_thread(served.tokenizer.encode, texts)
        else:
            encoded = served.tokenizer.encode(texts)
        served.monitor.tokenized(time.perf_counter() - t0)
        truncated = sorted(set(cut) | {i for i, t in enumerate(encoded.truncated) if t})
        logits = await served.scheduler.submit(encoded.ids)
        served.monitor.set_queue_depth(served.scheduler.queue_depth)
        served.monitor.request_succeeded(len(texts), time.perf_counter() - start)
        if self.shadow is not None:
            self.shadow.offer(served, encoded.ids, logits)
        return logits, truncated

    # ------------------------------------------------------------------ validation & formatting

    @staticmethod
    def _texts(served: ServedModel, request: InferRequest) -> list[str]:
        if len(request.inputs) != 1 or request.inputs[0].name != TEXT:
            names = [i.name for i in request.inputs]
            raise BadRequest(f"expected exactly one input named '{TEXT}', got {names}")
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise BadRequest(f"input '{TEXT}' must have datatype BYTES, got {tensor.datatype}")
        shape = list(tensor.shape)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"input '{TEXT}' must have shape [batch] or [batch, 1], got {shape}")
        batch = element_count(shape)
        if batch == 0:
            raise BadRequest(f"input '{TEXT}' is empty: batch size must be at least 1")
        if len(tensor.data) != batch:
            raise BadRequest(f"input '{TEXT}' has shape {shape} ({batch} elements) but {len(tensor.data)} values")
        if batch > served.max_batch_size:
            raise BadRequest(f"batch of {batch} texts exceeds max_batch_size {served.max_batch_size} of model '{served.name}'")
        texts = []
        for i, item in enumerate(tensor.data):
            if isinstance(item, str):
                texts.append(item)
                continue
            if not isinstance(item, bytes | bytearray):
                raise BadRequest(f"input '{TEXT}' element {i} is not a string")
            try:
                texts.append(bytes(item).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise BadRequest(f"input '{TEXT}' element {i} is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
        return texts

    @staticmethod
    def _requested_outputs(served: ServedModel, request: InferRequest) -> list[tuple[str, dict[str, Any]]]:
        declared = [o.name for o in served.config.output]
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
            rows = [[f"{logits[b, c]:f}:{c}:{_label(served, c)}".encode() for c in order[b]] for b in range(batch)]
            return OutputTensor(name, "BYTES", [batch, k], np.array(rows, dtype=object).reshape(batch, k))
        if name == LOGITS:
            return OutputTensor(LOGITS, "FP32", [batch, logits.shape[1]], logits.astype(np.float32, copy=False))
        labels = np.array([_label(served, i).encode() for i in logits.argmax(-1)], dtype=object).reshape(batch, 1)
        return OutputTensor(LABEL, "BYTES", [batch, 1], labels)


def _label(served: ServedModel, index: int) -> str:
    """The label of a logits column; columns past the labels (the echo engine's) by number."""
    index = int(index)
    return served.labels[index] if index < len(served.labels) else str(index)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


__all__ = ["DataPlane", "ModelNotFound"]
