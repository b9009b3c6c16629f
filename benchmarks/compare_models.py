"""Is model B measurably better than model A? A paired comparison on the same dev sentences.

One ``muxserve eval`` number has a standard error of about 1.3 points on SST-2 dev (872 sentences)
and, for a mux model, depends on which sentences share a group. Two models scored on the *same*
sentences differ much less by chance: only the sentences on which they disagree count. This script

1. scores each model on K groupings of the dev set (``muxserve eval --repeats K``: grouping 0 is
   file order, the others seeded random orders), so that a model's score is its mean over groupings;
2. calls a sentence right for a model when the majority of its K groupings get it right, and runs
   an exact two-sided sign test (McNemar) on the sentences where A and B disagree: is B's vote over
   the K groupings (an ensemble of sorts) better than A's?
3. counts, per sentence, the groupings that get it right, and runs the same sign test on the
   sentences where the two counts differ: is B's accuracy in one pass, as served (the mean over
   groupings), better than A's? A model whose answers depend less on a text's partners can gain
   here and not in (2).
4. splits both mean accuracies by sentence length in words (``by_length``): where the points go.

    python benchmarks/compare_models.py --models sst2-mux2,runs/sst2-mux2-r4/final [--groupings 5]

``--models`` takes repository names or model folders. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model
from muxserve.serving.repository import resolve_model_dir
from muxserve.training.data import read_tsv
from muxserve.training.evaluate import correct_per_repeat

ROOT = Path(__file__).resolve().parents[1]


def sign_test(b_only: int, a_only: int) -> float:
    """Exact two-sided binomial p-value of b_only successes among the discordant pairs."""
    n = b_only + a_only
    if n == 0:
        return 1.0
    k = min(b_only, a_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _p(value: float) -> float:
    return float(f"{value:.3g}")  # three significant digits: small p-values stay readable


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    k = a.shape[0]
    a_right, b_right = a.float().mean(0) > 0.5, b.float().mean(0) > 0.5
    b_only, a_only = int((b_right & ~a_right).sum()), int((a_right & ~b_right).sum())
    a_count, b_count = a.sum(0), b.sum(0)
    b_more, a_more = int((b_count > a_count).sum()), int((a_count > b_count).sum())
    return {
        "mean_accuracy_a": round(float(a.float().mean()), 4),
        "mean_accuracy_b": round(float(b.float().mean()), 4),
        "accuracy_per_grouping_a": [round(float(r.float().mean()), 4) for r in a],
        "accuracy_per_grouping_b": [round(float(r.float().mean()), 4) for r in b],
        "majority_accuracy_a": round(float(a_right.float().mean()), 4),
        "majority_accuracy_b": round(float(b_right.float().mean()), 4),
        "groupings": k,
        "b_right_a_wrong": b_only,
        "a_right_b_wrong": a_only,
        "sign_test_p": _p(sign_test(b_only, a_only)),
        "b_more_groupings_right": b_more,
        "a_more_groupings_right": a_more,
        "sign_test_p_per_pass": _p(sign_test(b_more, a_more)),
    }


# [low, high) in words: SST-2 train is mostly short phrases, dev mostly whole sentences
LENGTH_BINS = ((0, 10), (10, 15), (15, 20), (20, 30), (30, None))


def by_length(a: torch.Tensor, b: torch.Tensor, texts: list[str]) -> dict:
    """Mean accuracy over the groupings of A and B, split by each sentence's length in words."""
    words = torch.tensor([len(t.split()) for t in texts])
    out = {}
    for low, high in LENGTH_BINS:
        rows = (words >= low) & (words < high) if high is not None else words >= low
        if not rows.any():
            continue
        name = f"{low}-{high - 1}" if high is not None else f"{low}+"
        out[name] = {"n": int(rows.sum()), "accuracy_a": round(float(a[:, rows].float().mean()), 4), "accuracy_b": round(float(b[:, rows].float().mean()), 4)}
    return out


def write_json(result: object, out: str | None) -> str:
    """The result as indented JSON, also written to ``out`` when given."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True, help="A,B: repository names or model folders")
    parser.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    parser.add_argument("--groupings", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    if len(names) != 2:
        parser.error("--models takes exactly two models: A,B")
    dirs = [resolve_model_dir(args.model_repository, m) for m in names]
    models = [load_model(d) for d in dirs]
    data = read_tsv(args.data, models[0].config.labels)
    a, b = (correct_per_repeat(m, TextTokenizer(d / TOKENIZER_FILE, m.config.max_seq_length), data, args.groupings) for m, d in zip(models, dirs, strict=True))
    result = {"a": names[0], "b": names[1], "n": len(data.texts), **compare(a, b), "by_length": by_length(a, b, data.texts)}
    print(write_json(result, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
