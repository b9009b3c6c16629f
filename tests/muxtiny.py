"""Tiny MUX-BERT models, tokenizers and model repositories for fast unit tests.

Imported by the model / weights / training / export / bench tests (pytest puts ``tests/`` on
``sys.path``). Everything here runs in milliseconds on one CPU thread.
"""

from __future__ import annotations

from pathlib import Path

import torch

from muxserve.model.muxbert import MuxBertConfig, MuxBertModel
from muxserve.model.weights import TOKENIZER_FILE, save_model

# ids of the special tokens of the tiny WordLevel tokenizer below
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
TINY_VOCAB = 200
WORDS = ["good", "bad", "great", "awful", "fine", "poor", "movie", "film", "plot", "the", "a", "very", "not", "actors", "story", "boring", "fun"]


def tiny_config(**overrides) -> MuxBertConfig:
    base = dict(
        vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, max_seq_length=32, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
    )
    base.update(overrides)
    return MuxBertConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> MuxBertModel:
    """A randomly initialised tiny model in eval mode (weights seeded by ``seed``)."""
    torch.manual_seed(seed)
    return MuxBertModel(tiny_config(**overrides)).eval()


def random_batch(texts: int, length: int, gen: torch.Generator | None = None, vocab: int = TINY_VOCAB, min_len: int = 3, cls: int = CLS, sep: int = SEP) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [CLS] w... [SEP] rows of random lengths in [min_len, length]; (ids, mask) [T, L]."""
    gen = gen or torch.Generator().manual_seed(0)
    ids = torch.full((texts, length), PAD, dtype=torch.long)
    mask = torch.zeros((texts, length), dtype=torch.long)
    lens = torch.randint(min_len, length + 1, (texts,), generator=gen)
    for i, n in enumerate(lens.tolist()):
        ids[i, :n] = torch.randint(10, vocab, (n,), generator=gen)
        ids[i, 0], ids[i, n - 1] = cls, sep
        mask[i, :n] = 1
    return ids, mask


def write_wordlevel_tokenizer(path: str | Path, words: list[str] = WORDS) -> Path:
    """A tokenizer.json: WordLevel over ``words``, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4,
    lowercase + whitespace split, and a post-processor that adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def save_tiny(model: MuxBertModel, directory: str | Path, tokenizer_file: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Save ``model`` with a tokenizer (the tiny WordLevel one unless given)."""
    directory = Path(directory)
    if tokenizer_file is None:
        tokenizer_file = write_wordlevel_tokenizer(directory / TOKENIZER_FILE)
    return save_model(model, directory, dtype, tokenizer_file)


def make_repository(root: str | Path, models: dict[str, MuxBertModel], version: int = 1) -> Path:
    """A Triton-layout repository: ``root/<name>/config.pbtxt`` + ``root/<name>/<version>/``."""
    root = Path(root)
    for name, model in models.items():
        folder = root / name
        save_tiny(model, folder / str(version))
        (folder / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n')
    return root
