"""Mixed-length groups: accuracy when a mux group's texts differ in length, against groups of
similar-length texts.

``muxserve eval`` groups consecutive dev sentences, so a group mixes long and short texts (the
shorter ones padded to the longest); the server's length-aware batching instead groups texts of
similar length. A model trained on similar-length groups only (the trainer's default length
bucketing) can lose accuracy on mixed ones; ``muxserve train --mixed-length-groups`` trains on
groups drawn at random. This measures each model both ways on SST-2 dev:

    python benchmarks/group_lengths.py [--models sst2-mux2,sst2-mux5] [--out results/group_lengths.json]

``--models`` takes repository names or model folders (a training run's ``best/``).
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
from muxserve.training.evaluate import predict

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-mux2,sst2-mux5")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--out")
    a = p.parse_args()
    results = []
    for name in a.models.split(","):
        directory = Path(name) if Path(name, "muxbert.json").exists() else resolve_model_dir(a.model_repository, name)
        model = load_model(directory).float().eval()
        tok = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
        data = read_tsv(a.data, model.config.labels)
        labels = torch.tensor(data.labels)
        lengths = [len(ids) for ids in tok.encode(data.texts).ids]
        orders = {"mixed (file order)": list(range(len(labels))), "similar (length-sorted)": sorted(range(len(labels)), key=lambda i: lengths[i])}
        for grouping, order in orders.items():
            logits = predict(model, tok, [data.texts[i] for i in order])
            acc = float((logits.argmax(-1) == labels[order]).float().mean())
            results.append({"model": name, "N": model.config.num_instances, "groups": grouping, "accuracy": round(acc, 4)})
            print(json.dumps(results[-1]), flush=True)
    print("\n| model | groups of | SST-2 dev acc |\n|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['groups']} | {100 * r['accuracy']:.1f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
