"""Holding back refusals from a connection that keeps sending messages that are not protobuf.

A client built on a gRPC library never sends what its own library could not have encoded, so a
connection that sends several such messages is broken or hostile. Refusing one costs the
frontend a whole gRPC call, and a flood of them, each sent the moment the last was refused,
takes CPU from everyone else. After ``FREE_MALFORMED`` from one peer (a connection: gRPC names it
by address and port), each further refusal waits ``PENALTY_S`` before it goes out: a client that
waits for its answers then sends a few a second per stream, and one that does not runs into its
connection's stream limit (``--max-concurrent-streams``). A waiting refusal costs only a sleeping
coroutine.
"""

from __future__ import annotations

from collections import OrderedDict

FREE_MALFORMED = 8
PENALTY_S = 1.0
MAX_PEERS = 4096  # peers remembered, least recent forgotten first


class MalformedPenalty:
    def __init__(self) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()

    def delay(self, peer: str) -> float:
        """Seconds to hold the refusal of ``peer``'s latest malformed message."""
        count = self._counts.pop(peer, 0) + 1
        self._counts[peer] = count
        if len(self._counts) > MAX_PEERS:
            self._counts.popitem(last=False)
        return PENALTY_S if count > FREE_MALFORMED else 0.0
