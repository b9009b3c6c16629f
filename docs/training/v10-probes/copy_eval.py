"""Where do a mux model's points go now: partners or the keyed path? (session 10)

Scores SST-2 dev three ways with the same weights: groups of N different sentences in file order
(as `muxserve eval`), and groups holding one sentence copied into all N slots, so that no text has a
partner. Copied close to the baseline means the remaining loss is interference between texts;
copied close to mixed means it is the keyed input path itself (session 4's reading for older
weights: 81.7 copied vs 81.5 mixed).

    python docs/training/v10-probes/copy_eval.py --models sst2-mux2,sst2-mux5
"""

from __future__ import annotations

import argparse
import json

import torch

from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model
from muxserve.repository import resolve_model_dir
from muxserve.training.data import read_tsv
from muxserve.training.evaluate import predict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-repository", default="model_repository")
    ap.add_argument("--models", default="sst2-mux2,sst2-mux5")
    ap.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        directory = resolve_model_dir(args.model_repository, name)
        model = load_model(directory).eval()
        n = model.config.num_instances
        tokenizer = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
        data = read_tsv(args.data, model.config.labels)
        labels = torch.tensor(data.labels)
        with torch.no_grad():
            mixed = predict(model, tokenizer, data.texts).argmax(-1)
            copied = predict(model, tokenizer, [t for t in data.texts for _ in range(n)]).argmax(-1)
        # every slot of a copied group answers for the same sentence: score each slot position
        per_slot = [round(float((copied[i::n] == labels).float().mean()) * 100, 2) for i in range(n)]
        print(json.dumps({"model": name, "n": len(labels), "mixed_file_order": round(float((mixed == labels).float().mean()) * 100, 2), "copied_per_slot": per_slot}))


if __name__ == "__main__":
    main()
