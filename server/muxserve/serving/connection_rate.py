"""A limit on the new connections each client address may open a second.

A client that opens a connection for every request, or one that opens connections and resets
them as fast as it can (a disconnect storm), costs the frontend an accept, a transport and a
read per connection whatever it sends: at a couple of thousand a second that is most of a core
taken from everyone else. Each address gets a token bucket: ``burst`` connections at once, then
``per_second``; a connection past it is answered 429 and closed as soon as it is accepted,
before anything it sent is read. Clients that keep their connections alive (every load
generator, tritonclient, curl within one invocation, browsers) open a few and never come near it.

An address far over its limit (refused more than ``burst`` connections beyond what ``per_second``
refills: sending at over twice its rate) is blocked for ``block_s``: its SYNs are dropped by the
kernel (``syn_filter``), so its connections cost the frontend nothing at all, and those already
waiting to be accepted are reset without an answer. Just over its limit, a client still gets
429, and learns why.

IPv6 clients are counted by their /64 (one host usually holds a whole /64), IPv4 ones, and IPv4
clients seen through a dual-stack socket, by their address. The buckets of the least recently
seen addresses are forgotten past ``MAX_ADDRESSES`` (a forgotten bucket is full again), so
memory stays bounded whatever the number of addresses.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from muxserve.serving.syn_filter import saved_syn_source

if TYPE_CHECKING:
    from muxserve.serving.syn_filter import SynBlocklist

log = logging.getLogger("muxserve")

MAX_ADDRESSES = 65536
LOG_EVERY_S = 10.0


def client_key(peername: Any) -> str | None:
    """The address a connection's peer is counted under (``peername`` as a transport gives
    it); None when there is no peer address: the client reset the connection before it was made."""
    if not isinstance(peername, tuple | list) or not peername:
        return None
    host = str(peername[0])
    if ":" not in host:
        return host
    address = ipaddress.IPv6Address(host.split("%", 1)[0])
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class Verdict(enum.Enum):
    ADMIT = "admit"  # serve it
    REFUSE = "refuse"  # over the address's rate: 429 and close
    RESET = "reset"  # far over it, or gone already: reset, nothing written


class ThrottledCount:
    """A count logged at most once per LOG_EVERY_S: ``due(now, total)`` is how many were counted
    since the last line when a line is due now (and takes the line), else None."""

    def __init__(self) -> None:
        self._at, self._total = -LOG_EVERY_S, 0

    def due(self, now: float, total: int) -> int | None:
        if now - self._at < LOG_EVERY_S:
            return None
        since, self._at, self._total = total - self._total, now, total
        return since


class ConnectionRate:
    """Token buckets of new connections, one per client address (``client_key``)."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic, blocklist: SynBlocklist | None = None, block_s: float = 0.0) -> None:
        self.per_second = per_second
        self.burst = float(max(1, burst))
        self.clock = clock
        self.blocklist = blocklist
        self.block_s = block_s
        # address: (connections allowed, refusals allowed before the block, when counted); least recent first
        self._buckets: dict[str, tuple[float, float, float]] = {}
        self.refused = 0
        self.blocked = 0
        self._refusals_logged = ThrottledCount()
        self._blocks_logged = ThrottledCount()

    def admit(self, peername: Any, gone: bool = False) -> Verdict:
        """What to do with a connection just accepted from ``peername`` (takes a token).
        ``gone``: its client has reset it already; it is counted all the same (a storm of
        connections reset at once costs the server their accepts) and reset."""
        key = client_key(peername)
        if key is None:
            return Verdict.RESET  # gone already: nothing to serve, no address to count
        if self.blocklist is not None and self.blocklist.is_blocked(key):
            self.refused += 1
            return Verdict.RESET  # accepted before its block was in place
        now = self.clock()
        tokens, refusals, then = self._buckets.pop(key, (self.burst, self.burst, now))
        refill = max(0.0, now - then) * self.per_second
        tokens, refusals = min(self.burst, tokens + refill), min(self.burst, refusals + refill)
        verdict = Verdict.ADMIT
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            verdict = Verdict.REFUSE
            refusals -= 1.0
            self.refused += 1
            if refusals < 0.0 and self.block_s > 0 and self.blocklist is not None and self.blocklist.enabled:
                verdict = Verdict.RESET
                self._block(key, now, f"more than {self.burst:g} refused past its rate of {self.per_second:g} a second")
                tokens, refusals, now = 0.0, 0.0, now + self.block_s  # after the block: the rate, no burst
            elif (refused := self._refusals_logged.due(now, self.refused)) is not None:
                log.warning("refused %d new connections (latest from %s): more than %g a second from one address after a burst of %d (--client-connection-rate, --client-connection-burst)", refused, key, self.per_second, self.burst)
        self._buckets[key] = (tokens, refusals, now)
        if len(self._buckets) > MAX_ADDRESSES:
            del self._buckets[next(iter(self._buckets))]
        return Verdict.RESET if gone else verdict

    def block_abuser(self, peername: Any, why: str) -> bool:
        """Block the address of ``peername`` for ``block_s`` as if it were far past its rate: a
        client caught abusing a connection (``why``) would otherwise open the next one at once.
        False when blocking is off (no ``block_s`` or no socket filter)."""
        key = client_key(peername)
        if key is None or not (self.block_s > 0 and self.blocklist is not None and self.blocklist.enabled):
            return False
        now = self.clock()
        self._block(key, now, why)
        self._buckets.pop(key, None)
        self._buckets[key] = (0.0, 0.0, now + self.block_s)  # after the block: the rate, no burst
        if len(self._buckets) > MAX_ADDRESSES:
            del self._buckets[next(iter(self._buckets))]
        return True

    def _block(self, key: str, now: float, why: str) -> None:
        assert self.blocklist is not None
        if self.blocklist.block(key, self.block_s):
            self.blocked += 1
            if (blocks := self._blocks_logged.due(now, self.blocked)) is not None:
                log.warning("blocking new connections from %s for %g s (%d blocks since the last line): %s (--client-connection-block-s)", key, self.block_s, blocks, why)

    def admit_transport(self, transport: Any) -> Verdict:
        """``admit`` for a connection just made; one its client reset already is counted by
        the address of its SYN."""
        peer = transport.get_extra_info("peername")
        if peer is None:
            return self.admit(saved_syn_source(transport.get_extra_info("socket")), gone=True)
        return self.admit(peer)


def reset(transport: Any) -> None:
    """Close a connection with a reset (SO_LINGER 0): nothing more is sent or kept."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
