"""Shadow sampling: the accuracy cost of multiplexing, measured on live traffic.

A mux model whose config sets ``shadow_sample_rate`` (and names a ``baseline``) hands that
fraction of the texts it served, with its labels, to a bounded queue. A background task runs
them through the baseline's engine when the baseline has no queued work of its own (lower
priority than real traffic, never on the request path), and counts how often the labels agree.

The texts travel as the mux model's token ids, so the pair must share a tokenizer (checked at
start); rows longer than the baseline's ``max_seq_length`` are cut as its own tokenizer would.
Texts that cannot be compared (shadow queue full, failed baseline pass) are counted as dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

import numpy as np

from muxserve.serving.observability.metrics import Metrics
from muxserve.serving.registry import ModelRegistry, ServedModel

log = logging.getLogger("muxserve")
SHADOW_QUEUE_TEXTS = 4096
IDLE_POLL_S = 0.005


@dataclass(eq=False)
class _Pair:
    mux: ServedModel
    baseline: ServedModel
    rate: float
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(SHADOW_QUEUE_TEXTS))
    task: asyncio.Task | None = None
    texts: int = 0
    agreements: int = 0


class ShadowSampler:
    def __init__(self, metrics: Metrics, pairs: list[_Pair], seed: int = 0) -> None:
        self.metrics = metrics
        self.pairs = {id(p.mux): p for p in pairs}
        self.random = random.Random(seed)
        for pair in pairs:
            labels = {"model": pair.mux.name, "baseline": pair.baseline.name}
            for counter in (metrics.shadow_texts, metrics.shadow_agreements, metrics.shadow_dropped):
                counter.labels(**labels)  # exported at zero from the start, so rate() works
            pair.task = asyncio.create_task(self._consume(pair), name=f"shadow-{pair.mux.name}")

    @classmethod
    def from_registry(cls, registry: ModelRegistry, metrics: Metrics) -> ShadowSampler | None:
        pairs = []
        for served in registry.all():
            rate = float(served.entry.parameter("shadow_sample_rate", "0") or 0)
            if rate <= 0 or not served.ready or not served.baseline:
                continue
            try:
                base = registry.get_ready(served.baseline)
            except Exception as exc:
                log.warning("shadow sampling for %s disabled: baseline %s: %s", served.name, served.baseline, exc)
                continue
            if base.labels != served.labels:
                log.warning("shadow sampling for %s disabled: labels differ from %s", served.name, base.name)
                continue
            if served.tokenizer.digest() != base.tokenizer.digest():
                log.warning("shadow sampling for %s disabled: its tokenizer differs from that of %s", served.name, base.name)
                continue
            pairs.append(_Pair(served, base, min(1.0, rate)))
            log.info("shadow sampling %.0f%% of %s through %s", 100 * min(1.0, rate), served.name, base.name)
        return cls(metrics, pairs) if pairs else None

    def offer(self, served: ServedModel, rows: list[list[int]], logits: np.ndarray) -> None:
        """Called after a request was answered: sample texts for the baseline, never blocking."""
        pair = self.pairs.get(id(served))
        if pair is None:
            return
        labels = logits.argmax(-1)
        for row, label in zip(rows, labels, strict=True):
            if pair.rate < 1.0 and self.random.random() >= pair.rate:
                continue
            try:
                pair.queue.put_nowait((row, int(label)))
            except asyncio.QueueFull:
                self.metrics.shadow_dropped.labels(model=pair.mux.name, baseline=pair.baseline.name).inc()

    async def _consume(self, pair: _Pair) -> None:
        labels = {"model": pair.mux.name, "baseline": pair.baseline.name}
        engine, scheduler = pair.baseline.engine, pair.baseline.scheduler
        assert engine is not None and scheduler is not None
        batch_size = scheduler.batch_texts
        assert pair.baseline.model_config is not None
        max_len, sep = pair.baseline.model_config.max_seq_length, pair.baseline.model_config.sep_token_id
        while True:
            items = [await pair.queue.get()]
            while len(items) < batch_size and not pair.queue.empty():
                items.append(pair.queue.get_nowait())
            while scheduler.queue_depth > 0:  # real traffic first
                await asyncio.sleep(IDLE_POLL_S)
            try:
                base_logits = await engine.run([row if len(row) <= max_len else row[: max_len - 1] + [sep] for row, _ in items])
            except Exception as exc:
                log.warning("shadow batch for %s failed: %s", pair.mux.name, exc)
                self.metrics.shadow_dropped.labels(**labels).inc(len(items))
                continue
            finally:
                for _ in items:
                    pair.queue.task_done()
            agree = int(sum(int(b) == m for b, (_, m) in zip(base_logits.argmax(-1), items, strict=True)))
            pair.texts += len(items)
            pair.agreements += agree
            self.metrics.shadow_texts.labels(**labels).inc(len(items))
            self.metrics.shadow_agreements.labels(**labels).inc(agree)
            self.metrics.shadow_agreement.labels(**labels).set(pair.agreements / pair.texts)

    async def flush(self, timeout: float = 60.0) -> None:
        """Wait until every sampled text has been compared (tests, shutdown)."""
        await asyncio.wait_for(asyncio.gather(*(p.queue.join() for p in self.pairs.values())), timeout)

    async def stop(self) -> None:
        for pair in self.pairs.values():
            if pair.task is not None:
                pair.task.cancel()
        await asyncio.gather(*(p.task for p in self.pairs.values() if p.task is not None), return_exceptions=True)

