"""Epoch batching of the trainer: every text once per epoch, little padding, and (for
``--mixed-length-groups``) mux groups whose members are drawn regardless of their lengths."""

from __future__ import annotations

import random

from muxserve.training.data import group_bucketed_batches, length_bucketed_batches


def lengths_of(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(2, 60) for _ in range(count)]


def padded_tokens(batches: list[list[int]], lengths: list[int], n: int) -> int:
    """Tokens the encoder runs on: each group is as long as its batch's longest text."""
    return sum(len(b) // n * max(lengths[i] for i in b) for b in batches)


def spread_in_groups(batches: list[list[int]], lengths: list[int], n: int) -> float:
    """Mean (longest - shortest) member within a mux group."""
    groups = [b[i : i + n] for b in batches for i in range(0, len(b), n)]
    return sum(max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in groups) / len(groups)


def test_length_bucketed_covers_every_text_once_with_similar_lengths() -> None:
    lengths = lengths_of(4000)
    batches = list(length_bucketed_batches(lengths, 40, random.Random(1)))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(4000))
    assert spread_in_groups(batches, lengths, 5) < 3  # neighbours in a batch have near-equal lengths


def test_mixed_groups_draw_members_at_random_but_bucket_whole_groups() -> None:
    lengths, n = lengths_of(4000), 5
    batches = list(group_bucketed_batches(lengths, 40, n, random.Random(1)))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(4000))  # 4000 divides by n: nothing dropped
    assert all(len(b) % n == 0 for b in batches)
    # members of a group span lengths as random draws do (uniform 2..60: E[max-min of 5] ~ 39)
    assert spread_in_groups(batches, lengths, n) > 25
    # yet batches group long groups with long groups: far less padding than a random batching
    rng = random.Random(2)
    shuffled = list(range(4000))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i : i + 40] for i in range(0, 4000, 40)]
    assert padded_tokens(batches, lengths, n) < 0.9 * padded_tokens(random_batches, lengths, n)


def test_mixed_groups_repeat_by_seed_and_differ_across_seeds() -> None:
    lengths = lengths_of(300)
    first = list(group_bucketed_batches(lengths, 20, 2, random.Random(5)))
    assert first == list(group_bucketed_batches(lengths, 20, 2, random.Random(5)))
    assert first != list(group_bucketed_batches(lengths, 20, 2, random.Random(6)))
