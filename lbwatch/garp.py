"""Gratuitous ARP for a VIP this node holds: after a split brain ends, the node that kept the
VIP tells the segment its MAC at once, so that clients that learnt the other node's MAC come
back now, not at keepalived's next ``vrrp_garp_master_refresh`` (if any: keepalived's default
is none, and a MASTER that stayed MASTER sends no gratuitous ARP of its own).

One ARP request per VIP, sender and target address the VIP, from the interface that holds it
(RFC 5227 2.4's ARP Announcement), on an AF_PACKET socket (root: CAP_NET_RAW). IPv6 VIPs are
left to keepalived (an unsolicited neighbour advertisement would need ICMPv6 here).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import psutil

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def interface_of(address: str) -> str | None:
    """The interface this node holds ``address`` on, or None."""
    for name, infos in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in infos):
            return name
    return None


def frame(mac: bytes, address: str) -> bytes:
    """An ARP Announcement of ``address`` from ``mac``, in its Ethernet frame."""
    ip = ipaddress.IPv4Address(address).packed
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def announce(vips: tuple[str, ...], repeat: int = 2) -> list[str]:
    """Send the announcements; what was sent, one line each (a VIP not held here: skipped)."""
    done = []
    for vip in vips:
        try:
            ipaddress.IPv4Address(vip)
        except ValueError:
            done.append(f"{vip}: not IPv4, left to keepalived")
            continue
        name = interface_of(vip)
        if name is None:
            done.append(f"{vip}: not on this node's interfaces, not announced")
            continue
        text = Path(f"/sys/class/net/{name}/address").read_text()
        mac = bytes.fromhex(text.strip().replace(":", ""))
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
            s.bind((name, 0))
            for _ in range(repeat):
                s.send(frame(mac, vip))
        done.append(f"{vip} on {name}")
    return done
