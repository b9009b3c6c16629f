"""Short-group policy: accuracy when a mux group holds only k < N real texts.

A group that is not full (the server's queue ran dry before max_queue_delay) is filled by the
model's ``short_group_policy``: ``copy`` repeats the group's real texts (the reference's
choice), ``pad`` adds empty [CLS][SEP] texts. This measures SST-2 dev accuracy of each bundled
mux model with k real texts per group, for both policies:

    python benchmarks/short_groups.py [--models sst2-mux2,sst2-mux5] [--out results/short_groups.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model
from muxserve.repository import resolve_model_dir
from muxserve.training.data import read_tsv

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def accuracy_with_k_real(model, tok: TextTokenizer, texts: list[str], labels: list[int], k: int, groups_per_pass: int = 64) -> float:
    """Feed groups of k real texts; the model fills the other N-k slots by its policy."""
    correct = 0
    step = k * groups_per_pass
    for start in range(0, len(texts), step):
        ids, mask = tok(texts[start : start + step])
        filled_ids, filled_mask, real_rows, offset = [], [], [], 0
        for g in range(0, ids.shape[0], k):
            gi, gm = model.fill_short_group(ids[g : g + k], mask[g : g + k])
            real_rows.extend(range(offset, offset + min(k, ids.shape[0] - g)))
            filled_ids.append(gi)
            filled_mask.append(gm)
            offset += gi.shape[0]
        logits = model(torch.cat(filled_ids), torch.cat(filled_mask))
        pred = logits[torch.tensor(real_rows)].argmax(-1)
        correct += int((pred == torch.tensor(labels[start : start + step])).sum())
    return correct / len(texts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-mux2,sst2-mux5")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--out")
    a = p.parse_args()
    results = []
    for name in a.models.split(","):
        directory = resolve_model_dir(a.model_repository, name)
        model = load_model(directory)
        tok = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
        data = read_tsv(a.data, model.config.labels)
        n = model.config.num_instances
        for policy in ("copy", "pad"):
            model.config.short_group_policy = policy
            for k in sorted({1, max(1, n // 2), n}):
                if k == n and policy == "pad":
                    continue  # full groups: no filling, same for both policies
                acc = accuracy_with_k_real(model, tok, data.texts, data.labels, k)
                results.append({"model": name, "N": n, "policy": policy if k < n else "full", "real_texts_per_group": k, "accuracy": round(acc, 4)})
                print(json.dumps(results[-1]), flush=True)
    print("\n| model | real texts per group | policy | SST-2 dev acc |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['real_texts_per_group']} of {r['N']} | {r['policy']} | {100 * r['accuracy']:.1f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
