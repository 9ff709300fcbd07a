"""bench/wire.py reads VRRP advertisements and gratuitous ARPs from real tcpdump output: a pcap
written here, packet by packet, read back by the tcpdump the bench runs."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from bench.wire import Advert, Garp, read_pcap

MAC1, MAC2 = bytes.fromhex("020000000011"), bytes.fromhex("020000000012")
LB1, LB2, VIP = bytes([192, 0, 2, 11]), bytes([192, 0, 2, 12]), bytes([192, 0, 2, 100])
CLIENT, CLIENT_MAC = bytes([192, 0, 2, 30]), bytes.fromhex("020000000030")


def checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def vrrp(src_mac: bytes, src: bytes, version: int, prio: int) -> bytes:
    if version == 2:  # one address, advert_int 1 s, no authentication (RFC 3768 5.1)
        body = struct.pack("!BBBBBBH", 0x21, 51, prio, 1, 0, 1, 0) + VIP + b"\0" * 8
    else:  # RFC 5798 5.1: max advert interval in centiseconds
        body = struct.pack("!BBBBHH", 0x31, 51, prio, 1, 10, 0) + VIP
    body = body[:6] + struct.pack("!H", checksum(body)) + body[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(body), 0, 0, 255, 112, 0, src,
                     bytes([224, 0, 0, 18]))  # fmt: skip
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return bytes.fromhex("01005e000012") + src_mac + b"\x08\x00" + ip + body


def arp(src_mac: bytes, op: int, sender: bytes, target: bytes, dst: bytes = b"\xff" * 6) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + src_mac + sender
    body += (b"\xff" * 6 if op == 1 else src_mac) + target
    return dst + src_mac + b"\x08\x06" + body + b"\0" * 18


def write_pcap(path: Path, packets: list[tuple[float, bytes]]) -> None:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)  # Ethernet, microseconds
    for at, frame in packets:
        sec, usec = int(at), round((at - int(at)) * 1e6)
        out += struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame
    path.write_bytes(out)


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump (make apt)")
def test_adverts_and_gratuitous_arps_come_back_with_their_times(tmp_path: Path) -> None:
    """VRRP v2 and v3 adverts with their sender, VRID and priority; a gratuitous ARP request
    and an unasked reply for the VIP with the sender's MAC; an ordinary ARP request is not
    one, nor a reply for the VIP unicast to the client that asked."""
    pcap = tmp_path / "bridge.pcap"
    write_pcap(
        pcap,
        [
            (1700000000.000100, vrrp(MAC1, LB1, 2, 254)),
            (1700000000.012345, vrrp(MAC1, LB1, 2, 0)),
            (1700000000.024000, vrrp(MAC2, LB2, 3, 253)),
            (1700000000.024100, arp(MAC2, 1, VIP, VIP)),
            (1700000000.024200, arp(MAC2, 2, VIP, VIP)),
            (1700000000.030000, arp(MAC1, 1, LB1, LB2)),  # who-has 192.0.2.12: not gratuitous
            # lb1's answer to a client's who-has for the VIP, unicast to it: not gratuitous
            (1700000000.031000, arp(MAC1, 2, VIP, CLIENT, dst=CLIENT_MAC)),
        ],
    )
    adverts, garps = read_pcap(pcap)
    assert adverts == [
        Advert(1700000000.0001, "192.0.2.11", 51, 254),
        Advert(1700000000.012345, "192.0.2.11", 51, 0),
        Advert(1700000000.024, "192.0.2.12", 51, 253),
    ]
    assert garps == [
        Garp(1700000000.0241, "02:00:00:00:00:12", "192.0.2.100"),
        Garp(1700000000.0242, "02:00:00:00:00:12", "192.0.2.100"),
    ]
