"""Group composition: accuracy when a mux group is short, and when its texts differ in length.

Short groups. A group that is not full (the server's queue ran dry before max_queue_delay) is
filled by the model's ``short_group_policy``: ``copy`` repeats the group's real texts (the
reference's choice), ``pad`` adds empty [CLS][SEP] texts. Measured: SST-2 dev accuracy of each
mux model with k real texts per group, for both policies.

Mixed lengths. ``muxserve eval`` groups consecutive dev sentences, so a group mixes long and short
texts (the shorter ones padded to the longest); the server's length-aware batching under load
groups texts of similar length instead. A model fine-tuned on similar-length groups only (the
trainer's default length bucketing) can lose accuracy on mixed ones (``muxserve train
--mixed-length-groups`` trains on groups drawn at random). Measured: accuracy on groups in file
order against groups of length-sorted sentences.

    python benchmarks/short_groups.py [--models sst2-mux2,sst2-mux5] [--out results/short_groups.json]

``--models`` takes repository names or model folders (a training run's ``best/``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model
from muxserve.serving.repository import resolve_model_dir
from muxserve.training.data import LabeledTexts, read_tsv
from muxserve.training.evaluate import accuracy

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


def accuracy_by_length_grouping(model, tok: TextTokenizer, data: LabeledTexts) -> dict[str, float]:
    """Full groups of texts in file order (mixed lengths) vs sorted by length (similar lengths)."""
    lengths = [len(ids) for ids in tok.encode(data.texts).ids]
    orders = {"mixed": list(range(len(lengths))), "similar": sorted(range(len(lengths)), key=lambda i: lengths[i])}
    return {name: accuracy(model, tok, LabeledTexts([data.texts[i] for i in order], [data.labels[i] for i in order]))["accuracy"] for name, order in orders.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-mux2,sst2-mux5")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--out")
    a = p.parse_args()
    short, by_length = [], []
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
                short.append({"model": name, "N": n, "policy": policy if k < n else "full", "real_texts_per_group": k, "accuracy": round(acc, 4)})
                print(json.dumps(short[-1]), flush=True)
        by_length.append({"model": name, "N": n, **{f"accuracy_{k}_lengths": round(v, 4) for k, v in accuracy_by_length_grouping(model, tok, data).items()}})
        print(json.dumps(by_length[-1]), flush=True)
    print("\n| model | real texts per group | policy | SST-2 dev acc |\n|---|---|---|---|")
    for r in short:
        print(f"| {r['model']} | {r['real_texts_per_group']} of {r['N']} | {r['policy']} | {100 * r['accuracy']:.1f} |")
    print("\n| model | groups in file order (mixed lengths) | groups of length-sorted texts |\n|---|---|---|")
    for r in by_length:
        print(f"| {r['model']} | {100 * r['accuracy_mixed_lengths']:.1f} | {100 * r['accuracy_similar_lengths']:.1f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"short_groups": short, "by_length": by_length}, indent=2) + "\n")


if __name__ == "__main__":
    main()
