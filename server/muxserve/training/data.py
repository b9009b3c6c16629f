"""Datasets for training and evaluation: TSV files with a header, ``sentence<TAB>label``."""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[int]  # indices into the label names


def read_tsv(path: str | Path, label_names: Sequence[str] | None = None, limit: int | None = None) -> LabeledTexts:
    """Read ``sentence<TAB>label`` rows; labels may be integers or names (matched to ``label_names``)."""
    texts: list[str] = []
    raw: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or len(header) < 2:
            raise ValueError(f"{path}: expected a header 'sentence<TAB>label'")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{lineno}: expected 2 tab-separated columns, got {len(row)}")
            texts.append(row[0])
            raw.append(row[1].strip())
            if limit is not None and len(texts) >= limit:
                break
    return LabeledTexts(texts, [_label_index(v, label_names, path) for v in raw])


def _label_index(value: str, names: Sequence[str] | None, path: str | Path) -> int:
    if value.lstrip("-").isdigit():
        index = int(value)
        if names is not None and not 0 <= index < len(names):
            raise ValueError(f"{path}: label {index} out of range for {list(names)}")
        return index
    if names is None or value not in names:
        raise ValueError(f"{path}: label {value!r} is not one of {list(names or [])}")
    return list(names).index(value)


def label_names_of(path: str | Path) -> list[str]:
    """Label names in a file: sorted names, or '0'..'K-1' for integer labels."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        values = {row[1].strip() for row in reader if len(row) >= 2}
    if all(v.isdigit() for v in values):
        return [str(i) for i in range(max(int(v) for v in values) + 1)]
    return sorted(values)


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """Unlabeled text for priming / MLM: the sentence column of each TSV."""
    texts: list[str] = []
    for p in paths:
        texts.extend(read_tsv_sentences(p))
    return texts


def read_tsv_sentences(path: str | Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [row[0] for row in reader if row]


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, chunk_batches: int = 50) -> Iterator[list[int]]:
    """One epoch of shuffled batches; within chunks of ``chunk_batches`` batches, texts of similar
    length share a batch (less padding) while the order across batches stays random."""
    for batch in group_bucketed_batches(lengths, batch_size, 1, rng, chunk_batches):
        # shuffle within the batch so that mux groups mix texts at random (of similar lengths)
        rng.shuffle(batch)
        yield batch


def group_bucketed_batches(lengths: Sequence[int], batch_size: int, group_size: int, rng: random.Random, chunk_batches: int = 50) -> Iterator[list[int]]:
    """One epoch of batches of mux groups whose members are drawn at random, whatever their
    lengths (as at evaluation and serving time, where a group mixes a long and a short text);
    only whole groups are bucketed by their longest member, to keep the padding between groups low.
    Consecutive ``group_size`` indices of a batch form one group."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    groups = [order[i : i + group_size] for i in range(0, len(order) - len(order) % group_size, group_size)]
    per_batch = max(1, batch_size // group_size)
    batches: list[list[int]] = []
    chunk = per_batch * chunk_batches
    for start in range(0, len(groups), chunk):
        part = sorted(groups[start : start + chunk], key=lambda g: max(lengths[i] for i in g))
        batches.extend([i for g in part[j : j + per_batch] for i in g] for j in range(0, len(part), per_batch))
    rng.shuffle(batches)
    yield from batches
