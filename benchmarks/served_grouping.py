"""Accuracy as served: which texts share a mux group when the server is busy.

``muxserve eval`` groups consecutive dev sentences. A busy server groups what its scheduler
chooses: with length-aware batching (the default) a batch is the texts closest in length to the
oldest waiting one (``muxserve.serving.scheduler.split_queue``), and consecutive texts of the batch fill
the groups. This script replays that choice on a saturated queue (every dev sentence waiting, in
K random arrival orders, none overdue) and scores three ways of forming the groups:

- ``arrival``: no length-aware batching, groups in arrival order (as ``muxserve eval``); this
  is also what a server forms when its queue holds no more than a pass (every waiting text runs);
- ``arrival_sorted``: the same batch sorted by length first;
- ``length_aware``: the scheduler's batch, groups in arrival order within it (the scheduler);
- ``length_aware_sorted``: the same batch sorted by length first, so that each group holds texts
  of nearly equal length (what the scheduler would do if it sorted).

Each model runs as packaged and, for a mux model, with its group padding mask switched the other
way (``mask_group_padding``; ``--packaged-only`` leaves that out). The paired sign test
(``compare_models.py``) compares sorted with unsorted groups on the same sentences.
``--batch-texts`` replays passes of that many texts instead of the configured batch, e.g. the
passes a closed loop of 64 one-text callers makes (about 25 texts).

    python benchmarks/served_grouping.py [--models sst2-mux2,sst2-mux5] [--arrivals 5] [--batch-texts K] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch
from compare_models import compare, write_json

from muxserve.model.muxbert import MuxBertModel
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model
from muxserve.serving.registry import batch_texts
from muxserve.serving.repository import resolve_model_dir, scan
from muxserve.serving.scheduler import split_queue
from muxserve.training.data import read_tsv

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("arrival", "arrival_sorted", "length_aware", "length_aware_sorted")


def served_batches(lengths: list[int], arrival: list[int], cap: int, policy: str) -> list[list[int]]:
    """The scheduler's batches (text indices, in the order that fills groups) when every text
    waits in the queue in ``arrival`` order."""
    queue, batches = list(arrival), []
    while queue:
        batch, queue = split_queue(queue, lengths.__getitem__, lambda _: False, cap, policy.startswith("length_aware"))
        if policy.endswith("_sorted"):
            batch.sort(key=lambda i: lengths[i])
        batches.append(batch)
    return batches


@torch.no_grad()
def correct_as_served(model: MuxBertModel, ids: list[list[int]], labels: torch.Tensor, tok: TextTokenizer, cap: int, policy: str, arrivals: int, seed: int = 0) -> torch.Tensor:
    """[K, T] bool: sentence t right in arrival order k (a fresh random order each)."""
    model.eval()
    lengths = [len(r) for r in ids]
    rng = random.Random(seed)
    rows = []
    for _ in range(arrivals):
        arrival = list(range(len(ids)))
        rng.shuffle(arrival)
        pred = torch.empty(len(ids), dtype=torch.long)
        for batch in served_batches(lengths, arrival, cap, policy):
            batch_ids, mask = tok.pad([ids[i] for i in batch])
            pred[torch.tensor(batch)] = model(batch_ids, mask).argmax(-1)
        rows.append(pred == labels)
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-mux2,sst2-mux5", help="repository names (their config.pbtxt sets the batch)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--arrivals", type=int, default=5, help="random arrival orders per policy")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch-texts", type=int, default=0, help="texts per pass (default: the model's configured batch)")
    p.add_argument("--packaged-only", action="store_true", help="only the model's own group padding mask")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    entries = scan(a.model_repository)
    results = []
    for name in a.models.split(","):
        folder = resolve_model_dir(a.model_repository, name)
        packaged = load_model(folder)
        cap = a.batch_texts or batch_texts(entries[name], packaged.config.num_instances)
        tok = TextTokenizer(folder / TOKENIZER_FILE, packaged.config.max_seq_length)
        data = read_tsv(a.data, packaged.config.labels)
        ids, labels = tok.encode(data.texts).ids, torch.tensor(data.labels)
        masks = [packaged.config.mask_group_padding]
        if packaged.config.is_mux and not a.packaged_only:
            masks.append(not masks[0])
        for masked in masks:
            packaged.config = dataclasses.replace(packaged.config, mask_group_padding=masked)
            right = {policy: correct_as_served(packaged, ids, labels, tok, cap, policy, a.arrivals) for policy in POLICIES}
            row = {"model": name, "batch_texts": cap, "mask_group_padding": masked, "as_packaged": masked == masks[0], "arrivals": a.arrivals}
            row.update({f"accuracy_{policy}": round(float(r.float().mean()), 4) for policy, r in right.items()})
            row["sorted_vs_unsorted"] = compare(right["length_aware_sorted"], right["length_aware"])
            row["arrival_sorted_vs_arrival"] = compare(right["arrival_sorted"], right["arrival"])
            results.append(row)
            tests = {key: row[key] for key in ("sorted_vs_unsorted", "arrival_sorted_vs_arrival")}
            print(json.dumps({k: v for k, v in row.items() if k not in tests} | {f"{key} p": [test["sign_test_p"], test["sign_test_p_per_pass"]] for key, test in tests.items()}), flush=True)
    write_json(results, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
