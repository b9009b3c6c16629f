"""The engine: eager, compiled and TorchScript give the same logits as served, short groups included."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from muxtiny import random_batch, save_tiny, tiny_model

from muxserve.model.export import export_torchscript
from muxserve.serving.engine import Engine, EngineOptions, set_intra_op_threads

ROOT = Path(__file__).resolve().parents[1]


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


POOL_PROBE = """
import os, sys, torch
from muxserve.serving.engine import Engine, EngineOptions
from muxserve.serving.repository import resolve_model_dir

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(2)
before = threads()
engine = Engine.load(resolve_model_dir("model_repository", "sst2-mux5"), EngineOptions(kind="eager", precision="fp32", instances=1, threads=2))
loaded = threads()
engine.infer_all([engine.sample_rows(20, 32)])  # the instance's thread and its pool
print(before, loaded, threads(), torch.get_num_threads())
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not Path("/proc/self/task").is_dir(), reason="needs 2 cores and /proc")
def test_loading_a_model_makes_no_thread_pool_beside_the_instances() -> None:
    """A fresh process loads a bundled model for one 2-thread instance: the only threads the
    engine adds are the instance's and its pool's one worker (casting the weights on the loading
    thread at 2 threads made a pool there too, which halved the instance's pass rate), and the
    loading thread keeps its own thread count."""
    out = subprocess.run([sys.executable, "-c", POOL_PROBE], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    before, loaded, serving, main_threads = map(int, out)
    assert loaded == before
    assert serving == before + 2
    assert main_threads == 2


def test_an_instance_thread_keeps_its_count_when_another_thread_sets_one() -> None:
    """torch applies its process-wide thread count to a thread at the thread's first operator:
    ``set_intra_op_threads`` applies it at once, so another thread's later count does not
    replace this one's."""
    ready, changed, seen = threading.Event(), threading.Event(), []

    def instance() -> None:
        set_intra_op_threads(1)
        ready.set()
        changed.wait()
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    thread = threading.Thread(target=instance)
    thread.start()
    try:
        ready.wait()
        torch.set_num_threads(2 if before != 2 else 3)
    finally:
        changed.set()
        thread.join()
        torch.set_num_threads(before)
    assert seen == [1]
