"""Shared by the serving integration tests: the tiny repository, the echo engine's expected
rows, distinct random texts and a few assertions on stock tritonclient results."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ServerProcess, make_tiny_repository, start_server

from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_config

MODELS = {"tiny-bert": 1, "tiny-mux2": 2, "tiny-mux5": 5}
ECHO = "tiny-echo"  # engine=echo: a text's row is [sum of ids, number of ids, first id after CLS]
WAIT = "tiny-echo-wait"  # echo engine, 100 ms batching delay: a burst of requests shares forward passes
ALL_MODELS = [*MODELS, ECHO]
MAX_BATCH = 16  # max_batch_size of every test model
WORDS = "good bad great awful fine poor movie film plot the a very not actors story boring fun dull witty long short gripping".split()


def build_repository(root: Path) -> Path:
    make_tiny_repository(root, MODELS, max_batch_size=MAX_BATCH)
    make_tiny_repository(root, {ECHO: 2}, engine="echo", max_batch_size=MAX_BATCH)
    make_tiny_repository(root, {WAIT: 2}, engine="echo", max_batch_size=MAX_BATCH, max_queue_delay_us=100_000)
    return root


@contextlib.contextmanager
def serving(repository: Path, log_path: Path, *extra: str, **launch: Any) -> Iterator[ServerProcess]:
    """The real server on loopback for a block; on leaving it, SIGTERM and check it exited 0."""
    server = start_server(repository, log_path, *extra, **launch)
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"server exited with {code}:\n{server.log()[-4000:]}"


def module_fixtures(name: str) -> tuple[Any, Any]:
    """A test module's ``repository`` and ``server`` fixtures: one server per module."""

    @pytest.fixture(scope="module")
    def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return build_repository(tmp_path_factory.mktemp(f"{name}-repo"))

    @pytest.fixture(scope="module")
    def server(repository: Path) -> Iterator[ServerProcess]:
        with serving(repository, repository.parent / f"{name}-server.log") as proc:
            yield proc

    return repository, server


class Echo:
    """Expected echo rows of texts, from the echo model's own tokenizer."""

    def __init__(self, repository: Path, model: str = ECHO) -> None:
        folder = repository / model / "1"
        self.tokenizer = TextTokenizer(folder / TOKENIZER_FILE, load_config(folder).max_seq_length)

    def rows(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer.encode(texts).ids
        return np.array([[sum(r), len(r), r[1]] for r in ids], dtype=np.float32)


class TextSource:
    """Distinct random texts: a serial number makes each one unique."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.serial = 0

    def __call__(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            self.serial += 1
            words = self.rng.choices(WORDS, k=self.rng.randint(1, 12))
            words.insert(self.rng.randrange(len(words) + 1), str(self.serial * 7919 % 100003))
            out.append(" ".join(words))
        return out


def text_array(texts: list[str]) -> np.ndarray:
    """TEXT as tritonclient wants it: an object array of bytes, shape [batch, 1]."""
    return np.array([[t.encode()] for t in texts], dtype=object)


def check_outputs(model: str, logits: np.ndarray, labels: np.ndarray, batch: int) -> None:
    """LOGITS FP32 [batch, classes], LABEL BYTES [batch, 1], the label the argmax of the logits."""
    assert logits.dtype == np.float32
    assert logits.shape == (batch, 3 if model == ECHO else 2)
    assert labels.shape == (batch, 1)
    assert np.isfinite(logits).all()
    got = [as_bytes(x) for x in labels[:, 0]]
    if model == ECHO:  # column 0 (the sum of the ids) is the largest: label of column 0
        assert got == [b"negative"] * batch
    else:
        assert got == [[b"negative", b"positive"][i] for i in logits.argmax(1)]


def as_bytes(x: bytes | str) -> bytes:
    """tritonclient gives BYTES as bytes (binary data) or str (JSON)."""
    return x if isinstance(x, bytes) else x.encode()


def check_classification(model: str, logits: np.ndarray, classes: np.ndarray, k: int) -> None:
    """Triton's classification extension: "score:index:label", best first."""
    assert classes.shape == (logits.shape[0], k)
    for row, tops in zip(logits, classes, strict=True):
        parsed = [as_bytes(t).decode().split(":") for t in tops]
        assert [row[int(p[1])] for p in parsed] == sorted(row, reverse=True)[:k]
        for score, index, label in parsed:
            assert abs(float(score) - row[int(index)]) <= 1e-5 * max(1.0, abs(row[int(index)]))
            assert label == (["negative", "positive"][int(index)] if int(index) < 2 else index)


def queue_depth(metrics: str, model: str) -> float:
    """``muxserve_queue_depth_texts`` of ``model`` in a /metrics exposition (0 when absent)."""
    for line in metrics.splitlines():
        if line.startswith("muxserve_queue_depth_texts{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def inference_count(stats: dict, model: str) -> int:
    (entry,) = [m for m in stats["model_stats"] if m["name"] == model]
    return int(entry.get("inference_count", 0))
