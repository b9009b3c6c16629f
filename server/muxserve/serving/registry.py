"""Model registry: the repository's models, loaded into engines and schedulers.

A model that fails to load is kept with state UNAVAILABLE and the reason; the others serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from muxserve.model.muxbert import MuxBertConfig
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE
from muxserve.serving.engine import Engine, EngineOptions
from muxserve.serving.errors import ModelNotFound, NotReady
from muxserve.serving.observability.metrics import Metrics, ModelMonitor
from muxserve.serving.repository import ModelEntry, RepositoryError, scan
from muxserve.serving.scheduler import MuxScheduler
from muxserve.serving.settings import Settings

log = logging.getLogger("muxserve")

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"


@dataclass(eq=False)
class ServedModel:
    """One version of one model, as the data plane sees it."""

    name: str
    version: str
    entry: ModelEntry
    state: str = LOADING
    reason: str = ""
    model_config: MuxBertConfig | None = None
    tokenizer: TextTokenizer | None = None
    engine: Engine | None = None
    scheduler: MuxScheduler | None = None
    monitor: ModelMonitor | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def config(self) -> mc.ModelConfig:
        return self.entry.config

    @property
    def labels(self) -> list[str]:
        assert self.model_config is not None
        return self.model_config.labels

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def baseline(self) -> str:
        return self.entry.parameter("baseline", "") or ""

    @property
    def ready(self) -> bool:
        return self.state == READY


def engine_options(entry: ModelEntry, settings: Settings) -> EngineOptions:
    """Device, precision, engine kind and instance count from the config (flags override)."""
    groups = list(entry.config.instance_group)
    count = sum(g.count for g in groups) if groups else 1
    kind = groups[0].kind if groups else mc.ModelInstanceGroup.KIND_AUTO
    device = settings.device or ("cuda" if kind == mc.ModelInstanceGroup.KIND_GPU else "cpu")
    if device == "cuda" and groups and groups[0].gpus:
        device = f"cuda:{groups[0].gpus[0]}"
    precision = settings.precision or entry.parameter("precision", "fp32") or "fp32"
    if device == "cpu":
        precision = "fp32"
    kind_name = settings.engine or entry.parameter("engine", "eager") or "eager"
    return EngineOptions(device=device, precision=precision, kind=kind_name, threads=settings.threads, instances=max(1, count))


def batch_texts(entry: ModelEntry, num_instances: int) -> int:
    """Texts per forward pass: the largest preferred batch size, else max_batch_size; rounded
    down to whole mux groups."""
    cfg = entry.config
    preferred = list(cfg.dynamic_batching.preferred_batch_size) if cfg.HasField("dynamic_batching") else []
    texts = max(preferred) if preferred else max(1, cfg.max_batch_size)
    return max(num_instances, texts - texts % num_instances)


class ModelRegistry:
    def __init__(self, repository: str | Path, settings: Settings, metrics: Metrics) -> None:
        self.repository = Path(repository)
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, dict[str, ServedModel]] = {}  # name -> version -> model

    # ------------------------------------------------------------------ loading

    async def load_all(self) -> None:
        entries = scan(self.repository)
        wanted = set(self.settings.models) if self.settings.models else None
        for name, entry in entries.items():
            if wanted is not None and name not in wanted:
                continue
            versions = entry.served_versions()
            if not versions:
                placeholder = ServedModel(name, "", entry, UNAVAILABLE, "no version folder with weights")
                self.models[name] = {"": placeholder}
                log.error("model %s: %s", name, placeholder.reason)
                continue
            for v in versions:
                await self._load(entry, v)

    async def _load(self, entry: ModelEntry, version: int) -> ServedModel:
        served = ServedModel(entry.name, str(version), entry)
        self.models.setdefault(entry.name, {})[served.version] = served
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(self._build, served, entry.versions[version])
            served.scheduler.start()
            served.state = READY
            served.monitor.set_ready(True)
            cfg = served.model_config
            log.info("loaded model %s version %s: N=%d, %d labels, engine %s on %s (%d thread(s)), %d texts/batch, in %.1fs", served.name, served.version, cfg.num_instances, cfg.num_labels, served.engine.options.kind, served.engine.options.device, served.engine.threads, served.scheduler.batch_texts, time.perf_counter() - t0)
        except Exception as exc:  # one bad model must not stop the others
            served.state = UNAVAILABLE
            served.reason = f"{type(exc).__name__}: {exc}"
            log.error("model %s version %s failed to load: %s", served.name, served.version, served.reason)
        return served

    def _build(self, served: ServedModel, directory: Path) -> None:
        entry = served.entry
        options = engine_options(entry, self.settings)
        engine = Engine.load(directory, options, name=served.name)
        cfg = engine.config
        if cfg.task != "sequence_classification":
            raise RepositoryError(f"task {cfg.task} is not served (sequence_classification only)")
        self._check_io(entry.config, cfg)
        if self.settings.warmup:
            engine.warmup()
        tokenizer = TextTokenizer(directory / TOKENIZER_FILE, cfg.max_seq_length)
        monitor = ModelMonitor(self.metrics, served.name, served.version, cfg.num_instances, served.baseline)
        db = entry.config.dynamic_batching
        delay_s = db.max_queue_delay_microseconds / 1e6 if entry.config.HasField("dynamic_batching") else 0.0
        scheduler = MuxScheduler(
            engine.run,
            num_instances=cfg.num_instances,
            batch_texts=batch_texts(entry, cfg.num_instances),
            max_queue_delay_s=delay_s,
            max_queue_size=db.default_queue_policy.max_queue_size,
            engine_instances=options.instances,
            length_aware=self.settings.length_aware,
            observer=monitor.batch_done,
            name=served.name,
        )
        served.model_config, served.engine, served.tokenizer, served.scheduler, served.monitor = cfg, engine, tokenizer, scheduler, monitor

    @staticmethod
    def _check_io(config: mc.ModelConfig, cfg: MuxBertConfig) -> None:
        inputs = {i.name: i for i in config.input}
        if set(inputs) != {"TEXT"} or inputs["TEXT"].data_type != mc.TYPE_STRING:
            raise RepositoryError("config.pbtxt must declare exactly one input: TEXT of TYPE_STRING")
        outputs = {o.name: o for o in config.output}
        if "LOGITS" in outputs and list(outputs["LOGITS"].dims) not in ([cfg.num_labels], [-1]):
            raise RepositoryError(f"LOGITS dims {list(outputs['LOGITS'].dims)} != [{cfg.num_labels}] labels of the weights")
        if not set(outputs) <= {"LOGITS", "LABEL"} or not outputs:
            raise RepositoryError("config.pbtxt outputs must be LOGITS and/or LABEL")
        if config.max_batch_size < 1:
            raise RepositoryError("max_batch_size must be >= 1 (texts are batched)")

    async def unload_all(self) -> None:
        for served in self.all():
            if served.scheduler is not None:
                await served.scheduler.stop()
            if served.engine is not None:
                served.engine.close()
            served.state = UNAVAILABLE
            served.reason = "unloaded"
            if served.monitor is not None:
                served.monitor.set_ready(False)

    async def drain(self) -> None:
        """Stop taking requests and answer all accepted ones."""
        await asyncio.gather(*(s.scheduler.drain() for s in self.all() if s.scheduler is not None))

    # ------------------------------------------------------------------ lookup

    def all(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def find(self, name: str, version: str = "") -> ServedModel:
        """The requested version (default: the highest loaded); 404 when unknown."""
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFound(f"unknown model: '{name}'")
        if version:
            if version not in versions:
                raise ModelNotFound(f"unknown version {version} of model '{name}' (have: {', '.join(sorted(v for v in versions if v))})")
            return versions[version]
        ready = [m for m in versions.values() if m.ready]
        pool = ready or list(versions.values())
        return max(pool, key=lambda m: int(m.version) if m.version.isdigit() else -1)

    def get_ready(self, name: str, version: str = "") -> ServedModel:
        served = self.find(name, version)
        if not served.ready:
            raise NotReady(f"model '{name}' version {served.version or '?'} is not ready: {served.reason or served.state}")
        return served

    def monitors(self) -> dict[str, ModelMonitor]:
        return {f"{m.name}/{m.version}": m.monitor for m in self.all() if m.monitor is not None}
