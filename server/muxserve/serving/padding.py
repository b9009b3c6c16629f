"""The length a batch of token rows is padded to: shared by the engine (which pads) and the
scheduler (which sizes batches by the padded tokens they will cost)."""

from __future__ import annotations

LENGTH_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PAD_MULTIPLE = 8  # default granularity: little padding, still few distinct shapes


def bucket_length(length: int, max_length: int) -> int:
    """The smallest of ``LENGTH_BUCKETS`` that holds ``length`` (at most ``max_length``)."""
    for b in LENGTH_BUCKETS:
        if b >= length:
            return min(b, max_length)
    return max_length


def padded_length(length: int, max_length: int, pad_multiple: int = PAD_MULTIPLE) -> int:
    """The length a batch whose longest row has ``length`` tokens runs at: the next multiple of
    ``pad_multiple`` (0: the next of ``LENGTH_BUCKETS``), never past ``max_length``."""
    if pad_multiple <= 0:
        return bucket_length(length, max_length)
    return min(max_length, -(-max(1, length) // pad_multiple) * pad_multiple)
