"""Engines run forward passes off the event loop: one dedicated thread per model instance.

An engine takes token-id rows (a batch of texts, mux groups already laid out slot by slot),
pads them (to a multiple of ``pad_multiple`` tokens, or to fixed length buckets), runs the model
(eager, compiled by ``torch.compile``, or TorchScript; CPU or CUDA) at the serving precision
(``muxserve.model.precision``: ``auto`` is bf16 on CPUs with bf16 units, fp16 on CUDA, int8
on other x86 CPUs with AVX2, else fp32) and returns float32 logits ``[T, C]`` as numpy. On CUDA
the eager engine replays CUDA graphs of its passes where the model allows (``serving.graphs``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from muxserve.model.muxbert import MuxBertConfig
from muxserve.model.precision import DTYPES, resolve_precision
from muxserve.model.weights import load_model
from muxserve.serving.cpus import available_cores
from muxserve.serving.graphs import graphed_forward
from muxserve.serving.padding import LENGTH_BUCKETS, PAD_MULTIPLE, bucket_length, padded_length

__all__ = ["DTYPES", "LENGTH_BUCKETS", "Engine", "EngineOptions", "EchoForward", "bucket_length", "default_threads", "engine_layout", "padded_length", "serial_thread", "set_intra_op_threads"]
# [MASK] of BERT vocabularies: the echo engine fails any forward pass holding it
ECHO_FAIL_TOKEN_ID = 103


# the automatic layout on a CPU: one single-thread instance per core up to this many; past it
# the extra cores become intra-op threads of these instances (docs/bench/engine.md)
AUTO_CPU_INSTANCES = 4


def default_threads(instances: int = 1) -> int:
    """Intra-op threads per engine instance: every core, split over the instances (the request
    path's own work is small next to the forward pass, and runs in other processes)."""
    return max(1, available_cores() // max(1, instances))


def engine_layout(device: str, instances: int = 0, threads: int = 0, cores: int = 0) -> tuple[int, int]:
    """(engine instances, intra-op threads per instance); 0 for either: choose it.

    On a CPU, by default one single-thread instance per core (at most ``AUTO_CPU_INSTANCES``,
    the remaining cores split over them as threads): the frontends and the load share these
    cores, and a multi-thread pass stalls at every operator's barrier whenever one of its
    threads is descheduled, while single-thread passes side by side just run slower. With the
    threads given, as many instances as fill the cores with them. On CUDA one instance: the
    device runs one pass at a time anyway. Given instances and no threads: every core split
    over them."""
    cores = cores or available_cores()
    if instances <= 0:
        if device.startswith("cuda"):
            instances = 1
        elif threads > 0:
            instances = max(1, cores // threads)
        else:
            instances = max(1, min(cores, AUTO_CPU_INSTANCES))
    return instances, threads if threads > 0 else max(1, cores // instances)


def set_intra_op_threads(threads: int) -> None:
    """The calling thread's intra-op threads. torch keeps one process-wide count and applies it
    to a thread at that thread's first operator, so a count set before then is overwritten by
    whatever another thread set meanwhile (a second model's instances, say); reading the count
    first applies it now."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


@contextmanager
def serial_thread() -> Iterator[None]:
    """The calling thread at one intra-op thread for the block, so that it makes no OpenMP
    thread pool. An engine's instances run their passes on threads of their own, each with a
    pool of its intra-op threads, and libgomp cuts its workers' spin-wait short (they sleep at
    once, and each parallel region, several per operator, wakes them through the kernel) when
    the threads of all the process's pools outnumber the cores. A pool lives as long as its
    thread: one made where a model is loaded (casting its weights is a multi-thread operator)
    would count against the instances for good. With a pool on the loading thread, a 2-thread
    instance on 2 cores ran sst2-mux5's bf16 passes of 60 texts at less than half the rate it
    runs without (docs/bench/engine.md); single-thread instances make no pools."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Forward(Protocol):
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


def compiled_predict(model: torch.nn.Module) -> Forward:
    """``model.predict`` compiled by TorchInductor with frozen weights: inductor prepacks the
    weights for oneDNN itself and fuses the elementwise work between the matmuls (bias, GELU,
    residual adds, layer norms) into generated kernels, where the eager engine runs each as an
    operator of its own. Shapes are dynamic, so one graph serves the passes' varying rows and
    lengths. Needs a C++ compiler at load time (CPU). ``Engine.load`` compiles it (tens of
    seconds) before the instances run passes side by side."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # served weights never change: constants to the graph
    dynamo_config.capture_dynamic_output_shape_ops = True  # the packed forward's nonzero()
    # predict without its inference_mode (the engine calls it under no_grad): inductor's graphs
    # set version counters, which inference tensors refuse
    predict = functools.partial(inspect.unwrap(type(model).predict), model)
    return torch.compile(predict, dynamic=True)


class EchoForward:
    """Diagnostic engine: each text's "logits" encode its own token ids, not a prediction.

    Output row = [sum of ids, number of tokens, first real id after [CLS], 0...]. Tests use it
    to prove that every caller gets its own row back; operators use it to measure the server's
    overhead without model compute. A pass holding a text with ``[MASK]`` raises, so that tests
    can show a failing pass fails only the requests in it.
    """

    def __init__(self, num_labels: int) -> None:
        self.num_labels = max(3, num_labels)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids * attention_mask
        if bool((ids == ECHO_FAIL_TOKEN_ID).any()):
            raise RuntimeError("echo engine: a text holds [MASK], so this pass fails")
        out = torch.zeros(input_ids.shape[0], self.num_labels, dtype=torch.float64)
        out[:, 0] = ids.sum(1).double()
        out[:, 1] = attention_mask.sum(1).double()
        out[:, 2] = input_ids[:, 1].double()
        return out


@dataclass
class EngineOptions:
    device: str = "cpu"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16: CUDA only), see muxserve.model.precision
    kind: str = "eager"  # eager | compiled (torch.compile) | torchscript | echo (diagnostic)
    threads: int = 0  # 0: default_threads()
    instances: int = 1  # engine threads (instance_group count)
    pad_multiple: int = PAD_MULTIPLE  # 0: pad to LENGTH_BUCKETS
    cuda_graphs: bool | None = None  # eager engine on CUDA: replay CUDA graphs (serving.graphs); None: where the model allows
    max_texts: int = 0  # the most texts a pass holds (the graphs' largest bucket); 0: 64 mux groups


class Engine:
    """Owns a model on a device and the threads that run it."""

    def __init__(self, forward: Forward, config: MuxBertConfig, options: EngineOptions, name: str = "model") -> None:
        self.forward_fn = forward
        self.config = config
        self.options = options
        self.name = name
        self.device = torch.device(options.device)
        self.threads = options.threads or default_threads(options.instances)
        # a compiled graph cannot take inference tensors everywhere (inductor sets their version
        # counters): plain no_grad for it
        self._grad_mode = torch.no_grad if options.kind == "compiled" else torch.inference_mode
        self._executor = ThreadPoolExecutor(max_workers=options.instances, thread_name_prefix=f"engine-{name}", initializer=self._init_thread)

    @classmethod
    def load(cls, directory: str | Path, options: EngineOptions, name: str = "model") -> Engine:
        """The model in ``directory`` on an engine of ``options``; the loading itself runs on one
        thread (``serial_thread``)."""
        with serial_thread():
            return cls._load(Path(directory), options, name)

    @classmethod
    def _load(cls, directory: Path, options: EngineOptions, name: str) -> Engine:
        options = replace(options, precision=resolve_precision(options.precision, options.device, engine=options.kind))
        dtype = DTYPES[options.precision]
        model = load_model(directory, device=options.device, dtype=dtype)
        forward: Forward = model.predict
        if options.kind == "echo":
            forward = EchoForward(model.config.num_labels)
        elif options.kind == "torchscript":
            path = directory / "model.pt"
            if not path.exists():
                raise FileNotFoundError(f"{path} missing: run `muxserve export` for this model first")
            traced = torch.jit.load(str(path), map_location=options.device)
            forward = traced.to(dtype=dtype).eval() if dtype != torch.float32 else traced.eval()
        elif options.kind == "eager":
            # served weights never change: predict keeps its fastest layouts
            model.freeze_for_serving(int8=options.precision == "int8")
            if options.cuda_graphs and not options.device.startswith("cuda"):
                raise ValueError("CUDA graphs need a CUDA device (--device cuda)")
            if options.device.startswith("cuda") and options.cuda_graphs is not False:
                forward = graphed_forward(model, options.max_texts) or forward
        elif options.kind == "compiled":
            forward = compiled_predict(model)
        else:
            raise ValueError(f"unknown engine kind {options.kind!r} (eager | compiled | torchscript | echo)")
        engine = cls(forward, model.config, options, name)
        if options.kind == "compiled":
            engine._compile()
        return engine

    def _compile(self) -> None:
        """Compile the forward pass on one instance's thread, before any run side by side: a pass
        of one mux group and one of several (sizes of 1 get graphs of their own)."""
        n = self.config.num_instances
        for groups, length in ((1, 16), (3, 24)):
            self._executor.submit(self.infer, self.sample_rows(groups * n, length)).result()

    def _init_thread(self) -> None:
        set_intra_op_threads(self.threads)

    @property
    def num_instances(self) -> int:
        return self.config.num_instances

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows -> (ids, mask) at the padded length (``padded_length``). A short last group is
        left to the model (eager or traced alike), which fills it by its own ``short_group_policy``."""
        length = padded_length(max(len(r) for r in rows), self.config.max_seq_length, self.options.pad_multiple)
        ids = np.full((len(rows), length), self.config.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def infer(self, rows: list[list[int]]) -> np.ndarray:
        """Synchronous forward pass: logits float32 [len(rows), C]."""
        ids, mask = self.pad(rows)
        with self._grad_mode():
            logits = self.forward_fn(ids.to(self.device), mask.to(self.device))
        return logits[: len(rows)].float().cpu().numpy()

    async def run(self, rows: list[list[int]]) -> np.ndarray:
        """The pass's logits, without blocking the event loop for its compute. On a CPU the
        pass runs on an instance's thread. On CUDA the event loop's own thread launches it and
        an instance's thread only waits for its end (``_launch``)."""
        loop = asyncio.get_running_loop()
        if self.device.type != "cuda":
            return await loop.run_in_executor(self._executor, self.infer, rows)
        logits, done = self._launch(rows)
        await loop.run_in_executor(self._executor, done.synchronize)
        return logits.numpy()

    def _launch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Queue a CUDA pass and the copy of its logits to the host: (host logits, the event
        that marks them complete). Each launch takes the GIL again after it; from another
        thread, each then waits for the event loop to let go of it, while on the loop's thread
        the launches run back to back and only the wait for the device is left to a thread
        (measured within the noise of launching from a thread on an H200, docs/benchmarks.md#gpu;
        with CUDA graphs a pass is a handful of launches)."""
        ids, mask = self.pad(rows)
        with self._grad_mode():
            logits = self.forward_fn(ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True))
            host = logits[: len(rows)].float().to("cpu", non_blocking=True)  # pinned: the copy queues behind the pass
        done = torch.cuda.Event()
        done.record()
        return host, done

    def infer_all(self, batches: Iterable[list[list[int]]]) -> list[np.ndarray]:
        """Forward passes of ``batches`` on the engine's instances, side by side as when serving
        (each instance at its own intra-op threads); logits in order."""
        return list(self._executor.map(self.infer, batches))

    def sample_rows(self, count: int, length: int) -> list[list[int]]:
        """``count`` token rows of ``length`` ids, [CLS] ... [SEP]: for warmup and timing."""
        filler = min(1000, self.config.vocab_size - 1)  # an ordinary word piece of a BERT vocabulary
        return [[self.config.cls_token_id] + [filler] * (length - 2) + [self.config.sep_token_id]] * count

    def warmup(self) -> None:
        """One pass per common padded length, so the first requests do not pay for allocation
        (and, in bf16, for oneDNN building its kernels)."""
        n, longest = self.config.num_instances, self.config.max_seq_length
        # on the instances' threads: oneDNN keys its kernels by the threads that run them
        lengths = sorted({padded_length(k, longest, self.options.pad_multiple) for k in range(8, 65, 8)})
        self.infer_all(self.sample_rows(2 * n, length) for length in lengths)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
