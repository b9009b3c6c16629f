"""Cost of a fine-tuning step: fp32 vs bf16 autocast, and the padding of similar- vs mixed-length groups.

1. Time of one training step (forward, backward, AdamW) of a model on the first ``--texts`` SST-2
   dev sentences, fp32 and under ``torch.autocast(bfloat16)`` (``muxserve train --bf16``),
   interleaved rounds, median.
2. Padded tokens the encoder runs on over one epoch of SST-2 train, for the trainer's default
   batching (similar-length groups) and ``--mixed-length-groups``, at each N.

    python benchmarks/train_step.py [--model sst2-mux2] [--threads 1] [--ns 2,5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model
from muxserve.serving.repository import resolve_model_dir
from muxserve.training.data import group_bucketed_batches, length_bucketed_batches, read_tsv_sentences

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"


def step_seconds(model, ids: torch.Tensor, mask: torch.Tensor, optimizer: torch.optim.Optimizer, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, mask).float().logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def padded_tokens(batches, lengths: list[int], n: int) -> int:
    return sum(len(b) // n * max(lengths[i] for i in b) for b in batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--model", default="sst2-mux2")
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--ns", default="2,5", help="N values for the padding count")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    directory = resolve_model_dir(a.model_repository, a.model)
    model = load_model(directory).float().train()
    tok = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
    ids, mask = tok(read_tsv_sentences(DATA / "dev.tsv")[: a.texts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for round_ in range(a.rounds + 1):  # the first pass only warms up
        for mode in times:
            seconds = step_seconds(model, ids, mask, optimizer, mode == "bf16")
            if round_:
                times[mode].append(seconds)
    step = {mode: statistics.median(t) for mode, t in times.items()}
    print(json.dumps({"model": a.model, "batch": list(ids.shape), "threads": a.threads, "step_s": step, "bf16_speedup": step["fp32"] / step["bf16"]}))

    train = read_tsv_sentences(DATA / "train.tsv")
    lengths = [len(r) for r in tok.encode(train).ids]
    for n in (int(x) for x in a.ns.split(",")):
        similar = padded_tokens(length_bucketed_batches(lengths, 32 * n, random.Random(0)), lengths, n)
        mixed = padded_tokens(group_bucketed_batches(lengths, 32 * n, n, random.Random(0)), lengths, n)
        print(json.dumps({"N": n, "batch_texts": 32 * n, "padded_tokens_similar": similar, "padded_tokens_mixed": mixed, "mixed_over_similar": mixed / similar}))


if __name__ == "__main__":
    main()
