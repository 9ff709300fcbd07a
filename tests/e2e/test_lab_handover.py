"""End to end: the pair decides together who holds the VIP (``lbwatch.handover``). Both lab
nodes sync, so each watches the other's node view; haproxy is frozen (SIGSTOP of its master and
workers: it keeps its sockets and answers nothing, as a hung haproxy does) and thawed by PID.

- Never release the VIP to nobody: the node holding it keeps keepalived running while its peer
  is proven unable, and lets go once the peer can take over.
- A peer that can take over still gets the VIP at once, as before.
- When the peer link proves that no node holds the VIP, keepalived starts at haproxy's first
  passing probe, without keepalived_start_delay.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime

from lbwatch.statusdoc import NodeView
from tests.e2e.test_lab import services_up
from tests.e2e.test_lab_cluster import pair
from tests.e2e.test_lab_cluster import pytestmark as cluster_marks
from tests.lab.netlab import Lab, Node
from tests.util import wait_for

pytestmark = cluster_marks

KEEPING = "keeping keepalived running and the VIP here: no peer can take VI_1"
LETTING_GO = "letting the VIP go after keeping it"
STOPPING = "stopping keepalived so the VIP moves"
HEALED = "haproxy is serving again; the VIP stayed on this node throughout"
NO_NODE_HOLDS = "no node holds VI_1, so one passing probe is enough"
# Long enough that a start of keepalived that waited for it stands apart from one at the first
# passing probe (the probe runs every 0.5 s); set for the new-master "nobody holds" test only.
START_DELAY = 6.0
# More passes than one for the probe (every 0.5 s in the lab) to call haproxy healthy again.
RISE = 3


class Timeline:
    """When each step was observed, in seconds from the start; printed at the end (or when the
    test fails, with both nodes' logs)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.steps: list[tuple[float, str]] = []

    def mark(self, what: str) -> float:
        at = time.monotonic() - self.t0
        self.steps.append((at, what))
        return at

    def __str__(self) -> str:
        return "\n".join(f"  {at:7.2f} s  {what}" for at, what in self.steps)


@contextlib.contextmanager
def recorded(lab: Lab, title: str) -> Iterator[Timeline]:
    timeline = Timeline()
    try:
        yield timeline
    except BaseException:
        for node in lab.nodes.values():
            print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")
        raise
    finally:
        print(f"{title}:\n{timeline}")


def since(node: Node, mark: int) -> str:
    return node.log_text()[mark:]


def said_at(node: Node, mark: int, text: str) -> datetime:
    """When ``node``'s lbwatch first logged a line with ``text`` after ``mark`` (the lab's
    nodes share the host's clock, so two nodes' times compare)."""
    line = next(ln for ln in since(node, mark).splitlines() if text in ln)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")


def running(node: Node, service: str) -> bool:
    """``service`` runs on ``node`` as its agent's status says."""
    doc = node.status()
    return doc is not None and service in doc.services and doc.services[service].running


def state(node: Node) -> str | None:
    """VI_1's VRRP state as ``node``'s own agent publishes it."""
    doc = node.status()
    vi = doc.vrrp.get("VI_1") if doc is not None else None
    return vi.state if vi is not None else None


def peer_view(node: Node, other: str) -> NodeView | None:
    """``other``'s view as ``node``'s cluster watch last heard it, while its watch is up."""
    doc = node.status()
    peer = doc.cluster.peers.get(other) if doc is not None and doc.cluster is not None else None
    return peer.view if peer is not None and peer.state == "up" else None


def seen_unable(node: Node, other: str) -> bool:
    """``node`` has heard that ``other``'s haproxy fails its probe and its keepalived is stopped."""
    view = peer_view(node, other)
    return view is not None and view.health == "down" and not view.keepalived.running


def settled(lb1: Node, lb2: Node) -> bool:
    """Both serve, lb1 MASTER with the VIP, lb2 BACKUP without it."""
    return (
        services_up(lb1)
        and services_up(lb2)
        and state(lb1) == "MASTER"
        and state(lb2) == "BACKUP"
        and lb1.has_vip()
        and not lb2.has_vip()
    )


class Holders:
    """Which nodes hold the VIP, sampled every few ms on a thread while it runs: the longest
    time no node held it (after one had), for the timeline."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            held = tuple(n.name for n in self.nodes if n.has_vip())
            self.samples.append((time.monotonic(), held))
            self._stop.wait(0.01)

    def __enter__(self) -> Holders:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def longest_gap(self) -> float:
        gap, start = 0.0, None
        for at, held in self.samples:
            if not held and start is None:
                start = at
            elif held and start is not None:
                gap, start = max(gap, at - start), None
        return gap


def freeze_and_stop(lab: Lab, timeline: Timeline, name: str) -> list[int]:
    """Freeze ``name``'s haproxy, which does not hold the VIP: its lbwatch stops its keepalived
    (the other node can take over), and the other node hears so. Returns the frozen PIDs."""
    node, other = lab.nodes[name], next(n for n in lab.nodes if n != name)
    mark = len(node.log_text())
    frozen = node.signal_haproxy(signal.SIGSTOP)
    timeline.mark(f"{name}'s haproxy frozen (host PIDs {frozen})")
    wait_for(lambda: not running(node, "keepalived"), 15, what=f"{name}'s keepalived stopped")
    said = since(node, mark)
    assert STOPPING in said and "keeping keepalived" not in said, said
    timeline.mark(f"{name}'s lbwatch stopped its keepalived")
    wait_for(lambda: seen_unable(lab.nodes[other], name), 10, what=f"{other} to hear it")
    timeline.mark(f"{other} heard {name} unable")
    return frozen


def test_overlapping_freezes_keep_the_vip_until_the_peer_can_take_it() -> None:
    """lb2's haproxy frozen (lb2 stops keepalived), then lb1's, which holds the VIP: lb1 keeps
    keepalived and the VIP and says so, lets them go only once lb2's haproxy is thawed and its
    keepalived runs as BACKUP, and the pair settles once lb1 is thawed too."""
    with Lab() as lab:
        _, lb1, lb2 = pair(lab, "")
        with recorded(lab, "overlapping freezes") as timeline:
            wait_for(lambda: settled(lb1, lb2), 20, what="lb1 MASTER, lb2 BACKUP")
            timeline.mark("settled: lb1 MASTER with the VIP, lb2 BACKUP")

            frozen2 = freeze_and_stop(lab, timeline, "lb2")
            assert lb1.has_vip() and not lb2.has_vip()  # the positive control: lb1 holds it

            ka1 = lb1.doc().services["keepalived"].pid
            mark = len(lb1.log_text())
            frozen1 = lb1.signal_haproxy(signal.SIGSTOP)
            timeline.mark(f"lb1's haproxy frozen (host PIDs {frozen1})")
            wait_for(lambda: KEEPING in since(lb1, mark), 15, what="lb1 keeping the VIP")
            timeline.mark("lb1 said it keeps keepalived and the VIP")
            kept = next(ln for ln in since(lb1, mark).splitlines() if KEEPING in ln)
            print(kept)
            assert "haproxy health check failing" in kept and "(lb2: haproxy not serving" in kept
            wait_for(lambda: "VIP KEPT" in lb1.doc().summary, 5, what="VIP KEPT in lb1's status")
            # Longer than a peer's view stays current (handover.CURRENT_FOR, 3 s): lb2's renewed
            # answers change nothing.
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                assert lb1.has_vip() and not lb2.has_vip()
                doc = lb1.doc()
                assert doc.services["keepalived"].running and doc.services["keepalived"].pid == ka1
                assert "VIP KEPT" in doc.summary, doc.summary
                time.sleep(0.1)
            said = since(lb1, mark)
            assert said.count(KEEPING) == 1 and STOPPING not in said, said
            timeline.mark("lb1 still held the VIP, its keepalived unchanged, 3.5 s on")

            mark2 = len(lb2.log_text())
            with Holders([lb1, lb2]) as holders:
                for pid in frozen2:
                    os.kill(pid, signal.SIGCONT)
                timeline.mark("lb2's haproxy thawed")
                wait_for(lambda: running(lb2, "keepalived"), 15, what="lb2's keepalived started")
                timeline.mark("lb2's lbwatch started its keepalived")
                wait_for(lambda: LETTING_GO in since(lb1, mark), 15, what="lb1 letting go")
                timeline.mark("lb1 said it lets the VIP go")
                wait_for(lambda: lb2.has_vip() and not lb1.has_vip(), 15, what="VIP on lb2 alone")
                timeline.mark("VIP on lb2 alone")
            go = next(ln for ln in since(lb1, mark).splitlines() if LETTING_GO in ln)
            print(go)
            assert "lb2 can take VI_1 over" in go, go
            # Let go only after lb2's keepalived ran as BACKUP, ready to take the VIP.
            backup = said_at(lb2, mark2, 'INSTANCE "VI_1" BACKUP')
            let_go = said_at(lb1, mark, LETTING_GO)
            assert backup <= let_go, (backup, let_go)
            timeline.mark(f"lb1 let go {(let_go - backup).total_seconds():.3f} s after lb2 BACKUP")
            wait_for(lambda: not running(lb1, "keepalived"), 10, what="lb1's keepalived stopped")
            gap = holders.longest_gap()
            timeline.mark(f"longest time no node held the VIP during the handover: {gap:.2f} s")

            mark = len(lb1.log_text())
            for pid in frozen1:
                os.kill(pid, signal.SIGCONT)
            timeline.mark("lb1's haproxy thawed")
            wait_for(lambda: settled(lb1, lb2), 30, what="the pair to settle")
            timeline.mark("settled: both serve, lb1 MASTER with the VIP again")
            assert "VIP KEPT" not in lb1.doc().summary
            assert KEEPING not in since(lb1, mark)


def test_a_kept_vip_stays_put_when_haproxy_heals_first() -> None:
    """Both haproxys frozen, lb1 keeping the VIP; lb1's haproxy thawed first: lb1 says that
    the VIP stayed on it throughout, and it never left lb1 nor reached lb2."""
    with Lab() as lab:
        _, lb1, lb2 = pair(lab, "")
        with recorded(lab, "kept, then healed in place") as timeline:
            wait_for(lambda: settled(lb1, lb2), 20, what="lb1 MASTER, lb2 BACKUP")
            timeline.mark("settled: lb1 MASTER with the VIP, lb2 BACKUP")
            freeze_and_stop(lab, timeline, "lb2")
            ka1 = lb1.doc().services["keepalived"].pid
            mark = len(lb1.log_text())
            with Holders([lb1, lb2]) as holders:
                frozen = lb1.signal_haproxy(signal.SIGSTOP)
                timeline.mark(f"lb1's haproxy frozen (host PIDs {frozen})")
                wait_for(lambda: KEEPING in since(lb1, mark), 15, what="lb1 keeping the VIP")
                timeline.mark("lb1 said it keeps keepalived and the VIP")
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
                timeline.mark("lb1's haproxy thawed")
                wait_for(lambda: HEALED in since(lb1, mark), 15, what="lb1 serving again")
                timeline.mark("lb1 said the VIP stayed on it throughout")
                wait_for(lambda: "VIP KEPT" not in lb1.doc().summary, 5, what="KEPT cleared")
            assert {held for _, held in holders.samples} == {("lb1",)}, "the VIP moved"
            timeline.mark(f"lb1 alone held the VIP in all {len(holders.samples)} samples")
            said = since(lb1, mark)
            assert STOPPING not in said and LETTING_GO not in said, said
            assert lb1.doc().services["keepalived"].pid == ka1
            assert state(lb1) == "MASTER"


def test_a_frozen_haproxy_lets_the_vip_go_when_the_peer_can_take_it() -> None:
    """lb1's haproxy frozen alone while lb2 serves as BACKUP: lb1 stops keepalived at once, as
    before the pair weighed its peers, and the VIP moves to lb2; nothing is kept."""
    with Lab() as lab:
        _, lb1, lb2 = pair(lab, "")
        with recorded(lab, "one frozen haproxy") as timeline:
            wait_for(lambda: settled(lb1, lb2), 20, what="lb1 MASTER, lb2 BACKUP")
            wait_for(
                lambda: (
                    (v := peer_view(lb1, "lb2")) is not None
                    and v.keepalived.running
                    and v.vrrp["VI_1"].state == "BACKUP"
                ),
                10,
                what="lb1 to hear lb2 as BACKUP",
            )
            timeline.mark("settled; lb1 hears lb2 as BACKUP")
            mark = len(lb1.log_text())
            frozen = lb1.signal_haproxy(signal.SIGSTOP)
            timeline.mark(f"lb1's haproxy frozen (host PIDs {frozen})")
            wait_for(lambda: lb2.has_vip() and not lb1.has_vip(), 15, what="VIP on lb2 alone")
            timeline.mark("VIP on lb2 alone")
            wait_for(lambda: not running(lb1, "keepalived"), 10, what="lb1's keepalived stopped")
            said = since(lb1, mark)
            assert STOPPING in said and "keeping keepalived" not in said, said
            assert "VIP KEPT" not in lb1.doc().summary

            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            timeline.mark("lb1's haproxy thawed")
            wait_for(lambda: settled(lb1, lb2), 30, what="the pair to settle")
            timeline.mark("settled: lb1 MASTER with the VIP again")


def stopped_on_both(node: Node, other: str) -> bool:
    """``node`` sees VI_1 stopped, its VIP held by none, on itself and (as heard) on ``other``."""
    doc, view = node.status(), peer_view(node, other)
    if doc is None or view is None or "VI_1" not in doc.vrrp or "VI_1" not in view.vrrp:
        return False
    mine, theirs = doc.vrrp["VI_1"], view.vrrp["VI_1"]
    return mine.state == theirs.state == "STOP" and not mine.held and not theirs.held


def nobody_holds(lab: Lab, timeline: Timeline) -> list[int]:
    """From the settled pair to no node holding VI_1: lb2's haproxy frozen (lbwatch stops its
    keepalived), then lb1's (lbwatch keeps the VIP there), then lb1's keepalived stopped by the
    operator (SIGTERM by PID: it gives the VIP up), with both haproxys still frozen. Returns
    the host PIDs of lb1's frozen haproxy."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    wait_for(lambda: settled(lb1, lb2), 20, what="lb1 MASTER, lb2 BACKUP")
    timeline.mark("settled: lb1 MASTER with the VIP, lb2 BACKUP")
    freeze_and_stop(lab, timeline, "lb2")
    mark = len(lb1.log_text())
    frozen = lb1.signal_haproxy(signal.SIGSTOP)
    timeline.mark(f"lb1's haproxy frozen (host PIDs {frozen})")
    wait_for(lambda: KEEPING in since(lb1, mark), 15, what="lb1 keeping the VIP")
    timeline.mark("lb1 said it keeps keepalived and the VIP")

    ka = lb1.doc().services["keepalived"].pid
    assert ka is not None
    os.kill(lb1.host_pid(ka), signal.SIGTERM)
    timeline.mark(f"lb1's keepalived {ka} sent SIGTERM by the operator")
    wait_for(lambda: not running(lb1, "keepalived"), 15, what="lb1's keepalived gone")
    wait_for(lambda: not lb1.has_vip(), 10, what="the VIP off lb1")
    assert not lb2.has_vip()
    wait_for(lambda: stopped_on_both(lb1, "lb2"), 10, what="lb1 to see VI_1 stopped on both")
    timeline.mark("nobody holds VI_1, as lb1 sees both nodes")
    assert "VIP KEPT" not in lb1.doc().summary
    # Not started again beside a haproxy that fails its probe.
    assert not running(lb1, "keepalived") and not running(lb2, "keepalived")
    return frozen


def keepalived_start(node: Node) -> tuple[float, str]:
    """The wall time and reason of the last start of keepalived in ``node``'s status."""
    entry = next(a for a in reversed(node.doc().recent_actions) if a.action == "start keepalived")
    return entry.at, entry.reason


def test_nobody_holding_the_vip_starts_keepalived_at_the_first_passing_probe() -> None:
    """Nobody holds VI_1 (``nobody_holds``); lb1's hung haproxy is killed and lbwatch starts a
    new one: keepalived starts at its first passing probe, well before keepalived_start_delay,
    saying that no node holds VI_1, and lb1 takes the VIP."""
    with Lab() as lab:
        _, lb1, lb2 = pair(lab, "", start_delay=START_DELAY)
        with recorded(lab, "nobody holds; a new haproxy master") as timeline:
            frozen = nobody_holds(lab, timeline)
            for pid in frozen:
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            timeline.mark("lb1's frozen haproxy killed (SIGKILL)")
            wait_for(lambda: running(lb1, "keepalived"), 15, interval=0.02, what="keepalived")
            ka_at = time.monotonic()
            timeline.mark("lb1's keepalived running")
            wait_for(lb1.has_vip, 15, interval=0.02, what="lb1 to take the VIP")
            vip_at = time.monotonic()
            timeline.mark("VIP on lb1")

            at, reason = keepalived_start(lb1)
            master_started = lb1.doc().services["haproxy"].started
            assert master_started is not None
            after_master = at - master_started
            timeline.mark(
                f"from the kill: keepalived {ka_at - killed:.2f} s, VIP {vip_at - killed:.2f} s; "
                f"keepalived started {after_master:.2f} s after the new master "
                f"(keepalived_start_delay {START_DELAY:g} s)"
            )
            print(f"start keepalived: {reason}")
            assert NO_NODE_HOLDS in reason, reason
            assert after_master < START_DELAY / 2, after_master
            assert not lb2.has_vip() and not running(lb2, "keepalived")


def test_nobody_holding_the_vip_a_thawed_haproxy_needs_one_passing_probe() -> None:
    """Nobody holds VI_1 (``nobody_holds``), the probe's rise is 3; lb1's hung haproxy is
    thawed: keepalived starts at its first passing probe, saying that no node holds VI_1."""
    with Lab() as lab:
        _, lb1, _ = pair(lab, "", rise=RISE)
        with recorded(lab, f"nobody holds; the same haproxy thawed, rise {RISE}") as timeline:
            frozen = nobody_holds(lab, timeline)
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            thawed = time.monotonic()
            timeline.mark("lb1's haproxy thawed")
            wait_for(lambda: running(lb1, "keepalived"), 15, interval=0.02, what="keepalived")
            ka_at = time.monotonic()
            timeline.mark(f"lb1's keepalived running, {ka_at - thawed:.2f} s after the thaw")
            wait_for(lb1.has_vip, 15, interval=0.02, what="lb1 to take the VIP")
            timeline.mark(f"VIP on lb1, {time.monotonic() - thawed:.2f} s after the thaw")
            _, reason = keepalived_start(lb1)
            print(f"start keepalived: {reason}")
            assert NO_NODE_HOLDS in reason, reason
