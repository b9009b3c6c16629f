"""The physical limit: FLOPs per text of a MUX-BERT forward pass, and the machine's matmul rate.

FLOPs here are 2 x the multiply-accumulates of the matrix products: every ``nn.Linear`` and the
two attention products (Q K^T and A V). Elementwise work (embedding sums, LayerNorm, GELU,
softmax, the Hadamard mux, the mean over slots) is left out: it is memory-bound and a few
percent of the total at these shapes. Lookups (embeddings) cost no FLOPs.

Shapes follow ``muxserve.model.muxbert``: ``d`` hidden size, ``I`` intermediate size, ``L``
padded sequence length, ``N`` texts per mux group, ``C`` labels. One encoder layer on a
sequence of length L costs

    Q, K, V, output projections   4 * 2 L d^2  = 8 L d^2
    Q K^T and A V (all heads)     2 * 2 L^2 d  = 4 L^2 d
    feed-forward d -> I -> d      2 * 2 L d I  = 4 L d I

A mux model runs the encoder once per group of N texts, so each text pays 1/N of it, plus its
own demultiplexing (``index_pos``: dense_1 2d->d, dense_2 d->d, pre_decoder d->d on the [CLS]
position) and classifier. ``gaussian_attention_v2`` adds one layer per text at length L and,
per group, one layer across the N instances at each of the L positions.

The served-throughput ceiling of a model on a machine is ``matmul rate / FLOPs per text``, with
each text at its own token length (``mean_flops_per_text(cfg, lengths, 1, bucketed=False)``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from muxserve.model.muxbert import MuxBertConfig


@dataclass(frozen=True)
class LayerFlops:
    linear: float  # projections and feed-forward
    attention: float  # Q K^T and A V

    @property
    def total(self) -> float:
        return self.linear + self.attention


def layer_flops(length: int, hidden: int, intermediate: int) -> LayerFlops:
    """One BERT layer on one sequence of ``length`` tokens."""
    d, i, n = hidden, intermediate, length
    return LayerFlops(linear=8 * n * d * d + 4 * n * d * i, attention=4 * n * n * d)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per text of one forward pass, by part (see the module docstring)."""

    embeddings: float
    mux: float
    encoder: float
    demux: float
    classifier: float
    attention: float  # the share of mux + encoder in attention products (Q K^T, A V)
    seq_len: int
    num_instances: int

    @property
    def total(self) -> float:
        return self.embeddings + self.mux + self.encoder + self.demux + self.classifier

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def flops_per_text(cfg: MuxBertConfig, seq_len: int) -> FlopCount:
    """FLOPs per text of ``MuxBertModel.forward`` at padded length ``seq_len`` with full groups."""
    n, d, i, length = cfg.num_instances, cfg.hidden_size, cfg.intermediate_size, seq_len
    layer = layer_flops(length, d, i)
    encoder = cfg.num_hidden_layers * layer.total / n
    attention = cfg.num_hidden_layers * layer.attention / n
    mux = 0.0
    if n > 1 and cfg.muxing_variant == "gaussian_attention_v2":
        across = layer_flops(n, d, i)  # one layer over the N instances, at every position
        mux = layer.total + length * across.total / n
        attention += layer.attention + length * across.attention / n
    positions = 1 if cfg.task == "sequence_classification" else length
    demux = positions * (2 * (2 * d) * d + 2 * d * d + 2 * d * d) if n > 1 else 0.0
    classifier = positions * 2 * d * cfg.num_labels
    return FlopCount(0.0, float(mux), float(encoder), float(demux), float(classifier), float(attention), length, n)


def padded_lengths(lengths: Sequence[int], chunk: int, max_length: int, bucketed: bool = True) -> list[int]:
    """The length each text is computed at when texts go in consecutive chunks of ``chunk``
    padded to the chunk's longest (rounded up to the engine's length buckets if ``bucketed``)."""
    from muxserve.serving.padding import bucket_length

    out: list[int] = []
    chunk = max(1, chunk)
    for start in range(0, len(lengths), chunk):
        part = lengths[start : start + chunk]
        longest = min(max(part), max_length)
        out.extend([bucket_length(longest, max_length) if bucketed else longest] * len(part))
    return out


def mean_flops_per_text(cfg: MuxBertConfig, lengths: Sequence[int], chunk: int, bucketed: bool = True) -> dict:
    """Mean FLOPs per text over real token lengths, padded as in ``padded_lengths``.

    ``chunk`` = 1 without buckets: each text at its own length, the least work (what a perfect
    length-aware batcher would approach). ``chunk`` = the engine's texts per forward pass with
    ``bucketed``: the work when a batch, taken in arrival order, is padded to its longest text."""
    if not lengths:
        raise ValueError("no lengths")
    padded = padded_lengths(lengths, chunk, cfg.max_seq_length, bucketed)
    cache: dict[int, float] = {}
    total = 0.0
    for length in padded:
        if length not in cache:
            cache[length] = flops_per_text(cfg, length).total
        total += cache[length]
    return {"flops_per_text": total / len(padded), "mean_padded_length": sum(padded) / len(padded), "chunk": chunk, "bucketed": bucketed}


def measure_matmul_rate(rows: int, inner: int, cols: int, threads: int = 0, min_seconds: float = 2.0, warmup: int = 3, min_runs: int = 5, rounds: int = 4, dtype: str = "fp32") -> dict:
    """FLOP/s of a ``[rows, inner] x [inner, cols]`` matmul loop (``dtype``: fp32, bf16, int8:
    the precision the engine serves at; int8 is FBGEMM's dynamic int8 matmul, as the engine runs
    it, in int8 operations per second) on the CPU with ``threads``
    intra-op threads (0: torch's current setting), e.g. an encoder's feed-forward at the served
    batch shape: rows = (texts per pass / N) * L, inner = d, cols = I.

    ``min_seconds`` is split into ``rounds``; the result is the best round, the rate the machine
    reaches when nothing else holds the cores (other rounds are in ``rounds_flops_per_s``)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        from muxserve.model.precision import dtype_of

        gen = torch.Generator().manual_seed(0)
        a = torch.randn(rows, inner, generator=gen).to(dtype_of(dtype))
        b = torch.randn(inner, cols, generator=gen).to(dtype_of(dtype))
        if dtype == "int8":
            from muxserve.model.muxbert import int8_linear_weight

            packed = int8_linear_weight(b.T, torch.zeros(cols))

            def matmul() -> None:
                torch.ops.quantized.linear_dynamic(a, packed, False)
        else:
            out = torch.empty(rows, cols, dtype=dtype_of(dtype))

            def matmul() -> None:
                torch.mm(a, b, out=out)

        for _ in range(warmup):
            matmul()
        per_round = min_seconds / max(1, rounds)
        rates, total_runs, total_s = [], 0, 0.0
        for _ in range(max(1, rounds)):
            runs, start = 0, time.perf_counter()
            while True:
                matmul()
                runs += 1
                elapsed = time.perf_counter() - start
                if elapsed >= per_round and runs >= min_runs:
                    break
            rates.append(2.0 * rows * inner * cols * runs / elapsed)
            total_runs, total_s = total_runs + runs, total_s + elapsed
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return {"flops_per_s": max(rates), "rounds_flops_per_s": rates, "shape": [rows, inner, cols], "dtype": dtype, "threads": used, "runs": total_runs, "seconds": total_s}
