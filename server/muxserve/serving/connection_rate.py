"""A limit on the new connections each client address may open a second.

A client that opens a connection for every request, or one that opens connections and resets
them as fast as it can (a disconnect storm), costs the frontend an accept, a transport and a
read per connection whatever it sends: at a couple of thousand a second that is most of a core
taken from everyone else. Each address gets a token bucket: ``burst`` connections at once, then
``per_second``; a connection past it is answered 429 and closed as soon as it is accepted,
before anything it sent is read. Clients that keep their connections alive (every load
generator, tritonclient, curl within one invocation, browsers) open a few and never come near it.

IPv6 clients are counted by their /64 (one host usually holds a whole /64), IPv4 ones, and IPv4
clients seen through a dual-stack socket, by their address. The buckets of the least recently
seen addresses are forgotten past ``MAX_ADDRESSES`` (a forgotten bucket is full again), so
memory stays bounded whatever the number of addresses.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

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


class ConnectionRate:
    """Token buckets of new connections, one per client address (``client_key``)."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = float(max(1, burst))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address: (tokens, when counted); least recent first
        self.refused = 0
        self._logged = (-LOG_EVERY_S, 0)  # (when, refused then): one warning per LOG_EVERY_S at most

    def admit(self, peername: Any) -> bool:
        """Whether a connection just accepted from ``peername`` may stay open (takes a token)."""
        key = client_key(peername)
        if key is None:
            return False  # gone already: nothing to serve, no address to count
        now = self.clock()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_second)
        admitted = tokens >= 1.0
        if admitted:
            tokens -= 1.0
        else:
            self.refused += 1
            if now - self._logged[0] >= LOG_EVERY_S:
                log.warning("refused %d new connections (latest from %s): more than %g a second from one address after a burst of %d (--client-connection-rate, --client-connection-burst)", self.refused - self._logged[1], key, self.per_second, self.burst)
                self._logged = (now, self.refused)
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > MAX_ADDRESSES:
            del self._buckets[next(iter(self._buckets))]
        return admitted
