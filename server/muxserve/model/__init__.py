"""MUX-BERT model code; stands on its own (imports nothing from the server)."""

from __future__ import annotations

from typing import Any

__all__ = ["MuxBertConfig", "MuxBertModel"]


def __getattr__(name: str) -> Any:
    # lazily: the server's frontends use the tokenizer of this package without loading torch
    if name in __all__:
        from muxserve.model import muxbert

        return getattr(muxbert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
