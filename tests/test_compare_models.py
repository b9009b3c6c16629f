"""benchmarks/compare_models.py: the paired sign test and the per-grouping bookkeeping."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("compare_models", Path(__file__).resolve().parents[1] / "benchmarks" / "compare_models.py")
compare_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_models)


def test_sign_test_exact_values() -> None:
    assert compare_models.sign_test(0, 0) == 1.0
    assert compare_models.sign_test(10, 0) == pytest.approx(2 / 1024)
    assert compare_models.sign_test(3, 7) == compare_models.sign_test(7, 3)
    # 5 of 10: as balanced as it gets
    assert compare_models.sign_test(5, 5) == 1.0
    # P(X <= 2) for Binomial(10, 1/2) = 56/1024, two-sided 112/1024
    assert compare_models.sign_test(2, 8) == pytest.approx(112 / 1024)


def test_compare_counts_majority_right_sentences() -> None:
    # 3 groupings x 4 sentences; A right on sentences 0, 1; B right on 1, 2, 3 (by majority)
    a = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    result = compare_models.compare(a, b)
    assert result["majority_accuracy_a"] == 0.5 and result["majority_accuracy_b"] == 0.75
    assert result["b_right_a_wrong"] == 2 and result["a_right_b_wrong"] == 1
    assert result["accuracy_per_grouping_a"] == [0.5, 0.75, 0.25]
    assert result["mean_accuracy_b"] == pytest.approx(8 / 12, abs=1e-4)
    assert result["sign_test_p"] == 1.0


def test_per_pass_test_counts_groupings_right_per_sentence() -> None:
    """B right in all 3 groupings of 10 sentences, A in 2 of 3: the majority vote cannot tell
    them apart, the per-pass count can (the accuracy a single pass serves)."""
    a = torch.tensor([[1] * 10, [1] * 10, [0] * 10], dtype=torch.bool)
    b = torch.ones(3, 10, dtype=torch.bool)
    result = compare_models.compare(a, b)
    assert result["b_right_a_wrong"] == result["a_right_b_wrong"] == 0 and result["sign_test_p"] == 1.0
    assert result["b_more_groupings_right"] == 10 and result["a_more_groupings_right"] == 0
    assert result["sign_test_p_per_pass"] == 0.00195  # 2/1024 to three significant digits
    # the earlier example: counts A 2,3,0,1 and B 1,2,3,2 per sentence -> 2 each way
    a = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    result = compare_models.compare(a, b)
    assert (result["b_more_groupings_right"], result["a_more_groupings_right"], result["sign_test_p_per_pass"]) == (2, 2, 1.0)


def test_by_length_splits_accuracy_by_words_and_skips_empty_bins() -> None:
    """Sentences of 3, 12 and 40 words: each lands in its own bin, with A's and B's mean over the
    groupings of that sentence alone; bins without sentences are left out."""
    texts = [" ".join(["w"] * 3), " ".join(["w"] * 12), " ".join(["w"] * 40)]
    a = torch.tensor([[1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    result = compare_models.by_length(a, b, texts)
    assert list(result) == ["0-9", "10-14", "30+"]
    assert result["0-9"] == {"n": 1, "accuracy_a": 1.0, "accuracy_b": 0.5}
    assert result["10-14"] == {"n": 1, "accuracy_a": 0.0, "accuracy_b": 1.0}
    assert result["30+"] == {"n": 1, "accuracy_a": 0.5, "accuracy_b": 1.0}
