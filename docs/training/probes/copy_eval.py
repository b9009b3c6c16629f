"""Where do a mux model's points go now: partners or the keyed path?

Scores SST-2 dev with the same weights in groups of N different sentences (file order, as
`muxserve eval`, and the mean of 5 groupings, as `--repeats 5`) and in groups holding one sentence
copied into all N slots, so that no text has a partner. Copied close to the baseline means the
remaining loss is interference between texts; copied close to mixed means it is the keyed input
path itself.

    python docs/training/probes/copy_eval.py --models sst2-mux2,sst2-mux5
"""

from __future__ import annotations

import argparse
import json

import torch

from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model
from muxserve.serving.repository import resolve_model_dir
from muxserve.training.data import read_tsv
from muxserve.training.evaluate import correct_in_copied_groups, correct_per_repeat


def _pct(right: torch.Tensor) -> float:
    return round(float(right.float().mean()) * 100, 2)


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
        model = load_model(directory)
        tokenizer = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
        data = read_tsv(args.data, model.config.labels)
        mixed = correct_per_repeat(model, tokenizer, data, repeats=5)  # row 0: file order
        copied = correct_in_copied_groups(model, tokenizer, data)
        print(json.dumps({
            "model": name, "n": len(data.labels), "mixed_file_order": _pct(mixed[0]), "mixed_mean5": _pct(mixed),
            "copied_per_slot": [_pct(row) for row in copied], "copied_mean": _pct(copied),
        }))


if __name__ == "__main__":
    main()
