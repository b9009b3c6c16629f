"""WordPiece tokenization with the Rust ``tokenizers`` library, from the model's tokenizer.json."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

if TYPE_CHECKING:  # the server's frontends tokenize without loading torch
    import torch


@dataclass
class Encoded:
    ids: list[list[int]]  # [CLS] ... [SEP], unpadded
    truncated: list[bool]


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

    def digest(self) -> str:
        """Identity of the tokenizer (its file's bytes): models that share it share token ids."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, texts: list[str]) -> Encoded:
        ids, truncated = [], []
        for enc in self._tok.encode_batch(texts, add_special_tokens=True):
            row = enc.ids
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
