"""WordPiece tokenization with the Rust ``tokenizers`` library, from the model's tokenizer.json.

BERT's pipeline (``BertNormalizer``, ``BertPreTokenizer``, ``WordPiece``) on plain ASCII text
comes down to: lowercase, split into runs of letters and digits and single punctuation marks,
and look each word's pieces up. ``WordPieces`` does exactly that, with each distinct word's
pieces computed once by the Rust model and remembered, which is several times cheaper than a
full pass through the library per text (most of its time goes to alignment bookkeeping that
serving does not use). Any text outside that case (non-ASCII, control characters, a special
token's text) goes through the library, as does every text of any other tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

if TYPE_CHECKING:  # the server's frontends tokenize without loading torch
    import torch

# ASCII control characters that BertNormalizer removes or maps (the fast path leaves them to it)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# BertPreTokenizer on ASCII: whitespace separates, every punctuation mark is a word of its own
_PUNCTUATION = re.escape(string.punctuation)
_WORDS = re.compile(rf"[^\s{_PUNCTUATION}]+|[{_PUNCTUATION}]")
MAX_REMEMBERED_WORDS = 200_000


@dataclass
class Encoded:
    ids: list[list[int]]  # [CLS] ... [SEP], unpadded
    truncated: list[bool]


class WordPieces:
    """The ids of an ASCII text as BERT's tokenizer gives them, from remembered word pieces.
    ``None`` for a text it cannot vouch for (the caller then asks the library)."""

    def __init__(self, tok: Tokenizer, lowercase: bool) -> None:
        self._model = tok.model
        self._lowercase = lowercase
        self._pieces: dict[str, list[int]] = {}
        special = sorted({t.content.lower() for t in tok.get_added_tokens_decoder().values()} - {""})
        # a text holding a special token's text (as the library matches it: case aside) is not ours
        self._special = re.compile("|".join(map(re.escape, special))) if special else None
        probe = tok.encode("a").ids  # the post-processor's tokens around one piece
        core = [t.id for t in self._model.tokenize("a")]
        at = next(i for i in range(len(probe)) if probe[i : i + len(core)] == core)
        self._prefix, self._suffix = probe[:at], probe[at + len(core) :]

    @classmethod
    def for_file(cls, path: Path, tok: Tokenizer) -> WordPieces | None:
        """The fast path for this tokenizer.json, if its pipeline is BERT's."""
        spec = json.loads(path.read_text())
        normalizer, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if normalizer.get("type") != "BertNormalizer" or not normalizer.get("clean_text", True) or pre.get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece":
            return None
        return cls(tok, bool(normalizer.get("lowercase", True)))

    def ids(self, text: str) -> list[int] | None:
        if not text.isascii() or _CONTROL.search(text) is not None:
            return None
        lowered = text.lower()
        if self._special is not None and self._special.search(lowered) is not None:
            return None
        words = _WORDS.findall(lowered if self._lowercase else text)
        pieces = self._pieces
        try:
            found = [pieces[w] for w in words]
        except KeyError:
            found = [pieces.get(w) or self._learn(w) for w in words]
        return [*self._prefix, *chain.from_iterable(found), *self._suffix]

    def _learn(self, word: str) -> list[int]:
        ids = [t.id for t in self._model.tokenize(word)]
        if len(self._pieces) < MAX_REMEMBERED_WORDS:
            self._pieces[word] = ids
        return ids


class TextTokenizer:
    def __init__(self, path: str | Path, max_length: int) -> None:
        self.path = Path(path)
        self.max_length = max_length
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        # truncate ourselves so that we can tell the caller a text was cut
        self._tok.no_truncation()
        self.pad_id = self._tok.token_to_id("[PAD]") or 0
        self.sep_id = self._tok.token_to_id("[SEP]")
        self._fast = WordPieces.for_file(self.path, self._tok)

    def digest(self) -> str:
        """Identity of the tokenizer (its file's bytes): models that share it share token ids."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, texts: list[str]) -> Encoded:
        fast = self._fast
        rows = [fast.ids(t) for t in texts] if fast is not None else [None] * len(texts)
        slow = [i for i, row in enumerate(rows) if row is None]
        if slow:
            for i, enc in zip(slow, self._tok.encode_batch([texts[i] for i in slow], add_special_tokens=True), strict=True):
                rows[i] = enc.ids
        ids, truncated = [], []
        for row in rows:
            if len(row) > self.max_length:
                row = row[: self.max_length - 1] + [self.sep_id]
                truncated.append(True)
            else:
                truncated.append(False)
            ids.append(row)
        return Encoded(ids, truncated)

    def pad(self, rows: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad rows to ``length`` (default: the longest) -> (ids, mask) int64 [T, L]."""
        import torch

        length = length or max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def __call__(self, texts: list[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.encode(texts).ids, length)
