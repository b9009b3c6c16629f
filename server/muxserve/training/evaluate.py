"""Accuracy of a model on labeled texts, and the forward-pass throughput benchmark."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from muxserve.model.muxbert import MuxBertModel
from muxserve.model.tokenizer import TextTokenizer
from muxserve.training.data import LabeledTexts


@torch.no_grad()
def predict(model: MuxBertModel, tokenizer: TextTokenizer, texts: list[str], batch_texts: int = 256, ensemble: bool = False, seed: int = 0) -> torch.Tensor:
    """Logits [T, C] for texts in the given order; consecutive texts share a mux group."""
    n = model.config.num_instances
    batch_texts = max(n, batch_texts - batch_texts % n)
    gen = torch.Generator().manual_seed(seed)
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_texts):
        ids, mask = tokenizer(texts[start : start + batch_texts])
        ids, mask = ids.to(device), mask.to(device)
        # the serving forward (``predict``) when not ensembling: accuracy is that of what is served
        logits = model.predict_ensemble(ids, mask, gen) if ensemble else model.predict(ids, mask)
        out.append(logits.float().cpu())
    return torch.cat(out)


@contextmanager
def _eval_mode(model: MuxBertModel) -> Iterator[None]:
    """Dropout off for scoring; the caller's mode (a trainer mid-run) comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def correct_per_repeat(model: MuxBertModel, tokenizer: TextTokenizer, data: LabeledTexts, repeats: int = 1, ensemble: bool = False, batch_texts: int = 256) -> torch.Tensor:
    """[K, T] bool: text t predicted right in repeat k. A mux model's answer depends on which
    texts share its group (and, ensembled, on the random scatter), so one score is one draw:
    plain, repeat 0 groups the texts in file order and repeat k > 0 in a seeded random order;
    ensembled, every repeat is in file order with scatter seed k."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    target = torch.tensor(data.labels)
    rng = random.Random(0)
    rows = []
    # the plain model (N=1) reads each text alone: one pass stands for every grouping and seed
    draws = 1 if model.config.num_instances == 1 else repeats
    with _eval_mode(model):
        for k in range(draws):
            order = list(range(len(data.texts)))
            if k and not ensemble:
                rng.shuffle(order)
            logits = predict(model, tokenizer, [data.texts[i] for i in order], batch_texts, ensemble, seed=k)
            pred = torch.empty(len(order), dtype=torch.long)
            pred[torch.tensor(order)] = logits.argmax(-1)
            rows.append(pred == target)
    return torch.stack(rows).expand(repeats, -1)


@torch.no_grad()
def correct_in_copied_groups(model: MuxBertModel, tokenizer: TextTokenizer, data: LabeledTexts, batch_texts: int = 256) -> torch.Tensor:
    """[N, T] bool: text t predicted right from slot i of a group holding t in all N slots, i.e.
    with no partner (what a mux model loses without interference between texts)."""
    n = model.config.num_instances
    with _eval_mode(model):
        logits = predict(model, tokenizer, [t for t in data.texts for _ in range(n)], batch_texts)
    return logits.argmax(-1).view(-1, n).T == torch.tensor(data.labels)


def accuracy(model: MuxBertModel, tokenizer: TextTokenizer, data: LabeledTexts, batch_texts: int = 256, ensemble: bool = False, repeats: int = 1) -> dict:
    """Accuracy (mean over ``repeats`` draws of the grouping, see ``correct_per_repeat``)."""
    right = correct_per_repeat(model, tokenizer, data, repeats, ensemble, batch_texts)
    n = len(data.labels)
    result: dict = {"accuracy": float(right.float().mean()) if n else 0.0, "n": n}
    if repeats == 1:
        result["correct"] = int(right[0].sum())
    else:
        result.update(repeats=repeats, accuracy_per_repeat=[round(float(r.float().mean()), 4) for r in right])
    return result


@dataclass
class ForwardThroughput:
    texts_per_s: float
    seconds: float
    texts: int


@torch.no_grad()
def forward_throughput(model: MuxBertModel, batch_texts: int, seq_len: int, min_seconds: float = 3.0, warmup: int = 2, vocab_low: int = 1000, vocab_high: int = 20000, min_runs: int = 3) -> ForwardThroughput:
    """Texts/s of the serving forward pass alone (``model.predict``) at a fixed batch of texts
    and sequence length.

    Random token ids in [vocab_low, vocab_high) (clamped to the model's vocabulary), no padding.
    On CUDA the device is synchronised after the warm-up and after every forward pass, before
    the clock is read, so that the time covers the kernels and not only their launch.
    """
    model.eval()
    device = next(model.parameters()).device
    vocab_high = min(vocab_high, model.config.vocab_size)
    vocab_low = min(vocab_low, vocab_high // 2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab_low, vocab_high, (batch_texts, seq_len), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        model.predict(ids, mask)
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        model.predict(ids, mask)
        sync()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and runs >= min_runs:
            break
    return ForwardThroughput(runs * batch_texts / elapsed, elapsed, runs * batch_texts)
