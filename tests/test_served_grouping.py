"""benchmarks/served_grouping.py: it replays the scheduler's batch choice on a saturated queue."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from muxserve.serving.scheduler import choose_batch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports its neighbour compare_models
_spec = importlib.util.spec_from_file_location("served_grouping", BENCHMARKS / "served_grouping.py")
served_grouping = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(served_grouping)


@pytest.mark.parametrize("policy", served_grouping.POLICIES)
def test_every_text_served_once_in_batches_of_cap(policy: str) -> None:
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(103)]
    arrival = list(range(103))
    rng.shuffle(arrival)
    batches = served_grouping.served_batches(lengths, arrival, 16, policy)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 103 % 16
    if policy == "arrival":
        assert [i for b in batches for i in b] == arrival
    first = batches[0]
    if policy == "length_aware_sorted":
        assert [lengths[i] for i in first] == sorted(lengths[i] for i in first)
    if policy == "length_aware":
        # the scheduler's own choice on the full queue, kept in arrival order
        window = arrival[:64]
        assert first == [window[j] for j in choose_batch([lengths[i] for i in window], [False] * 64, 16, True)]
        assert first != sorted(first, key=lambda i: lengths[i])  # not sorted by length
