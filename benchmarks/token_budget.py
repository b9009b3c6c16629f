"""Padding of the scheduler's batches on real sentence lengths: fixed batches padded to length
buckets against a token budget padded to multiples of 8.

The scheduler's own ``split_queue`` forms the batches over SST-2 dev token lengths. A closed loop
of ``--concurrency`` callers keeps that many texts queued (each text taken is replaced by the next
sentence), so every pass chooses among as many texts as a loaded server would. Three batchings:

- ``buckets``: ``preferred_batch_size`` texts a pass, padded to the engine's length buckets;
- ``fixed_pad8``: the same texts, padded to the next multiple of 8;
- ``budget``: up to ``max_batch_size`` texts within the automatic token budget, padded to 8.

Padding is the share of the token slots computed (mux groups x N x padded length) that hold no
text; a started mux group counts whole.

    python benchmarks/token_budget.py [--concurrency 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from muxserve.bench.run import load_texts
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_config
from muxserve.serving.padding import PAD_MULTIPLE
from muxserve.serving.registry import batch_texts, max_texts, token_budget
from muxserve.serving.repository import resolve_model_dir, scan
from muxserve.serving.scheduler import TokenBudget, split_queue
from muxserve.serving.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def simulate(lengths: list[int], concurrency: int, cap: int, n: int, max_length: int, budget: TokenBudget | None, pad_multiple: int) -> dict:
    """Run every length through the scheduler's batching once; the padding and pass sizes."""
    cost = budget or TokenBudget(0, group=n, pad_multiple=pad_multiple, max_length=max_length)
    upcoming = list(enumerate(lengths))
    queue = upcoming[:concurrency]
    upcoming = upcoming[concurrency:]
    slots = real = passes = 0
    while queue:
        batch, queue = split_queue(queue, lambda t: t[1], lambda t: False, cap, True, budget)
        longest = max(t[1] for t in batch)
        slots += cost.cost(len(batch), longest) * n
        real += sum(t[1] for t in batch)
        passes += 1
        queue += upcoming[: len(batch)]
        upcoming = upcoming[len(batch) :]
    return {"padding": round(1 - real / slots, 4), "slots": slots, "real_tokens": real, "passes": passes, "texts_per_pass": round(len(lengths) / passes, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--texts", default="", help="sentences (default: SST-2 dev)")
    p.add_argument("--concurrency", type=int, default=64, help="texts waiting when a pass is formed")
    p.add_argument("--out")
    a = p.parse_args()
    texts = load_texts(a.texts or None)
    report: dict = {"texts": len(texts), "concurrency": a.concurrency, "models": {}}
    for name, entry in sorted(scan(a.model_repository).items()):
        directory = resolve_model_dir(a.model_repository, name)
        cfg = load_config(directory)
        lengths = [len(r) for r in TextTokenizer(directory / TOKENIZER_FILE, cfg.max_seq_length).encode(texts).ids]
        n, max_length = cfg.num_instances, cfg.max_seq_length
        preferred = batch_texts(entry, n)
        budget = token_budget(entry, Settings(), n, max_length, PAD_MULTIPLE)
        rows = {
            "buckets": simulate(lengths, a.concurrency, preferred, n, max_length, None, 0),
            "fixed_pad8": simulate(lengths, a.concurrency, preferred, n, max_length, None, PAD_MULTIPLE),
            "budget": simulate(lengths, a.concurrency, max_texts(entry, n), n, max_length, budget, PAD_MULTIPLE),
        }
        rows["budget"]["max_batch_tokens"] = budget.max_tokens if budget else 0
        rows["slots_saved_by_budget"] = round(1 - rows["budget"]["slots"] / rows["buckets"]["slots"], 4)
        report["models"][name] = {"num_instances": n, "mean_tokens": round(sum(lengths) / len(lengths), 1), **rows}
        print(f"{name}: padding buckets {rows['buckets']['padding']:.1%} ({rows['buckets']['texts_per_pass']} texts/pass), pad-8 {rows['fixed_pad8']['padding']:.1%}, "
              f"budget {rows['budget']['padding']:.1%} ({rows['budget']['texts_per_pass']} texts/pass); token slots computed -{rows['slots_saved_by_budget']:.1%}")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
