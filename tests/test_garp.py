"""Gratuitous ARP (``garp``) on a real veth pair in a network namespace of this test's own:
the frame a capture on the other end receives is an ARP Announcement of the VIP from the
holding interface's MAC."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lbwatch import garp
from tests import vethns
from tests.conftest import needs

pytestmark = needs("ip")
NS = f"lbwg{os.getpid()}"
VIP = "192.0.2.150"

CAPTURE = """
import socket, sys, select
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("gb", 0))
print("ready", flush=True)
r, _, _ = select.select([s], [], [], 5)
print(s.recv(2048).hex() if r else "none", flush=True)
"""


def ns(*argv: str) -> subprocess.CompletedProcess[str]:
    return vethns.run(NS, *argv)


@pytest.fixture
def veth() -> Iterator[None]:
    with vethns.veth(NS, "ga", "gb", VIP):
        yield


def test_the_announcement_leaves_the_holding_interface(veth: None) -> None:
    """Captured on the other end: broadcast, ARP, sender and target the VIP, from ga's MAC;
    a VIP not held here is skipped (the control: nothing sent for it)."""
    mac = ns("cat", "/sys/class/net/ga/address").stdout.strip()
    cap = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", CAPTURE],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
        code = f"from lbwatch import garp; print(garp.announce(('{VIP}', '192.0.2.151'), 1))"
        sent = ns(sys.executable, "-c", code).stdout
        assert f"{VIP} on ga" in sent and "192.0.2.151: not on this node's interfaces" in sent
        got = bytes.fromhex(cap.stdout.readline().strip())
    finally:
        cap.kill()
        cap.communicate()
    want = garp.frame(bytes.fromhex(mac.replace(":", "")), VIP)
    assert got[: len(want)] == want
    assert got[:6] == b"\xff" * 6 and got[12:14] == b"\x08\x06"
    assert got[28:32] == got[38:42] == bytes([192, 0, 2, 150])  # sender = target = the VIP
