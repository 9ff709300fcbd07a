"""VRRP advertisements and gratuitous ARPs on the lab's bridge, captured by tcpdump: when each
crossed the wire, by the host's wall clock (every lab namespace shares it, so the times compare
with the bench's own and with lbwatch's log). keepalived's own log and notify hooks say when it
decided; the capture says when the peer and the client could know.

tcpdump runs in the switch namespace on br0, which sees what is flooded to every port: VRRP
(multicast to 224.0.0.18) and ARP broadcasts, not the client's unicast HTTP.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.lab.netlab import Lab

# tcpdump -n -tt -e, one line a packet, e.g.
# 1732712345.123456 0a:..:01 > 01:00:5e:00:00:12, ethertype IPv4 (0x0800), length 54: 192.0.2.11
#   > 224.0.0.18: VRRPv2, Advertisement, vrid 51, prio 0, authtype none, intvl 1s, length 20
_VRRP = re.compile(
    r"^(?P<at>\d+\.\d+) (?P<mac>\S+) > .*?: (?P<src>[\d.]+) > 224\.0\.0\.18: "
    r"VRRPv\d, Advertisement, vrid (?P<vrid>\d+), prio (?P<prio>\d+)"
)
# A gratuitous ARP is broadcast and names the same address as sender and target (a request),
# or announces it unasked (a reply); tcpdump shows a request's non-zero target MAC in
# parentheses. A reply to a client's request for the VIP is unicast to that client: no GARP.
_GARP = re.compile(
    r"^(?P<at>\d+\.\d+) (?P<mac>\S+) > ff:ff:ff:ff:ff:ff, ethertype ARP .*?: "
    r"(?:Request who-has (?P<who>[\d.]+)(?: \([^)]*\))? tell (?P<tell>[\d.]+)|"
    r"Reply (?P<reply>[\d.]+) is-at)"
)


@dataclass(frozen=True)
class Advert:
    at: float
    src: str  # the sender's IPv4 address
    vrid: int
    prio: int


@dataclass(frozen=True)
class Garp:
    at: float
    mac: str  # the sender's Ethernet address
    addr: str


def parse(text: str) -> tuple[list[Advert], list[Garp]]:
    adverts, garps = [], []
    for line in text.splitlines():
        if m := _VRRP.match(line):
            adverts.append(Advert(float(m["at"]), m["src"], int(m["vrid"]), int(m["prio"])))
        elif (m := _GARP.match(line)) and (m["reply"] or m["who"] == m["tell"]):
            garps.append(Garp(float(m["at"]), m["mac"], m["reply"] or m["who"]))
    return adverts, garps


class Capture:
    """``with Capture(lab, path) as cap``: tcpdump writes VRRP and ARP on the lab's bridge to
    ``path`` (each packet flushed at once, -U) until the block ends; ``cap.read()`` parses what
    it has so far."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.lab = lab
        self.path = path
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Capture:
        argv = ["tcpdump", "-i", "br0", "-n", "-U", "-w", str(self.path)]
        argv += ["--time-stamp-precision=micro", "vrrp or arp"]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns("sw"), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        said = self.proc.stderr.readline()  # "listening on br0, ...", or why not (then EOF)
        if "listening on" not in said:
            self.__exit__()
            raise RuntimeError(f"tcpdump on the lab's bridge: {said.strip() or 'no output'}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def read(self) -> tuple[list[Advert], list[Garp]]:
        return read_pcap(self.path)


def read_pcap(path: Path) -> tuple[list[Advert], list[Garp]]:
    # The last packet may be half-written while tcpdump runs: tcpdump -r then says
    # "truncated dump file" on stderr and still prints the rest.
    out = subprocess.run(
        ["tcpdump", "-r", str(path), "-n", "-tt", "-e"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return parse(out.stdout)


def available() -> bool:
    return shutil.which("tcpdump") is not None
