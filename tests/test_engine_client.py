"""A frontend's engine client: a request cancelled by its caller is counted exactly once, by
whichever side knows its fate."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from muxserve.serving import ipc
from muxserve.serving.dataplane import FailureCount
from muxserve.serving.engine_client import EngineClient
from muxserve.serving.types import RequestOptions

MODEL = SimpleNamespace(name="m", version="1")


class RecordingEngine:
    """What a FailureCount reports failures to: the counts the frontend adds."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def count_failure(self, model: Any, reason: str, seconds: float) -> None:
        self.failures.append(reason)

    async def report_failure(self, model: Any, reason: str, seconds: float) -> None:
        self.failures.append(reason)


def _client() -> tuple[EngineClient, list[Any]]:
    """A connected client whose messages to the engine are recorded, not sent."""
    client, sent = EngineClient("inproc://unused"), []
    client._channel = SimpleNamespace(send=lambda peer, message: sent.append(message))
    client.connected = True
    return client, sent


async def _request(client: EngineClient, counts: RecordingEngine) -> None:
    """One request as the data plane makes it: failures counted by FailureCount."""
    async with FailureCount(counts, MODEL, 0.0):
        await client.infer(MODEL, "", [[101, 102]], 0.0, 0.0, RequestOptions())


async def _settle() -> None:
    for _ in range(3):  # FailureCount reports a cancellation from a task of its own
        await asyncio.sleep(0)


async def test_a_cancel_while_queued_is_sent_to_the_engine_which_counts_it():
    client, sent = _client()
    counts = RecordingEngine()
    task = asyncio.ensure_future(_request(client, counts))
    await asyncio.sleep(0)
    (infer,) = sent
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await _settle()
    assert [type(m) for m in sent] == [ipc.Infer, ipc.Cancel] and sent[1].id == infer.id
    assert counts.failures == []  # the engine counts it when it drops the texts
    assert client.pending == 0


async def test_a_cancel_that_arrives_after_the_answer_is_not_counted_again():
    """The engine counted the request as answered when it sent the result; the caller's
    cancellation lands before the waiting task resumes: no Cancel, and no second count."""
    client, sent = _client()
    counts = RecordingEngine()
    task = asyncio.ensure_future(_request(client, counts))
    await asyncio.sleep(0)
    (infer,) = sent
    logits = np.zeros((1, 2), dtype=np.float32)
    client._handle(b"", [ipc.Result(infer.id, logits.tobytes(), 2, [1], "1")])
    task.cancel()  # the same loop iteration: the task has not seen its answer
    await asyncio.gather(task, return_exceptions=True)
    await _settle()
    assert task.cancelled()
    assert [type(m) for m in sent] == [ipc.Infer]
    assert counts.failures == []


async def test_an_answer_that_arrives_after_the_cancel_is_not_counted_again():
    """The caller's cancellation lands first (the waiting future is cancelled), the engine's
    answer in the same loop iteration, before the task resumes: the engine counted it."""
    client, sent = _client()
    counts = RecordingEngine()
    task = asyncio.ensure_future(_request(client, counts))
    await asyncio.sleep(0)
    (infer,) = sent
    task.cancel()
    logits = np.zeros((1, 2), dtype=np.float32)
    client._handle(b"", [ipc.Result(infer.id, logits.tobytes(), 2, [1], "1")])
    await asyncio.gather(task, return_exceptions=True)
    await _settle()
    assert task.cancelled() and counts.failures == []
    assert client._answered_late == {}


@pytest.mark.parametrize(("kind", "counted", "frontend_counts"), [("ModelNotFound", False, ["cancelled"]), ("QueueFull", True, [])])
async def test_a_cancel_after_an_error_is_counted_once(kind: str, counted: bool, frontend_counts: list[str]):
    """An error the engine did not count (say, the version was unloaded since the frontend
    looked) is the frontend's to count, once, as cancelled; one the engine counted (the queue
    was full) is not counted again."""
    client, sent = _client()
    counts = RecordingEngine()
    task = asyncio.ensure_future(_request(client, counts))
    await asyncio.sleep(0)
    (infer,) = sent
    client._handle(b"", [ipc.Error(infer.id, kind, "refused", counted)])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await _settle()
    assert counts.failures == frontend_counts
