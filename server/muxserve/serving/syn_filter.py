"""New connections from blocked client addresses dropped by the kernel, before the server sees them.

A client that opens connections many times faster than its address is allowed
(``connection_rate``) still costs the frontend an accept, a socket and a close for each one it
is refused: at thousands a second, a good part of a core. Once an address is that far over its
limit, a classic BPF socket filter on the listening sockets drops its SYNs: the kernel answers
nothing, the client's connect waits on its own retransmissions, and the frontend does no work
at all. Classic BPF (``SO_ATTACH_FILTER``) needs no privilege and no map: the program is the
list of blocked addresses, rebuilt and swapped in whole (atomically) whenever the list changes.
It looks at SYNs only, so the connections an address already has are never touched, and the
connections accepted from a listener (which inherit its filter) pay three instructions per
packet.

IPv4 addresses are matched whole, IPv6 ones by their /64 (``connection_rate.client_key``).
The gRPC port's listening sockets belong to gRPC's C core; ``listening_sockets`` finds them
among the process's file descriptors by their port, so they get the same filter.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("muxserve")

SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
TCP_SAVE_SYN, TCP_SAVED_SYN = 27, 28  # Linux, <linux/tcp.h>
SKF_NET_OFF = -0x100000  # load relative to the IP header (a TCP socket's filter starts at the TCP header)
TCP_FLAGS = 13  # offset of the flags byte in the TCP header
TCP_SYN = 0x02
MAX_BLOCKED = 512  # addresses in one program: 5 instructions each at most, classic BPF allows 4096

# classic BPF opcodes (<linux/filter.h>)
LD_W_ABS, LD_B_ABS = 0x20, 0x30
ALU_RSH_K = 0x74
JA, JEQ_K, JSET_K = 0x05, 0x15, 0x45
RET_K = 0x06
ACCEPT, DROP = 0xFFFFFFFF, 0


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def syn_filter_program(keys: Iterable[str]) -> bytes:
    """A classic BPF program that drops the SYNs from ``keys`` (IPv4 addresses, IPv6 /64
    networks, as ``client_key`` writes them) and lets every other packet through."""
    v4: list[int] = []
    v6: list[tuple[int, int]] = []
    for key in keys:
        if "/" in key:
            high = int(ipaddress.IPv6Network(key).network_address) >> 64
            v6.append((high >> 32, high & 0xFFFFFFFF))
        else:
            v4.append(int(ipaddress.IPv4Address(key)))
    v4_section = [_insn(LD_W_ABS, 0, 0, SKF_NET_OFF + 12)]  # IPv4 source address
    for address in v4:
        v4_section += [_insn(JEQ_K, 0, 1, address), _insn(RET_K, 0, 0, DROP)]
    v4_section.append(_insn(RET_K, 0, 0, ACCEPT))
    v6_section = []
    for high, low in v6:  # IPv6 source address, its first 64 bits as two words
        v6_section += [_insn(LD_W_ABS, 0, 0, SKF_NET_OFF + 8), _insn(JEQ_K, 0, 3, high), _insn(LD_W_ABS, 0, 0, SKF_NET_OFF + 12), _insn(JEQ_K, 0, 1, low), _insn(RET_K, 0, 0, DROP)]
    v6_section.append(_insn(RET_K, 0, 0, ACCEPT))
    head = [
        _insn(LD_B_ABS, 0, 0, TCP_FLAGS),
        _insn(JSET_K, 1, 0, TCP_SYN),
        _insn(RET_K, 0, 0, ACCEPT),  # not a SYN: a connection already made, or its handshake's end
        _insn(LD_B_ABS, 0, 0, SKF_NET_OFF),
        _insn(ALU_RSH_K, 0, 0, 4),  # the IP version
        _insn(JEQ_K, 0, 1, 4),
        _insn(JA, 0, 0, 3),  # to the IPv4 section
        _insn(JEQ_K, 0, 1, 6),
        _insn(JA, 0, 0, 1 + len(v4_section)),  # to the IPv6 section
        _insn(RET_K, 0, 0, ACCEPT),
    ]
    return b"".join(head + v4_section + v6_section)


def attach(sock: socket.socket, program: bytes) -> None:
    """Make ``program`` the socket filter of ``sock`` (replacing any before it, atomically)."""
    code = ctypes.create_string_buffer(program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(program) // 8, ctypes.addressof(code)))


def save_syns(listener: socket.socket) -> None:
    """Have the kernel keep each new connection's SYN (``TCP_SAVE_SYN``), for ``saved_syn_source``."""
    with contextlib.suppress(OSError):
        listener.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)


def saved_syn_source(sock: Any) -> tuple[str, int] | None:
    """The source address of the SYN that opened ``sock`` (accepted from a ``save_syns``
    listener), as a peername: a connection its client reset before the server took it up has
    no peer name any more, and this is how its address is still counted."""
    if sock is None:
        return None
    try:
        syn = sock.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, 512)
    except OSError:
        return None
    if len(syn) >= 20 and syn[0] >> 4 == 4:
        return (socket.inet_ntop(socket.AF_INET, syn[12:16]), 0)
    if len(syn) >= 40 and syn[0] >> 4 == 6:
        return (socket.inet_ntop(socket.AF_INET6, syn[8:24]), 0)
    return None


def listening_sockets(port: int) -> list[socket.socket]:
    """This process's listening TCP sockets on ``port`` (each a duplicate of the descriptor,
    sharing the socket): how the gRPC listeners, which gRPC's C core opens, are found."""
    inodes: dict[str, int] = {}  # socket inode: a descriptor of it (every link read before any is duplicated)
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed since
        if link.startswith("socket:"):
            inodes.setdefault(link, int(name))
    found = []
    for fd in inodes.values():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and sock.getsockname()[1] == port:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found


class SynBlocklist:
    """Client addresses whose SYNs the listening sockets drop, each for a while."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []
        self._blocked: dict[str, asyncio.TimerHandle] = {}  # address: the timer that unblocks it
        self.enabled = sys.platform.startswith("linux")

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """Filter these listening sockets too (from now on, and with what is blocked now)."""
        for sock in sockets:
            self._sockets.append(sock)
            self._install([sock])

    def is_blocked(self, key: str) -> bool:
        return key in self._blocked

    def block(self, key: str, seconds: float) -> bool:
        """Drop ``key``'s new connections for ``seconds`` (called on the event loop); False when
        it cannot be (MAX_BLOCKED addresses are blocked already: it is reset connection by
        connection meanwhile)."""
        if key in self._blocked or len(self._blocked) >= MAX_BLOCKED:
            return False
        self._blocked[key] = asyncio.get_running_loop().call_later(seconds, self._unblock, key)
        self._install(self._sockets)
        return self.enabled

    def _unblock(self, key: str) -> None:
        if self._blocked.pop(key, None) is not None:
            self._install(self._sockets)

    def _install(self, sockets: list[socket.socket]) -> None:
        if not self.enabled or not sockets:
            return
        program = syn_filter_program(self._blocked)
        for sock in sockets:
            try:
                attach(sock, program)
            except OSError as exc:  # no socket filters here: refusals stay in user space (429)
                log.warning("cannot filter new connections in the kernel (%s): an address past its connection rate keeps getting 429", exc)
                self.enabled = False
                return
