"""CUDA graphs' buckets: every pass padded to its bucket (more groups of empty texts, more
padding) gives the eager engine's logits. Checked without graphs (``capture=False``), which
runs the very padded pass a graph replays; the capture itself needs a GPU
(``benchmarks/gpu_check.py`` checks its parity there)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from muxtiny import random_batch, save_tiny, tiny_model

from muxserve.serving.engine import Engine, EngineOptions
from muxserve.serving.graphs import GraphedForward, graphed_forward, graphs_supported, group_buckets, length_buckets


def rows_of(n_texts: int, length: int, seed: int) -> list[list[int]]:
    ids, mask = random_batch(n_texts, length, torch.Generator().manual_seed(seed))
    return [r[: int(m.sum())].tolist() for r, m in zip(ids, mask, strict=True)]


def test_buckets_cover_every_pass_up_to_the_cap() -> None:
    assert group_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert group_buckets(33) == [1, 2, 4, 8, 16, 32, 33]
    assert group_buckets(1) == [1]
    assert length_buckets(64) == [16, 32, 48, 64]
    assert length_buckets(100) == [16, 32, 48, 64, 96, 100]


@pytest.mark.parametrize(("n", "policy"), [(1, "copy"), (2, "copy"), (5, "copy"), (5, "pad")])
def test_a_pass_padded_to_its_bucket_gives_the_eager_logits(tmp_path, n: int, policy: str) -> None:
    """Passes of one text, of a short last group, of many groups, at short and at full length,
    one after another through the same buckets (each pass must clear what the last one left)."""
    folder = save_tiny(tiny_model(num_instances=n, short_group_policy=policy, mask_group_padding=True), tmp_path / "m")
    engine = Engine.load(folder, EngineOptions(kind="eager", precision="fp32", threads=1))
    try:
        graphed = GraphedForward(engine.forward_fn.__self__, max_texts=12 * n, capture=False)
        assert graphed.groups == [1, 2, 4, 8, 12] and graphed.lengths == [16, 32]
        shapes = [(12 * n, 32), (1, 5), (n + 2, 14), (3 * n, 30), (2, 9), (12 * n - 1, 20), (1, 32)]
        for seed, (texts, length) in enumerate(shapes):
            rows = rows_of(texts, length, seed=seed)
            ids, mask = engine.pad(rows)
            assert graphed.bucket_for(texts, ids.shape[1]) is not None
            got = graphed(ids, mask).numpy()
            np.testing.assert_allclose(got, engine.infer(rows), atol=1e-5, rtol=0)
        # larger than the largest bucket: the eager pass
        rows = rows_of(12 * n + 1, 10, seed=99)
        assert graphed.bucket_for(len(rows), 16) is None
        np.testing.assert_allclose(graphed(*engine.pad(rows)).numpy(), engine.infer(rows), atol=1e-6, rtol=0)
    finally:
        engine.close()


def test_models_whose_logits_depend_on_the_padding_are_not_graphed() -> None:
    """A mux model without mask_group_padding (the reference's) reads its batch's padding."""
    assert graphs_supported(tiny_model(num_instances=1))
    assert graphs_supported(tiny_model(num_instances=2, mask_group_padding=True))
    unmasked = tiny_model(num_instances=2, mask_group_padding=False)
    assert not graphs_supported(unmasked)
    assert graphed_forward(unmasked) is None


def test_cuda_graphs_asked_for_on_a_cpu_are_an_error(tmp_path) -> None:
    folder = save_tiny(tiny_model(num_instances=2), tmp_path / "m")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Engine.load(folder, EngineOptions(kind="eager", precision="fp32", threads=1, cuda_graphs=True))
    engine = Engine.load(folder, EngineOptions(kind="eager", precision="fp32", threads=1))  # automatic: none on a CPU
    try:
        assert not isinstance(engine.forward_fn, GraphedForward)
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_replay_the_eager_logits_on_cuda(tmp_path) -> None:
    folder = save_tiny(tiny_model(num_instances=5, mask_group_padding=True), tmp_path / "m")
    graphed = Engine.load(folder, EngineOptions(device="cuda", kind="eager", precision="fp32", max_texts=40))
    eager = Engine.load(folder, EngineOptions(device="cuda", kind="eager", precision="fp32", cuda_graphs=False))
    try:
        assert isinstance(graphed.forward_fn, GraphedForward)
        for seed, (texts, length) in enumerate([(40, 30), (1, 5), (7, 14), (23, 32)]):
            rows = rows_of(texts, length, seed=seed)
            np.testing.assert_allclose(graphed.infer(rows), eager.infer(rows), atol=1e-4, rtol=0)
            # as served: launched from the event loop, its end awaited on an engine thread
            np.testing.assert_allclose(asyncio.run(graphed.run(rows)), eager.infer(rows), atol=1e-4, rtol=0)
    finally:
        graphed.close()
        eager.close()
