"""Closed-loop load generator on stock tritonclient (HTTP or gRPC asyncio).

``concurrency`` workers each keep exactly one request in flight for ``duration_s`` seconds
(after ``warmup_s``), cycling through the given texts. With ``warmup_cycles`` the warm-up also
lasts until every worker has completed that many requests (at most ``max_warmup_s``): at high
concurrency a request's latency can exceed any fixed warm-up, and only requests sent after the
first cycle see the steady-state queue. ``on_start`` / ``on_stop`` (coroutine
functions) run when the measuring window opens and closes, e.g. to snapshot the server's own
statistics over exactly that window. Used by ``muxserve bench serve`` and the scripts in
``benchmarks/``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class LoadResult:
    model: str
    protocol: str
    concurrency: int
    texts_per_request: int
    seconds: float
    requests: int
    texts: int
    errors: int
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    first_error: str = ""
    warmup_seconds: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        d.update(requests_per_s=round(self.requests_per_s, 2), texts_per_s=round(self.texts_per_s, 2), p50_ms=round(self.percentile_ms(50), 2), p90_ms=round(self.percentile_ms(90), 2), p99_ms=round(self.percentile_ms(99), 2))
        return d


def _client(protocol: str, url: str):
    if protocol == "http":
        import tritonclient.http.aio as client

        return client, client.InferenceServerClient(url, conn_limit=1024)
    if protocol == "grpc":
        import tritonclient.grpc.aio as client

        return client, client.InferenceServerClient(url)
    raise ValueError(f"protocol must be http or grpc, not {protocol!r}")


async def closed_loop(url: str, model: str, texts: list[str], concurrency: int, duration_s: float, texts_per_request: int = 1, protocol: str = "http", warmup_s: float = 2.0, binary: bool = True, on_start: Callable[[], Awaitable[object]] | None = None, on_stop: Callable[[], Awaitable[object]] | None = None, warmup_cycles: int = 0, max_warmup_s: float = 120.0) -> LoadResult:
    module, client = _client(protocol, url)
    encoded = [t.encode() for t in texts]
    counter = 0
    measuring = False
    stop = False
    result = LoadResult(model, protocol, concurrency, texts_per_request, 0.0, 0, 0, 0)

    def next_batch() -> np.ndarray:
        nonlocal counter
        rows = [[encoded[(counter + i) % len(encoded)]] for i in range(texts_per_request)]
        counter += texts_per_request
        return np.array(rows, dtype=object)

    def make_inputs():
        tensor = module.InferInput("TEXT", [texts_per_request, 1], "BYTES")
        if protocol == "http":
            tensor.set_data_from_numpy(next_batch(), binary_data=binary)
            outputs = [module.InferRequestedOutput("LABEL", binary_data=binary), module.InferRequestedOutput("LOGITS", binary_data=binary)]
        else:
            tensor.set_data_from_numpy(next_batch())
            outputs = [module.InferRequestedOutput("LABEL"), module.InferRequestedOutput("LOGITS")]
        return [tensor], outputs

    cycled = 0
    all_cycled = asyncio.Event()
    if warmup_cycles <= 0:
        all_cycled.set()

    async def worker() -> None:
        nonlocal cycled
        done = 0
        while not stop:
            inputs, outputs = make_inputs()
            t0 = time.perf_counter()
            try:
                await client.infer(model, inputs, outputs=outputs)
                ok = True
            except Exception as exc:  # counted, the loop goes on
                ok = False
                if not result.first_error:
                    result.first_error = f"{type(exc).__name__}: {exc}"[:300]
            done += 1
            if done == warmup_cycles:
                cycled += 1
                if cycled == concurrency:
                    all_cycled.set()
            if measuring and not stop:
                if ok:
                    result.requests += 1
                    result.texts += texts_per_request
                    result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                else:
                    result.errors += 1

    try:
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        t0 = time.perf_counter()
        await asyncio.sleep(warmup_s)
        try:
            await asyncio.wait_for(all_cycled.wait(), max(0.0, max_warmup_s - (time.perf_counter() - t0)))
        except asyncio.TimeoutError:
            pass
        result.warmup_seconds = time.perf_counter() - t0
        if on_start is not None:
            await on_start()
        measuring = True
        start = time.perf_counter()
        await asyncio.sleep(duration_s)
        stop = True
        result.seconds = time.perf_counter() - start
        if on_stop is not None:
            await on_stop()
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return result
