"""Serving precision: which number type a model's matmuls run in, chosen from the hardware.

``auto`` resolves to the fastest type that holds accuracy on the device: fp16 on CUDA; bf16 on a
CPU with bf16 matrix units (AMX ``amx_bf16`` or ``avx512_bf16``, read from ``/proc/cpuinfo``),
where oneDNN runs the forward pass 2.2-4.6x faster than in fp32 with AMX and 2.0-2.5x with
AVX512-BF16 alone (docs/bench/engine.md); on any other x86 CPU with AVX2, int8: the encoder's
projections in dynamic int8 from the model's ``int8_first_layer`` on (FBGEMM: weights per output
channel, each pass's activations scaled over their own range), 1.3-1.6x the texts/s of fp32 at
serving pass sizes, the rest of the model in fp32; fp32 elsewhere. Half precision casts the
weights (``model.to(dtype)``) rather than running fp32 weights under autocast: on CPU the cast
model measured 1.2-1.4x faster (``benchmarks/precision_modes.py``, docs/bench/engine.md) and
holds SST-2 dev accuracy within 0.2 points of fp32
(``model_repository/MODELS.json``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
CHOICES = ("auto", *PRECISIONS)
# the model's floating-point type; int8 quantizes the encoder's projections of an fp32 model
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where there is no ``/proc/cpuinfo``)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_fast_bf16(flags: Iterable[str] | None = None) -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16)."""
    return bool(BF16_CPU_FLAGS & set(cpu_flags() if flags is None else flags))


def cpu_has_fast_int8(flags: Iterable[str] | None = None) -> bool:
    """True when FBGEMM's int8 matmul runs here at speed: an x86 CPU with AVX2 (and torch built
    with FBGEMM, as its x86 wheels are)."""
    return "avx2" in set(cpu_flags() if flags is None else flags) and "fbgemm" in torch.backends.quantized.supported_engines


def resolve_precision(requested: str | None, device: str, flags: Iterable[str] | None = None, engine: str = "eager") -> str:
    """``auto`` (or empty) -> the device's fastest accurate precision for the ``engine`` kind
    (int8 is the eager engine's: a compiled or TorchScript engine gets fp32 where the eager one
    would get int8, and asking them for int8 is an error); anything else is checked.

    fp16 is refused on CPU (no fast fp16 path there; bf16 is the CPU's half precision), int8 on
    CUDA and on a CPU without FBGEMM's kernels. bf16 on a CPU without bf16 units is allowed when
    asked for: it is correct, only slower."""
    choice = (requested or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"unknown precision {requested!r} (choose from {', '.join(CHOICES)})")
    is_cuda = str(device).startswith("cuda")
    if choice == "auto":
        if is_cuda:
            return "fp16"
        if cpu_has_fast_bf16(flags):
            return "bf16"
        return "int8" if engine in ("eager", "echo") and cpu_has_fast_int8(flags) else "fp32"
    if choice == "fp16" and not is_cuda:
        raise ValueError("precision fp16 is for CUDA; on CPU use bf16 (or fp32)")
    if choice == "int8" and (is_cuda or "fbgemm" not in torch.backends.quantized.supported_engines):
        raise ValueError("precision int8 is for x86 CPUs (FBGEMM's kernels); use fp16 on CUDA, fp32 elsewhere")
    if choice == "int8" and engine not in ("eager", "echo"):
        raise ValueError(f"precision int8 is served by the eager engine, not {engine} (use --precision fp32 with it)")
    return choice


def dtype_of(precision: str) -> torch.dtype:
    return DTYPES[precision]
