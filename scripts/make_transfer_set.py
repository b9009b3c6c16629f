"""Write a distillation transfer set: new texts made from SST-2 training phrases, for
``muxserve train finetune --teacher ... --transfer FILE`` (the teacher's logits are their only labels).

Why: SST-2 train is 67k phrases of 9.4 words on average, the dev set full sentences of 19.5; a mux
student fits the phrases (train acc 0.93) and tops out near 82% on dev. The transfer set adds
sentence-length texts the student has not seen, each scored by the fine-tuned baseline:

- ``concat``: two random phrases of 4+ words joined by a connective (", but", " and", ...), often of
  opposite sentiment, so the teacher's soft label carries the balance between them;
- ``dropout``: a phrase of 8+ words with each word dropped with probability 0.15;
- ``swap``: a phrase of 8+ words with 15% of its words replaced by words of other phrases.

Seeded; writes ``sentence<TAB>label`` with the label ``-`` (unlabeled). Never write into the
project tree: the output belongs beside the runs.

    python scripts/make_transfer_set.py ../shared/data/sst2/train.tsv runs/transfer.tsv --size 120000
"""

from __future__ import annotations

import argparse
import random

from muxserve.training.data import read_tsv_sentences

CONNECTIVES = [" ", " , ", " , but ", " but ", " and ", " ; ", " . ", " , yet ", " , although "]


def concat(phrases: list[str], rng: random.Random) -> str:
    return rng.choice(phrases) + rng.choice(CONNECTIVES) + rng.choice(phrases)


def word_dropout(text: str, rng: random.Random, p: float = 0.15) -> str:
    words = text.split()
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept or words[:1])


def word_swap(text: str, vocabulary: list[str], rng: random.Random, p: float = 0.15) -> str:
    return " ".join(rng.choice(vocabulary) if rng.random() < p else w for w in text.split())


def make_transfer_set(sentences: list[str], size: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    medium = [s.strip() for s in sentences if len(s.split()) >= 4]
    long = [s.strip() for s in sentences if len(s.split()) >= 8]
    vocabulary = [w for s in long for w in s.split()]
    seen = {s.strip() for s in sentences}
    texts: list[str] = []
    made: set[str] = set()
    while len(texts) < size:
        kind = rng.random()
        if kind < 0.5:
            text = concat(medium, rng)
        elif kind < 0.75:
            text = word_dropout(rng.choice(long), rng)
        else:
            text = word_swap(rng.choice(long), vocabulary, rng)
        if text in seen or text in made:
            continue
        made.add(text)
        texts.append(text.replace("\t", " "))
    return texts


def mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / len(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_tsv")
    parser.add_argument("out_tsv")
    parser.add_argument("--size", type=int, default=120_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sentences = read_tsv_sentences(args.train_tsv)
    texts = make_transfer_set(sentences, args.size, args.seed)
    with open(args.out_tsv, "w", encoding="utf-8") as fh:
        fh.write("sentence\tlabel\n")
        fh.writelines(f"{t}\t-\n" for t in texts)
    print(f"{len(texts)} texts of {mean_words(texts):.1f} words on average (input: {mean_words(sentences):.1f}) -> {args.out_tsv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
