"""Hearing VRRP on the wire (``vrrpwire``): the parser on hand-built packets, and the listener
on a real veth pair in a network namespace of this test's own, hearing an advertisement sent
from the other end and ignoring one from its own address."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lbwatch.vrrpwire import parse
from tests import vethns
from tests.conftest import needs


def checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def advert(src: str, vrid: int, version: int = 2, kind: int = 1, proto: int = 112) -> bytes:
    """An IPv4 VRRP packet as keepalived sends one, 20 + 12 bytes (the IP header's checksum
    right: the kernel drops a packet without it)."""
    body = bytes([version << 4 | kind, vrid, 254, 1, 0, 1, 0, 0]) + socket.inet_aton(VIP_ADDR)
    head = [0x45, 0, 20 + len(body), 0, 0, 255, proto, 0]
    addrs = socket.inet_aton(src) + socket.inet_aton("224.0.0.18")
    first = struct.pack("!BBHHHBBH", *head) + addrs
    head[7] = checksum(first)
    return struct.pack("!BBHHHBBH", *head) + addrs + body


VIP_ADDR = "192.0.2.100"


def test_parse_takes_advertisements_only() -> None:
    """v2 and v3 advertisements give (source, vrid); anything else is None."""
    assert parse(advert("192.0.2.12", 51)) == ("192.0.2.12", 51)
    assert parse(advert("192.0.2.12", 52, version=3)) == ("192.0.2.12", 52)
    assert parse(advert("192.0.2.12", 51, kind=2)) is None  # not an advertisement
    assert parse(advert("192.0.2.12", 51, version=1)) is None
    assert parse(advert("192.0.2.12", 51, proto=6)) is None
    assert parse(b"\x45" + b"\0" * 10) is None  # cut short
    assert parse(b"") is None


NS = f"lbwv{os.getpid()}"

LISTEN = """
import sys, time
from lbwatch.loop import Selector
from lbwatch.vrrpwire import Listener
sel = Selector()
heard = []
lst = Listener(sel, {51: "VI_1"}, {"va"}, lambda: heard.append(1))
print("ready", flush=True)
deadline = time.monotonic() + 5
while not heard and time.monotonic() < deadline:
    for cb in sel.wait(0.1):
        cb()
print(sorted(lst.heard), flush=True)
lst.close()
"""

SEND = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from tests.test_vrrpwire import advert
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("vb", 0))
mac = bytes.fromhex(open("/sys/class/net/vb/address").read().strip().replace(":", ""))
dst = bytes.fromhex("01005e000012")  # 224.0.0.18's multicast MAC
for src in sys.argv[2:]:
    s.send(dst + mac + b"\\x08\\x00" + advert(src, 51))
"""


def ns(*argv: str) -> subprocess.CompletedProcess[str]:
    return vethns.run(NS, *argv)


@pytest.fixture
def veth() -> Iterator[None]:
    with vethns.veth(NS, "va", "vb", "192.0.2.161"):
        yield


@needs("ip")
def test_the_listener_hears_another_node_not_itself(veth: None) -> None:
    """An advertisement from the listener's own address is not heard (sent first); one from
    another node for the same virtual router is (the positive control)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    listen = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", LISTEN],
                              stdout=subprocess.PIPE, text=True, cwd=root)  # fmt: skip
    try:
        assert listen.stdout is not None and listen.stdout.readline().strip() == "ready"
        ns(sys.executable, "-c", SEND, root, "192.0.2.161")  # its own: ignored
        ns(sys.executable, "-c", SEND, root, "192.0.2.162")
        out, _ = listen.communicate(timeout=10)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.communicate()
    assert out.strip() == "['VI_1']"


@needs("ip")
def test_its_own_advertisement_alone_is_not_heard(veth: None) -> None:
    """The control of the above: only its own address sends; nothing is heard in 5 s."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    listen = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", LISTEN],
                              stdout=subprocess.PIPE, text=True, cwd=root)  # fmt: skip
    try:
        assert listen.stdout is not None and listen.stdout.readline().strip() == "ready"
        ns(sys.executable, "-c", SEND, root, "192.0.2.161")
        out, _ = listen.communicate(timeout=10)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.communicate()
    assert out.strip() == "[]"
