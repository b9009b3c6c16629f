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


async def _cancelled(answer: ipc.Result | ipc.Error | None = None, answer_first: bool = True) -> tuple[EngineClient, list[Any], RecordingEngine, asyncio.Task]:
    """One request sent to the engine, then cancelled by its caller; ``answer`` (its id filled
    in), if given, reaches the client in the same loop iteration as the cancellation, before or
    after it, so the waiting task sees neither first. Returns once everything has settled."""
    client, sent = _client()
    counts = RecordingEngine()
    task = asyncio.ensure_future(_request(client, counts))
    await asyncio.sleep(0)
    (infer,) = sent
    if answer is not None and answer_first:
        answer.id = infer.id
        client._handle(b"", [answer])
    task.cancel()
    if answer is not None and not answer_first:
        answer.id = infer.id
        client._handle(b"", [answer])
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(3):  # FailureCount reports a cancellation from a task of its own
        await asyncio.sleep(0)
    return client, sent, counts, task


def _result() -> ipc.Result:
    return ipc.Result(0, np.zeros((1, 2), dtype=np.float32).tobytes(), 2, [1], "1")


async def test_a_cancel_while_queued_is_sent_to_the_engine_which_counts_it():
    client, sent, counts, _ = await _cancelled()
    assert [type(m) for m in sent] == [ipc.Infer, ipc.Cancel] and sent[1].id == sent[0].id
    assert counts.failures == []  # the engine counts it when it drops the texts
    assert client.pending == 0


@pytest.mark.parametrize("answer_first", [True, False], ids=["answer-then-cancel", "cancel-then-answer"])
async def test_a_cancel_that_meets_the_answer_is_not_counted_again(answer_first: bool):
    """The engine counted the request as answered when it sent the result; the caller's
    cancellation and the answer meet before the waiting task resumes, in either order: no
    second count (and no Cancel for an answered request)."""
    client, sent, counts, task = await _cancelled(_result(), answer_first)
    assert task.cancelled() and counts.failures == []
    assert sent[-1].id == sent[0].id and client._answered_late == {}


@pytest.mark.parametrize(("kind", "counted", "frontend_counts"), [("ModelNotFound", False, ["cancelled"]), ("QueueFull", True, [])])
async def test_a_cancel_after_an_error_is_counted_once(kind: str, counted: bool, frontend_counts: list[str]):
    """An error the engine did not count (say, the version was unloaded since the frontend
    looked) is the frontend's to count, once, as cancelled; one the engine counted (the queue
    was full) is not counted again."""
    _, _, counts, _ = await _cancelled(ipc.Error(0, kind, "refused", counted))
    assert counts.failures == frontend_counts
