"""Where in the dev set do the mux models lose their points? Accuracy by sentence length (session 11).

Scores SST-2 dev as `compare_models.py` does (the mean of 5 groupings: file order and 4 seeded
random orders) and splits it by the sentence's length in words. SST-2 train is mostly short phrases
(36% under 5 words) and dev mostly whole sentences (68% of 15 words or more), so a gap that grows
with length could be the training distribution or interference between longer texts.

    python docs/training/v11-probes/by_length.py --models sst2-bert,sst2-mux2,sst2-mux5
"""

from __future__ import annotations

import argparse
import json

import torch

from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model
from muxserve.repository import resolve_model_dir
from muxserve.training.data import read_tsv
from muxserve.training.evaluate import correct_per_repeat

# [low, high) in words
LENGTH_BINS = ((0, 10), (10, 15), (15, 20), (20, 30), (30, 10_000))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-repository", default="model_repository")
    ap.add_argument("--models", default="sst2-bert,sst2-mux2,sst2-mux5", help="repository names or model folders")
    ap.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        directory = resolve_model_dir(args.model_repository, name)
        model = load_model(directory)
        tokenizer = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
        data = read_tsv(args.data, model.config.labels)
        right = correct_per_repeat(model, tokenizer, data, repeats=5).float().mean(0)  # per sentence
        words = torch.tensor([len(t.split()) for t in data.texts])
        by_length = {}
        for low, high in LENGTH_BINS:
            rows = (words >= low) & (words < high)
            by_length[f"{low}-{high - 1}" if high < 10_000 else f"{low}+"] = {"n": int(rows.sum()), "accuracy": round(float(right[rows].mean()) * 100, 2)}
        print(json.dumps({"model": name, "n": len(data.labels), "mean5": round(float(right.mean()) * 100, 2), "by_length": by_length}))


if __name__ == "__main__":
    main()
