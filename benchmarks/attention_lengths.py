"""torch's CPU attention kernel at the sequence lengths the engine pads to.

``F.scaled_dot_product_attention`` on one thread with the served models' heads (12 x 32) and a
padding mask, for ``--batch`` sequences at each length: lengths that are a multiple of 16 run
in whole blocks of the kernel, those between them much slower. This is why the packed encoder
pads its attention to a multiple of ``ATTENTION_MULTIPLE`` (``muxserve.model.muxbert``).

    python benchmarks/attention_lengths.py [--batch 5,25] [--lengths 32,40,48,56,64] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def microseconds(fn, repeats: int) -> float:
    for _ in range(repeats // 10 + 1):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="5,25", help="sequences per call, comma-separated")
    p.add_argument("--lengths", default="32,40,48,56,64")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    print(f"| sequences | length | µs per call ({a.dtype}, 1 thread) |\n|---|---|---|")
    for batch in (int(x) for x in a.batch.split(",")):
        for length in (int(x) for x in a.lengths.split(",")):
            q, k, v = (torch.randn(batch, a.heads, length, a.head_dim, dtype=dtype) for _ in range(3))
            valid = torch.arange(length) < length - length // 5  # the last fifth is padding
            bias = (1.0 - valid.to(dtype))[None, None, None, :].expand(batch, 1, 1, length) * torch.finfo(dtype).min
            us = microseconds(lambda q=q, k=k, v=v, bias=bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), a.repeats)
            print(f"| {batch} | {length} | {us:.0f} |")


if __name__ == "__main__":
    main()
