"""The frontend-engine wire: messages batched into frames, and the frame interval."""

from __future__ import annotations

import asyncio
import itertools

import zmq

from muxserve.serving import ipc

_addresses = (f"inproc://ipc-test-{i}" for i in itertools.count())


async def _pair(min_interval_s: float) -> tuple[ipc.Channel, ipc.Channel, asyncio.Queue]:
    """(a frontend's channel with this frame interval, the engine's, the frames it receives)"""
    frames: asyncio.Queue = asyncio.Queue()
    address = next(_addresses)
    router = ipc.socket(zmq.ROUTER)
    router.bind(address)
    dealer = ipc.socket(zmq.DEALER)
    dealer.connect(address)
    engine = ipc.Channel(router, lambda peer, messages: frames.put_nowait(messages))
    return ipc.Channel(dealer, lambda peer, messages: None, min_interval_s=min_interval_s), engine, frames


async def test_messages_of_one_iteration_share_a_frame():
    channel, engine, frames = await _pair(0.0)
    for i in range(3):
        channel.send(b"", ipc.Cancel(i))
    assert [m.id for m in await frames.get()] == [0, 1, 2]
    channel.send(b"", ipc.Cancel(3))
    assert [m.id for m in await frames.get()] == [3]
    channel.close()
    engine.close()


async def test_frame_interval_gathers_messages_of_several_iterations():
    """With an interval, the first message goes out at once; those queued in the following
    loop iterations wait for the interval and travel together."""
    channel, engine, frames = await _pair(1.0)
    channel.send(b"", ipc.Cancel(0))
    assert [m.id for m in await frames.get()] == [0]
    for i in (1, 2, 3):
        await asyncio.sleep(0)  # one message per loop iteration, as gRPC requests arrive
        channel.send(b"", ipc.Cancel(i))
    assert [m.id for m in await frames.get()] == [1, 2, 3]
    channel.close()
    engine.close()
