"""Hearing VRRP on the wire: whether advertisements from another node for a virtual router
reach this node. A split brain's stand-down (``cluster.standdown``) ends when they do again:
VRRP between the nodes works, and keepalived, back from FAULT, takes the BACKUP role itself.

A raw IPv4 socket for protocol 112 (root: CAP_NET_RAW), a member of VRRP's group 224.0.0.18
on each interface an instance runs on (RFC 5798 5.1.1.2), so the kernel delivers the group's
packets here whatever keepalived does meanwhile (an instance in FAULT may have left the
group); unicast advertisements (``unicast_peer``) are delivered here as to any raw socket.
Open only while some instance stands down: at idle nothing is read. An advertisement from one
of this node's own addresses is not another node's. VRRP over IPv6 is not heard (the
stand-down then ends when the rival stops serving or cannot be asked).

Who can reach it: anyone on the segment can send a packet that reads as an advertisement for a
virtual router (VRRPv2's authentication is no protection either). The worst it does here is
end a stand-down early: the node goes back to VRRP, which is where it was before lbwatch
stood it down, and the split brain is declared again if it persists (at most
``standdown.MAX_STANDS`` times in ``standdown.WINDOW``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping

import psutil

from lbwatch.loop import Selector

log = logging.getLogger(__name__)

PROTO_VRRP = 112
GROUP = "224.0.0.18"
ADVERTISEMENT = 1
MAX_READS = 64  # packets read per wake-up, at most


def parse(packet: bytes) -> tuple[str, int] | None:
    """(source address, virtual router id) of an IPv4 VRRP advertisement, or None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if packet[9] != PROTO_VRRP or len(packet) < ihl + 8:
        return None
    version_type, vrid = packet[ihl], packet[ihl + 1]
    if version_type & 0x0F != ADVERTISEMENT or version_type >> 4 not in (2, 3):
        return None
    return socket.inet_ntoa(packet[12:16]), vrid


class Listener:
    """``routers``: virtual router id -> the instance it is; ``interfaces``: where to join the
    group. ``heard[instance]``: when another node's advertisement for it last arrived
    (``clock``); ``news`` is called after each read that heard one."""

    def __init__(
        self,
        selector: Selector,
        routers: Mapping[int, str],
        interfaces: set[str],
        news: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routers = dict(routers)
        self.news = news
        self.clock = clock
        self.heard: dict[str, float] = {}
        self.own = {
            a.address
            for infos in psutil.net_if_addrs().values()
            for a in infos
            if a.family == socket.AF_INET
        }
        self._sel = selector
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, PROTO_VRRP)
        try:
            self._sock.setblocking(False)
            for name in sorted(interfaces):
                with contextlib.suppress(OSError):  # an interface gone: the others still count
                    index = socket.if_nametoindex(name)
                    mreq = struct.pack("4s4si", socket.inet_aton(GROUP), b"\0" * 4, index)
                    self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            selector.add(self._sock.fileno(), self._on_readable)
        except BaseException:
            self._sock.close()
            raise

    def _on_readable(self) -> None:
        heard = False
        for _ in range(MAX_READS):
            try:
                packet = self._sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("VRRP listener: %s", exc)
                break
            got = parse(packet)
            if got is None or got[0] in self.own or got[1] not in self.routers:
                continue
            self.heard[self.routers[got[1]]] = self.clock()
            heard = True
        if heard:
            self.news()

    def close(self) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.remove(self._sock.fileno())
        self._sock.close()
