"""A split brain in the lab, as tests/e2e/test_lab_splitbrain.py and bench/splitbrain.py make
it: a watched pair settled for lbwatch's stand-down rule, VRRP cut between the nodes at a
chosen moment of lb1's gratuitous-ARP refreshes, and what keepalived, the track files and the
bridge said meanwhile.

The lab's keepalived.conf has ``vrrp_garp_master_refresh 5``: a MASTER repeats its gratuitous
ARP every 5 s anyway, which brings a stranded client back within 5 s whatever lbwatch does.
So the cut comes ``LEAD`` before one of lb1's refreshes, as a capture on the bridge times them:
lb2's gratuitous ARPs as the new MASTER then come after that refresh (the client follows lb2),
and lb1's next refresh comes at least 2.5 s after lb2 would stand down. Whatever brings the
client back to lb1 before that refresh is not keepalived's.
"""

from __future__ import annotations

import time

from bench import wire
from lbwatch import trackfile
from lbwatch.cluster.standdown import STABLE
from tests.lab.netlab import VIP, Lab, Node, notify_toml
from tests.util import wait_for

REFRESH = 5.0  # the lab's vrrp_garp_master_refresh
# lb2 becomes MASTER 2.01 to 3.01 s after the cut (classic profile: three advertisements of
# 1 s and the skew at priority 253, from lb1's last one): after a refresh LEAD after the cut.
LEAD = 1.8
RESOLVE_OFF = "\n[cluster]\nresolve_split_brain = false\n"  # lbwatch_extra: today's behaviour


def transitions(node: Node, after: float) -> list[tuple[float, str]]:
    """keepalived's transitions on ``node`` after ``after`` (wall time, state), from its own
    notify hooks (``write_configs(transitions_log=True)``)."""
    out = []
    for line in node.transitions_path.read_text().splitlines():
        at, _, state = line.partition(" ")
        if float(at) > after:
            out.append((float(at), state.strip()))
    return out


def entered(node: Node, state: str, after: float) -> float | None:
    """When keepalived on ``node`` first entered ``state`` after ``after``."""
    return next((at for at, s in transitions(node, after) if s == state), None)


def track_value(node: Node) -> int | None:
    """VI_1's track file as keepalived reads it (None: no file, which reads as 0)."""
    return dict(trackfile.read(node.dir / "state" / "track", ["VI_1"]))["VI_1"]


def vrrp_state(node: Node) -> str:
    """VI_1's VRRP state as ``node``'s agent last heard it from keepalived."""
    doc = node.status()
    inst = doc.vrrp.get("VI_1") if doc is not None else None
    return inst.state if inst is not None else "unknown"


def mac_of(node: Node) -> str:
    words = node.run("ip", "-o", "link", "show", "dev", "eth0").split()
    return words[words.index("link/ether") + 1]


def garps(cap: wire.Capture, node: Node, after: float) -> list[float]:
    """When ``node``'s gratuitous ARPs for the VIP crossed the bridge, after ``after``."""
    mac = mac_of(node)
    return [g.at for g in cap.read()[1] if g.mac == mac and g.addr == VIP and g.at > after]


def _serving(node: Node) -> bool:
    doc = node.status()
    return doc is not None and doc.ready and all(v.running for v in doc.services.values())


def settled_pair(lab: Lab, extra: str = "") -> tuple[Node, Node]:
    """Both nodes syncing, so watching each other (the peer link), keepalived reporting to
    lbwatch's FIFO and to its own transition hooks, alerts mailed to the lab's SMTP server;
    returned once lb1 is MASTER, lb2 BACKUP, and both agents have run, and watched each other,
    for ``standdown.STABLE``: the terms of a stand-down are then settled on both.
    ``extra``: more of lbwatch's config, the same on both nodes."""
    lab.start_smtp_sink()
    lab.enable_sync()
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    for node in (lb1, lb2):
        node.write_configs(sync=True, keepalived_notify="fifo", lbwatch_extra=notify_toml() + extra,
                           transitions_log=True)  # fmt: skip
        node.start_lbwatch()
    wait_for(lambda: _serving(lb1) and _serving(lb2), 30, what="both nodes serving")
    wait_for(lambda: vrrp_state(lb1) == "MASTER" and vrrp_state(lb2) == "BACKUP", 20,
             what="lb1 MASTER, lb2 BACKUP")  # fmt: skip

    def settled_since() -> float | None:
        d1, d2 = lb1.doc(), lb2.doc()
        if d1.cluster is None or d2.cluster is None:
            return None
        ups = [d1.cluster.peers.get("lb2"), d2.cluster.peers.get("lb1")]
        if any(p is None or p.state != "up" for p in ups):
            return None
        return max(d1.agent.create_time, d2.agent.create_time, *(p.since for p in ups if p))

    def settled() -> bool:
        since = settled_since()
        return since is not None and time.time() - since > STABLE + 0.5

    wait_for(settled, STABLE + 20, what=f"both agents up and watching each other for {STABLE:g} s")
    assert lb1.has_vip() and not lb2.has_vip()
    return lb1, lb2


def cut_before_refresh(lab: Lab, cap: wire.Capture) -> tuple[float, float, float]:
    """Cut VRRP ``LEAD`` before one of lb1's refreshes, as ``cap`` times them. Returns (the
    cut, lb1's last refresh seen before it, the refresh the cut comes before, predicted)."""
    lb1 = lab.nodes["lb1"]
    # One sent from now on: an ANNOUNCE of lbwatch's before it (a round before) is off the
    # refreshes' beat.
    since = time.time()
    wait_for(lambda: garps(cap, lb1, since), REFRESH + 3, interval=0.1,
             what="a refresh of lb1's on the wire")  # fmt: skip
    last = garps(cap, lb1, since)[-1]
    refresh = last + REFRESH
    while refresh - LEAD < time.time() + 0.2:
        refresh += REFRESH
    wait_for(lambda: time.time() >= refresh - LEAD, 2 * REFRESH, interval=0.005,
             what="the moment to cut")  # fmt: skip
    lab.set_vrrp(False)
    return time.time(), last, refresh
