"""Accuracy of a model on labeled texts, and the forward-pass throughput benchmark."""

from __future__ import annotations

import time
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
        logits = model.predict_ensemble(ids, mask, gen) if ensemble else model(ids, mask)
        out.append(logits.float().cpu())
    return torch.cat(out)


def accuracy(model: MuxBertModel, tokenizer: TextTokenizer, data: LabeledTexts, batch_texts: int = 256, ensemble: bool = False) -> dict:
    was_training = model.training
    model.eval()
    logits = predict(model, tokenizer, data.texts, batch_texts, ensemble)
    model.train(was_training)
    pred = logits.argmax(-1)
    correct = int((pred == torch.tensor(data.labels)).sum())
    return {"accuracy": correct / max(1, len(data.labels)), "n": len(data.labels), "correct": correct}


@dataclass
class ForwardThroughput:
    texts_per_s: float
    seconds: float
    texts: int


@torch.no_grad()
def forward_throughput(model: MuxBertModel, batch_texts: int, seq_len: int, min_seconds: float = 3.0, warmup: int = 2, vocab_low: int = 1000, vocab_high: int = 20000, min_runs: int = 3) -> ForwardThroughput:
    """Texts/s of the forward pass alone at a fixed batch of texts and sequence length.

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
        model(ids, mask)
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        model(ids, mask)
        sync()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and runs >= min_runs:
            break
    return ForwardThroughput(runs * batch_texts / elapsed, elapsed, runs * batch_texts)
