"""Model registry: the repository's models, loaded into engines and schedulers.

A model that fails to load is kept with state UNAVAILABLE and the reason; the others serve.

Model control (Triton's repository extension): ``load(name)`` reads the model's folder again and
loads what changed (new or rewritten versions, a changed config.pbtxt), ``unload(name)`` takes it
out of service, and ``poll()`` does either for every model whose folder changed. A reload swaps the
model's versions in one step: new requests go to the new version at once, while the version it
replaces stops only after the requests that already hold it (``use``) are answered. Every change
bumps ``generation`` and wakes ``wait_changed``, so whoever mirrors the registry (a frontend, the
shadow sampler) can follow it.

Model families (``platform: "ensemble"``, see ``serving.family``) load after the models they
name and share their engines; a family holds its members (as a request does) for as long as it
serves, and follows them: reloading a member reloads its families, unloading it unloads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from muxserve.model.muxbert import MuxBertConfig
from muxserve.model.precision import resolve_precision
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE
from muxserve.serving.catalog import ModelCatalog
from muxserve.serving.controller import ControllerSettings, LoadController
from muxserve.serving.engine import Engine, EngineOptions, engine_layout
from muxserve.serving.errors import ControlDisabled, LoadFailed, ModelNotFound
from muxserve.serving.family import FamilyMember, FamilyScheduler
from muxserve.serving.graphs import GraphedForward
from muxserve.serving.observability.family import FamilyMonitor
from muxserve.serving.observability.metrics import Metrics, ModelMonitor
from muxserve.serving.repository import CONFIG_PBTXT, FAMILY_POLICY, ModelEntry, RepositoryError, scan
from muxserve.serving.scheduler import MuxScheduler, TokenBudget
from muxserve.serving.settings import Settings

log = logging.getLogger("muxserve")

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"
ALL_MODELS = "*"  # --load-model '*': every model in the repository
MODELS_RECORD = "MODELS.json"  # the repository's record of each model's measured facts
DEFAULT_TARGET_QUEUE_DELAY_MS = 500.0
CALIBRATION_LENGTH = 32  # tokens per row of the one-group pass that times a family's member at load
FAMILY_VERSION = "1"


@dataclass(eq=False)
class Family:
    """What a family endpoint has beyond a model: its members by N and its controller."""

    members: dict[int, ServedModel]
    controller: LoadController
    monitor: FamilyMonitor

# config.pbtxt ``parameters`` of the engine (each overridden by the matching `muxserve serve` flag)
PRECISION = "precision"  # auto | fp32 | bf16 | fp16
THREADS = "INTRA_OP_THREAD_COUNT"  # as Triton's PyTorch backend names it; 0: automatic
MAX_BATCH_TOKENS = "max_batch_tokens"  # as TEI names it; 0: fixed batches of batch_texts; auto
PASS_FILL = "pass_fill_microseconds"  # pass filling's longest wait; 0: off; auto
# pass filling's automatic bound: a free instance waits at most this long, and only while another
# instance computes, for the texts expected to arrive meanwhile (docs/bench/engine.md)
AUTO_PASS_FILL_US = 10_000
# the automatic budget: batch_texts / N groups of 48 tokens (1,536 positions for the bundled
# models), where the CPU forward pass reaches its full rate (benchmarks/token_budget.py, docs/bench)
AUTO_TOKENS_PER_GROUP = 48


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
    family: Family | None = None
    loaded_at: float = field(default_factory=time.time)
    signature: tuple = ()  # the files it was loaded from (config.pbtxt + version folder), to see changes
    users: int = 0  # requests holding this version (ModelRegistry.use); a retired version waits for 0
    retired: bool = False
    _unused: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

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

    def hold(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if not self.users:
            self._unused.set()

    async def unused(self) -> None:
        """Returns once no request holds this version."""
        while self.users:
            self._unused.clear()
            await self._unused.wait()


def _int_parameter(entry: ModelEntry, key: str) -> int | None:
    """A non-negative integer parameter of config.pbtxt; None when absent, empty or ``auto``."""
    value = (entry.parameter(key, "") or "").strip()
    if value.lower() in ("", "auto"):
        return None
    if not value.isdigit():
        raise RepositoryError(f"parameter {key} must be a non-negative integer or 'auto', not {value!r}")
    return int(value)


def engine_options(entry: ModelEntry, settings: Settings) -> EngineOptions:
    """Device, precision, engine kind, instances and threads per instance, CUDA graphs: flags,
    else config.pbtxt (instance_group count, INTRA_OP_THREAD_COUNT, optimization.cuda.graphs),
    else automatic (``engine_layout``;
    the echo engine, which computes nothing, one instance). A precision from config.pbtxt that
    the device cannot run (fp16 on a CPU) gives way to the device's automatic choice; one from a
    flag is an error."""
    groups = list(entry.config.instance_group)
    device = entry.device(settings.device)
    kind_name = settings.engine or entry.parameter("engine", "eager") or "eager"
    if settings.precision:
        precision = resolve_precision(settings.precision, device, engine=kind_name)
    else:
        try:
            precision = resolve_precision(entry.parameter(PRECISION, ""), device, engine=kind_name)
        except ValueError:
            precision = resolve_precision("auto", device, engine=kind_name)
    # instance_group count unset (0) or no instance_group: the automatic layout (engine_layout)
    count = settings.instances or sum(g.count for g in groups) or (1 if kind_name == "echo" else 0)
    instances, threads = engine_layout(device, count, settings.threads or _int_parameter(entry, THREADS) or 0)
    graphs = settings.cuda_graphs
    optimization = entry.config.optimization
    if graphs is None and entry.config.HasField("optimization") and optimization.HasField("cuda"):
        graphs = optimization.cuda.graphs  # Triton's switch for its TensorRT and PyTorch backends
    return EngineOptions(device=device, precision=precision, kind=kind_name, threads=threads, instances=instances, cuda_graphs=graphs, max_texts=max(1, entry.config.max_batch_size))


def token_budget(entry: ModelEntry, settings: Settings, num_instances: int, max_length: int, pad_multiple: int, device: str = "cpu") -> TokenBudget | None:
    """The scheduler's token budget (``TokenBudget``): the flag, else config.pbtxt, else on a
    CPU ``batch_texts / N`` groups of ``AUTO_TOKENS_PER_GROUP`` tokens, on a GPU none; 0 turns
    it off. A GPU pass of a few hundred texts is bound by launching its kernels, not by its
    tokens: a budget there only splits the queue into more passes, each paying the launches."""
    tokens = settings.max_batch_tokens if settings.max_batch_tokens is not None else _int_parameter(entry, MAX_BATCH_TOKENS)
    if tokens is None:
        tokens = 0 if device.startswith("cuda") else batch_texts(entry, num_instances) // num_instances * AUTO_TOKENS_PER_GROUP
    if tokens == 0:
        return None
    return TokenBudget(tokens, group=num_instances, pad_multiple=pad_multiple, max_length=max_length)


def pass_fill_seconds(entry: ModelEntry, settings: Settings) -> float:
    """How long a free engine instance may wait to fill its pass while another runs (the
    scheduler's ``fill_wait_s``): the flag, else config.pbtxt, else ``AUTO_PASS_FILL_US``."""
    us = round(settings.pass_fill_ms * 1000) if settings.pass_fill_ms is not None else _int_parameter(entry, PASS_FILL)
    return (AUTO_PASS_FILL_US if us is None else us) / 1e6


def max_texts(entry: ModelEntry, num_instances: int) -> int:
    """The most texts one pass may take: ``max_batch_size`` in whole mux groups."""
    texts = max(1, entry.config.max_batch_size)
    return max(num_instances, texts - texts % num_instances)


def batch_texts(entry: ModelEntry, num_instances: int) -> int:
    """Texts per forward pass: the largest preferred batch size, else max_batch_size; rounded
    down to whole mux groups."""
    cfg = entry.config
    preferred = list(cfg.dynamic_batching.preferred_batch_size) if cfg.HasField("dynamic_batching") else []
    texts = max(preferred) if preferred else max(1, cfg.max_batch_size)
    return max(num_instances, texts - texts % num_instances)


def files_signature(*paths: Path) -> tuple:
    """(relative path, size, mtime) of every file under ``paths``: changes when a file does."""
    out = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            out.append((f.name if f == root else f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(out)


def version_signature(entry: ModelEntry, version: int) -> tuple:
    return files_signature(entry.path / CONFIG_PBTXT, entry.versions[version])


def model_signature(entry: ModelEntry) -> tuple:
    """Everything ``load`` reads for a model: its config and all its version folders."""
    return (files_signature(entry.path / CONFIG_PBTXT), tuple((v, files_signature(d)) for v, d in sorted(entry.versions.items())))


Listener = Callable[[], Awaitable[None]]


class ModelRegistry(ModelCatalog[ServedModel]):
    def __init__(self, repository: str | Path, settings: Settings, metrics: Metrics) -> None:
        super().__init__()
        self.repository = Path(repository)
        self.settings = settings
        self.metrics = metrics
        self.generation = 0  # bumped by every change of what is served
        self.listeners: list[Listener] = []  # awaited after a change, before replaced versions stop
        self._changed = asyncio.Condition()
        self._locks: dict[str, asyncio.Lock] = {}
        self._polled: dict[str, tuple] = {}  # name -> model_signature at its last load attempt

    # ------------------------------------------------------------------ loading

    async def start(self) -> None:
        """The models to serve at start: all (modes none and poll; ``--models`` narrows it) or, in
        explicit mode, those named by ``--load-model``."""
        if self.settings.model_control_mode == "explicit":
            names = self.settings.load_models
            if ALL_MODELS in names:
                names = list(scan(self.repository))
        else:
            names = [n for n in scan(self.repository) if self._wanted(n)]
        entries = scan(self.repository)
        families = [n for n in names if n in entries and entries[n].is_family]
        members = [m for f in families for m in entries[f].member_names() if m not in names]
        for name in [*members, *(n for n in names if n not in families), *families]:
            try:
                await self.load(name)
            except (LoadFailed, ModelNotFound) as exc:  # one bad model must not stop the others
                log.error("%s", exc.message)

    def control_allowed(self) -> None:
        """Load and unload requests are taken in explicit mode only (as Triton)."""
        mode = self.settings.model_control_mode
        if mode != "explicit":
            raise ControlDisabled(f"model control is disabled in model control mode '{mode}': start the server with --model-control-mode explicit")

    def _wanted(self, name: str) -> bool:
        """Whether ``--models`` (if given) asks for ``name``, itself or as a member of a family."""
        wanted = self.settings.models
        if not wanted or name in wanted:
            return True
        entries = scan(self.repository)
        return any(f in entries and entries[f].is_family and name in entries[f].member_names() for f in wanted)

    def dependents(self, name: str) -> list[str]:
        """The loaded families that have ``name`` as a member."""
        return [f for f, versions in self.models.items() if any(m.family is not None and any(x.name == name for x in m.family.members.values()) for m in versions.values())]

    async def load(self, name: str) -> None:
        """Load ``name``, or reload it from its folder: versions whose files changed (or that are
        new) are built and started first; then all of them replace the old set in one step, and the
        versions left out drain and stop. On failure the versions serving so far keep serving."""
        async with self._lock(name):
            entry = scan(self.repository).get(name)
            if entry is None:
                raise ModelNotFound(f"failed to load '{name}': no such model in the model repository")
            self._polled[name] = model_signature(entry)
            current = self.models.get(name, {})
            if entry.is_family:
                for member in entry.member_names():  # as Triton loads an ensemble's models
                    if not any(m.ready for m in self.models.get(member, {}).values()):
                        await self.load(member)
                await self._load_family(entry, current)
                return
            versions = entry.served_versions()
            if not versions:
                if not any(m.ready for m in current.values()):
                    await self._commit(name, {"": ServedModel(name, "", entry, UNAVAILABLE, "no version folder with weights")})
                raise LoadFailed(f"failed to load '{name}': no version folder with weights")
            new: dict[str, ServedModel] = {}
            built: list[ServedModel] = []
            for v in versions:
                signature = version_signature(entry, v)
                old = current.get(str(v))
                if old is not None and old.ready and old.signature == signature:
                    new[str(v)] = old
                    continue
                served = await self._load(entry, v)
                served.signature = signature
                built.append(served)
                new[str(v)] = served
            failed = [m for m in built if not m.ready]
            if failed:
                if any(m.ready for m in current.values()):
                    for m in built:
                        await self._stop(m)
                else:  # nothing serves yet: show the failure in the index
                    await self._commit(name, new)
                raise LoadFailed(f"failed to load '{name}' version {failed[0].version}: {failed[0].reason}")
            replaced = [m for m in current.values() if all(m is not n for n in new.values())]
            if built or replaced:
                await self._commit(name, new)
            if replaced:  # its families move to the new version (and release the old one)
                for family in self.dependents(name):
                    with contextlib.suppress(LoadFailed, ModelNotFound):
                        await self.load(family)
            await asyncio.gather(*(self._retire(m, "unloaded", still_served=m.version in new) for m in replaced))

    async def unload(self, name: str) -> None:
        """Take ``name`` out of service: new requests get 503 at once, accepted ones are answered,
        then its engines are freed. It stays in the index as UNAVAILABLE, "unloaded"."""
        for family in self.dependents(name):  # a family cannot serve without its members
            await self.unload(family)
        async with self._lock(name):
            current = self.models.get(name)
            if not current:
                raise ModelNotFound(f"failed to unload '{name}': the model is not loaded")
            self._polled.pop(name, None)
            for m in current.values():
                m.state, m.reason = UNAVAILABLE, "unloaded"
            await self._commit(name, dict(current))
            await asyncio.gather(*(self._retire(m, "unloaded", still_served=False) for m in current.values()))

    async def poll(self) -> list[str]:
        """Load or unload every model whose folder changed since its last load; returns their names."""
        entries = scan(self.repository)
        changed = []
        for name, entry in entries.items():
            if not self._wanted(name):
                continue
            if self._polled.get(name) != model_signature(entry):
                changed.append(name)
                try:
                    await self.load(name)
                except (LoadFailed, ModelNotFound) as exc:
                    log.error("%s", exc.message)
        for name in [n for n in self.models if n not in entries and any(m.ready for m in self.models[n].values())]:
            changed.append(name)
            await self.unload(name)
        return changed

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except RepositoryError as exc:  # e.g. the repository folder is being replaced
                log.error("repository poll failed: %s", exc)

    async def wait_changed(self, seen: int) -> int:
        """Returns the generation once it is past ``seen``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation > seen)
            return self.generation

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _commit(self, name: str, versions: dict[str, ServedModel]) -> None:
        self.models[name] = versions
        self.generation += 1
        for listener in self.listeners:
            await listener()
        async with self._changed:
            self._changed.notify_all()

    async def _retire(self, served: ServedModel, reason: str, still_served: bool) -> None:
        """Out of service once the requests that hold it are answered."""
        if served.retired:
            return
        served.retired = True
        if served.ready:
            served.state, served.reason = UNAVAILABLE, reason
        await served.unused()
        await self._stop(served)
        if served.monitor is not None and not still_served:  # a reloaded version's gauge is the new one's
            served.monitor.set_ready(False)
        log.info("model %s version %s: %s", served.name, served.version or "-", served.reason)

    @staticmethod
    async def _stop(served: ServedModel) -> None:
        if served.scheduler is not None:
            await served.scheduler.stop()
        if served.engine is not None:
            served.engine.close()
        if served.family is not None:
            for member in served.family.members.values():
                member.release()
            served.family = None

    async def _load(self, entry: ModelEntry, version: int) -> ServedModel:
        served = ServedModel(entry.name, str(version), entry)
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(self._build, served, entry.versions[version])
            served.scheduler.start()
            served.state = READY
            served.monitor.set_ready(True)
            cfg = served.model_config
            budget = served.scheduler.token_budget
            batching = f"up to {served.scheduler.batch_texts} texts and {budget.max_tokens} tokens a pass" if budget else f"{served.scheduler.batch_texts} texts a pass"
            options = served.engine.options
            graphs = served.engine.forward_fn
            replay = f", CUDA graphs of {len(graphs.buckets)} buckets" if isinstance(graphs, GraphedForward) else ""
            log.info("loaded model %s version %s: N=%d, %d labels, engine %s on %s in %s (%d instance(s) x %d thread(s))%s, %s, in %.1fs", served.name, served.version, cfg.num_instances, cfg.num_labels, options.kind, options.device, options.precision, options.instances, served.engine.threads, replay, batching, time.perf_counter() - t0)
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
        budget = token_budget(entry, self.settings, cfg.num_instances, cfg.max_seq_length, engine.options.pad_multiple, engine.options.device)
        scheduler = MuxScheduler(
            engine.run,
            num_instances=cfg.num_instances,
            batch_texts=max_texts(entry, cfg.num_instances) if budget else batch_texts(entry, cfg.num_instances),
            token_budget=budget,
            max_queue_delay_s=delay_s,
            max_queue_size=db.default_queue_policy.max_queue_size,
            engine_instances=options.instances,
            fill_wait_s=pass_fill_seconds(entry, self.settings),
            length_aware=self.settings.length_aware,
            observer=monitor.batch_done,
            name=served.name,
        )
        served.model_config, served.engine, served.tokenizer, served.scheduler, served.monitor = cfg, engine, tokenizer, scheduler, monitor

    async def _load_family(self, entry: ModelEntry, current: dict[str, ServedModel]) -> None:
        """(Re)load a family over its members as they serve now; the family it replaces drains."""
        served = ServedModel(entry.name, FAMILY_VERSION, entry, signature=files_signature(entry.path / CONFIG_PBTXT))
        try:
            self._build_family(served)
            assert served.family is not None and served.scheduler is not None
            await self._calibrate(served.family)
            served.scheduler.start()
            served.state = READY
            served.monitor.set_ready(True)
            widths = ", ".join(f"N={n} {m.name} ({served.family.controller.capacity(n):.0f} texts/s)" for n, m in served.family.members.items())
            log.info("loaded family %s: %s; target queue delay %.0f ms", served.name, widths, 1000 * served.family.controller.settings.target_delay_s)
        except Exception as exc:
            served.state, served.reason = UNAVAILABLE, f"{type(exc).__name__}: {exc}"
            await self._stop(served)
            if not any(m.ready for m in current.values()):
                await self._commit(entry.name, {FAMILY_VERSION: served})
            raise LoadFailed(f"failed to load family '{entry.name}': {served.reason}") from None
        await self._commit(entry.name, {FAMILY_VERSION: served})
        await asyncio.gather(*(self._retire(m, "unloaded", still_served=True) for m in current.values() if m is not served))

    def _build_family(self, served: ServedModel) -> None:
        entry = served.entry
        if entry.parameter("family_policy") != FAMILY_POLICY:
            raise RepositoryError(f'platform "ensemble" is served as a model family only: set parameters {{ key: "family_policy" value {{ string_value: "{FAMILY_POLICY}" }} }} (ensemble pipelines are not supported)')
        names = entry.member_names()
        if not names:
            raise RepositoryError("a family names its members in ensemble_scheduling steps")
        members: dict[int, ServedModel] = {}
        for name in names:
            member = self.get_ready(name)
            if member.family is not None:
                raise RepositoryError(f"member {name} is itself a family")
            n = member.model_config.num_instances
            if n in members:
                raise RepositoryError(f"members {members[n].name} and {name} both have N={n}: one member per width")
            members[n] = member
        members = dict(sorted(members.items()))
        first = next(iter(members.values()))
        for member in members.values():
            if member.labels != first.labels or member.tokenizer.digest() != first.tokenizer.digest() or member.model_config.max_seq_length != first.model_config.max_seq_length:
                raise RepositoryError(f"members {first.name} and {member.name} differ in labels, tokenizer or max_seq_length: a family's members must share them")
        self._check_io(entry.config, first.model_config)
        target_ms = float(entry.parameter("target_queue_delay_ms", "") or DEFAULT_TARGET_QUEUE_DELAY_MS)
        controller = LoadController({n: m.scheduler.batch_texts for n, m in members.items()}, ControllerSettings(target_delay_s=target_ms / 1000))
        family_monitor = FamilyMonitor(self.metrics, served.name, controller, self._recorded_accuracy(entry, members))
        monitor = ModelMonitor(self.metrics, served.name, served.version, ",".join(map(str, members)))
        # ensemble_scheduling excludes dynamic_batching: the narrowest member's batching delay,
        # the queue bound from parameters
        scheduler = FamilyScheduler(
            [FamilyMember(n, m.name, m.engine.run, m.scheduler.batch_texts, m.scheduler.token_budget) for n, m in members.items()],
            controller,
            max_queue_delay_s=first.scheduler.max_queue_delay_s,
            max_queue_size=int(entry.parameter("max_queue_size", "") or 0),
            length_aware=self.settings.length_aware,
            observer=lambda report: (monitor.batch_done(report), family_monitor.batch_done(report)),
            name=served.name,
        )
        served.model_config, served.tokenizer, served.scheduler, served.monitor = first.model_config, first.tokenizer, scheduler, monitor
        for member in members.values():
            member.hold()  # a member stops only after its families (released in _stop)
        served.family = Family(members, controller, family_monitor)

    @staticmethod
    async def _calibrate(family: Family) -> None:
        """Time one group and one full batch on each member: its cost until it has served. The
        full batch is timed at the longest rows: the machine is idle now and will not be under
        the load that needs a wide member, and a capacity that errs on the low side widens N
        early rather than late."""
        for n, member in family.members.items():
            engine = member.engine
            longest = engine.config.max_seq_length
            for rows, length in ((n, min(CALIBRATION_LENGTH, longest)), (family.controller.batch_rows[n], longest)):
                t0 = time.perf_counter()
                await engine.run(engine.sample_rows(rows, length))
                family.controller.calibrate(n, rows, time.perf_counter() - t0)

    def _recorded_accuracy(self, entry: ModelEntry, members: dict[int, ServedModel]) -> dict[int, float | None]:
        """Each member's ``accuracy_record`` field of the repository's MODELS.json (None where
        the family names no field, or the record has no such entry)."""
        field_name = entry.parameter("accuracy_record", "")
        path = self.repository / MODELS_RECORD
        if not field_name or not path.exists():
            return dict.fromkeys(members)
        record = json.loads(path.read_text())
        return {n: record.get(m.name, {}).get(field_name) for n, m in members.items()}

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
            await self._stop(served)
            served.state = UNAVAILABLE
            served.reason = "unloaded"
            if served.monitor is not None:
                served.monitor.set_ready(False)

    async def drain(self) -> None:
        """Stop taking requests and answer all accepted ones."""
        await asyncio.gather(*(s.scheduler.drain() for s in self.all() if s.scheduler is not None))

    # ------------------------------------------------------------------ lookup

    @contextlib.contextmanager
    def use(self, name: str, version: str = "") -> Iterator[ServedModel]:
        """The ready version, held for one request: a reload or unload does not stop it until
        every holder is done."""
        served = self.get_ready(name, version)
        served.hold()
        try:
            yield served
        finally:
            served.release()

    def unloaded(self) -> list[str]:
        """Models in the repository that are not loaded (explicit mode, or ``--models``)."""
        try:
            return sorted(set(scan(self.repository)) - set(self.models))
        except RepositoryError:
            return []

    def monitors(self) -> dict[str, ModelMonitor]:
        return {f"{m.name}/{m.version}": m.monitor for m in self.all() if m.monitor is not None}
