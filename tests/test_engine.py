"""The engine: eager, compiled and TorchScript give the same logits as served, short groups included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from muxtiny import random_batch, save_tiny, tiny_model

from muxserve.model.export import export_torchscript
from muxserve.serving.engine import Engine, EngineOptions


def rows_of(n_texts: int, length: int, seed: int) -> list[list[int]]:
    ids, mask = random_batch(n_texts, length, torch.Generator().manual_seed(seed))
    return [r[: int(m.sum())].tolist() for r, m in zip(ids, mask, strict=True)]


@pytest.mark.parametrize("policy", ["copy", "pad"])
def test_torchscript_engine_fills_short_groups_by_the_models_policy(tmp_path, policy: str) -> None:
    """7 texts at N=5: the last group is short; both engines fill it as the model says."""
    folder = save_tiny(tiny_model(num_instances=5, short_group_policy=policy), tmp_path / "m")
    export_torchscript(folder, seq_len=16)
    eager = Engine.load(folder, EngineOptions(kind="eager", precision="fp32", threads=1))
    traced = Engine.load(folder, EngineOptions(kind="torchscript", precision="fp32", threads=1))
    try:
        rows = rows_of(7, 14, seed=1)
        got, want = traced.infer(rows), eager.infer(rows)
        assert got.shape == want.shape == (7, 2)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    finally:
        eager.close()
        traced.close()


def test_compiled_engine_serves_the_eager_logits_at_every_batch_shape(tmp_path) -> None:
    """torch.compile'd predict: the eager engine's logits for passes of one mux group, of
    several with a short last group, and at lengths it was not compiled at."""
    folder = save_tiny(tiny_model(num_instances=2, short_group_policy="copy"), tmp_path / "m")
    eager = Engine.load(folder, EngineOptions(kind="eager", precision="fp32", threads=1))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = Engine.load(folder, EngineOptions(kind="compiled", precision="fp32", threads=1, instances=2))
    try:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # dynamo captured it
        for seed, (texts, length) in enumerate([(1, 5), (2, 14), (7, 30), (16, 9), (3, 32)]):
            rows = rows_of(texts, length, seed=seed)
            got, want = compiled.infer(rows), eager.infer(rows)
            assert got.shape == want.shape == (texts, 2)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        batches = [rows_of(texts, 20, seed=10 + texts) for texts in (4, 6, 10, 12)]
        for got, rows in zip(compiled.infer_all(batches), batches, strict=True):  # instances side by side
            np.testing.assert_allclose(got, eager.infer(rows), atol=1e-4, rtol=0)
    finally:
        eager.close()
        compiled.close()


def test_group_padding_mask_makes_served_logits_independent_of_the_batch(tmp_path) -> None:
    """With mask_group_padding a group's logits as served do not change when a longer group
    joins its batch (the engine pads the batch to a longer bucket)."""
    folder = save_tiny(tiny_model(num_instances=2, mask_group_padding=True), tmp_path / "m")
    engine = Engine.load(folder, EngineOptions(kind="eager", precision="fp32", threads=1))
    try:
        short = rows_of(2, 6, seed=2)
        long = rows_of(2, 30, seed=3)
        long[0] = long[0] + [5] * (30 - len(long[0]))  # make sure the batch reaches a longer bucket
        alone, batched = engine.infer(short), engine.infer(short + long)
        np.testing.assert_allclose(batched[:2], alone, atol=1e-5, rtol=0)
    finally:
        engine.close()
