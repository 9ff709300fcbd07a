"""End to end: a split brain resolved by lbwatch, and the same cut left alone (real haproxy,
keepalived and lbwatch on both lab nodes, mail to the lab's SMTP server).

VRRP between the nodes is cut on the bridge (``Lab.set_vrrp``: multicast no longer flooded to
their ports) while unicast, the client's HTTP and the sync link's ssh, flows on: lb2 (priority
253) hears no more advertisements from lb1 (254) and becomes MASTER too, and both answer ARP
for the VIP. The client GETs through the VIP every few ms, a new connection each
(``clientprobe``), so its answers say whose MAC it holds at each moment. The cut comes just
before one of lb1's gratuitous-ARP refreshes (``splitlab``: the lab's keepalived repeats them
every 5 s), so the client follows lb2 and only lbwatch's gratuitous ARP can bring it back to
lb1 before the next refresh.

keepalived's own notify hooks time its transitions (independently of lbwatch), a capture on
the bridge the gratuitous ARPs, lbwatch's log and status its decisions; each test prints its
timeline in seconds from the cut, passing or not.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from bench import wire
from lbwatch import trackfile
from lbwatch.statusdoc import ActionEntry
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.lab.clientprobe import Probe, Segment, alone_since, gets_by_answer, seconds_off
from tests.lab.netlab import VIP, Lab, Node
from tests.lab.splitlab import (
    REFRESH,
    RESOLVE_OFF,
    cut_before_refresh,
    entered,
    garps,
    settled_pair,
    track_value,
    transitions,
    vrrp_state,
)
from tests.util import wait_for

pytestmark = [
    *sync_marks,
    pytest.mark.skipif(not wire.available(), reason="needs tcpdump (the lab's bridge capture)"),
]

STANDING_DOWN = (
    "standing down here (the instance in FAULT) until VRRP between the nodes works again"
)
HEARD_AGAIN = "VRRP advertisements between the nodes arrive again: VI_1 back in VRRP"
GARP = (
    f"sending gratuitous ARP for {VIP}, so that clients that learnt the other node's MAC come back"
)
SPLIT_WITHIN = 10.0  # s from the cut to lb2 MASTER (2 to 3 s expected)
SINGLE_WITHIN = 5.0  # s from lb2 MASTER to the VIP on lb1 alone (about 1 s expected)
BACK_WITHIN = 1.5  # s from the VIP on lb1 alone to the client answered by lb1 alone
# After lb2 stood down: watched past lb1's next refresh and lb2's second burst of gratuitous
# ARPs as MASTER (vrrp_garp_master_delay, 5 s after it became MASTER), had it come.
WATCH_AFTER_SPLIT = 7.0
CUT = "VRRP cut"
SPLIT_HELD = 12.0  # the control's cut, from lb2 MASTER: refreshes of both nodes in it


class Timeline:
    """Named moments (wall clock), printed in order, in seconds from the cut."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.marks: list[tuple[float, str]] = []

    def mark(self, label: str, at: float | None = None) -> float:
        when = time.time() if at is None else at
        self.marks.append((when, label))
        return when

    def print(self) -> None:
        if not self.marks:
            return
        origin = next((at for at, label in self.marks if label == CUT), self.marks[0][0])
        print(f"\n{self.title} (s from the cut)")
        for at, label in sorted(self.marks):
            print(f"  {at - origin:7.3f}  {label}")


@contextlib.contextmanager
def watching(lab: Lab, title: str) -> Iterator[tuple[Timeline, wire.Capture, Probe]]:
    """A timeline, a capture on the bridge and the client's probe through the VIP, for the
    block; the timeline printed when it ends, the test passing or not."""
    tl = Timeline(title)
    try:
        with wire.Capture(lab, lab.base / "bridge.pcap") as cap, Probe(lab, 80) as probe:
            yield tl, cap, probe
    finally:
        tl.print()


def transition(node: Node, state: str, after: float) -> float:
    """When keepalived on ``node`` entered ``state`` after ``after``, once its notify hook has
    written it down (the hook runs a moment after the transition itself)."""
    wait_for(lambda: entered(node, state, after) is not None, 5,
             what=f"{node.name}'s keepalived to say {state}")  # fmt: skip
    at = entered(node, state, after)
    assert at is not None
    return at


def log_at(line: str) -> float:
    """The wall time of one line of lbwatch's log (millisecond stamps, local time)."""
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float(line[19:23])


def said(node: Node, text: str, after: float = 0.0) -> list[tuple[float, str]]:
    """lbwatch's log lines on ``node`` that end with ``text``, after ``after``; not the lines
    that record an alert's mail, which quote it."""
    out = []
    for line in node.log_text().splitlines():
        if not line.startswith("20") or "notification sent via" in line:
            continue
        if line.rstrip().endswith(text) and log_at(line) >= after - 0.001:
            out.append((log_at(line), line))
    return out


def actions(node: Node, verb: str, after: float) -> list[ActionEntry]:
    """lbwatch's recent actions of ``verb`` on keepalived ("track", "announce")."""
    recent = node.doc().recent_actions
    return [a for a in recent if a.action == f"{verb} keepalived" and a.at > after]


def answer_at(segments: list[Segment], at: float) -> str:
    return next((s.answer for s in segments if s.start <= at < s.end), "none")


def test_a_vrrp_cut_is_resolved_by_the_node_vrrp_makes_backup() -> None:
    """With VRRP cut between settled agents, lb2 becomes MASTER too and the client follows it;
    lb2 then stands down (VI_1 in FAULT through its track file, the VIP on lb1 alone) and lb1's
    agent sends gratuitous ARP, which brings the client back to lb1 within BACK_WITHIN, before
    keepalived's next refresh; with VRRP back, lb2 leaves FAULT for BACKUP, once, and lb1 is
    MASTER throughout."""
    with Lab() as lab:
        lb1, lb2 = settled_pair(lab)
        with watching(lab, "A VRRP cut resolved by lbwatch") as (tl, cap, probe):
            t0, last, refresh = cut_before_refresh(lab, cap)
            tl.mark(CUT, t0)
            tl.mark("lb1's refresh before the cut on the wire (keepalived)", last)

            wait_for(lb2.has_vip, SPLIT_WITHIN, interval=0.02, what="lb2 to take the VIP too")
            tl.mark("lb2 holds the VIP too (polled)")
            wait_for(lambda: not lb2.has_vip(), SINGLE_WITHIN, interval=0.02,
                     what="lb2 to drop the VIP")  # fmt: skip
            single = tl.mark("the VIP on lb1 alone (polled)")
            assert lb1.has_vip()
            split = transition(lb2, "MASTER", t0)
            tl.mark("lb2 MASTER (keepalived)", split)
            assert single - split <= SINGLE_WITHIN

            wait_for(lambda: vrrp_state(lb2) == "FAULT", 5, what="lb2's VI_1 in FAULT")
            assert track_value(lb2) == trackfile.FAULT
            wait_for(lambda: lb2.doc().track == {"VI_1": trackfile.FAULT}, 5,
                     what="lb2's status to show the track file as read")  # fmt: skip
            fault = transition(lb2, "FAULT", t0)
            tl.mark("lb2 FAULT (keepalived)", fault)
            ((stood, _),) = said(lb2, STANDING_DOWN, t0)
            tl.mark("lb2: standing down (lbwatch)", stood)
            (write,) = actions(lb2, "track", t0)
            assert write.detail == "written: VI_1=-254", write
            tl.mark("lb2: track file written, -254 (lbwatch)", write.at)

            def announced() -> bool:
                return [a.outcome for a in actions(lb1, "announce", t0)] == ["ok"]

            wait_for(announced, 5, what="lb1's ANNOUNCE done")
            (announce,) = actions(lb1, "announce", t0)
            assert announce.detail == f"{VIP} on eth0", announce
            assert said(lb1, GARP, t0)
            tl.mark("lb1: ANNOUNCE issued (lbwatch)", announce.at)

            # Watched past lb1's next refresh and lb2's delayed burst, had it come.
            watched = max(split + WATCH_AFTER_SPLIT, refresh + REFRESH + 0.5)
            wait_for(lambda: time.time() > watched, 15, what="the watch after the stand-down")
            segs = probe.segments(until=time.time())
            back = alone_since(segs, "lb1", time.time())
            assert back is not None, segs[-3:]
            tl.mark("client answered by lb1 alone from here", back)
            for at in garps(cap, lb2, t0):
                tl.mark("lb2's gratuitous ARP on the wire", at)
            lb1_garps = garps(cap, lb1, t0)
            ours = [at for at in lb1_garps if announce.at - 0.01 <= at <= announce.at + 1.0]
            for at in lb1_garps:
                who = "lbwatch's ANNOUNCE" if at in ours else "keepalived's refresh"
                tl.mark(f"lb1's gratuitous ARP on the wire ({who})", at)
            stranded = seconds_off(segs, single, watched, "lb1")
            print(f"client: not answered by lb1 for {stranded:.3f} s after the VIP was on lb1 "
                  f"alone; GETs from the cut: {gets_by_answer(segs, t0, watched)}")  # fmt: skip
            # The client followed lb2 (the refresh came before lb2's ARPs) ...
            assert answer_at(segs, stood) == "lb2", segs
            # ... and lbwatch's gratuitous ARP, not keepalived's refresh, brought it back.
            assert ours, lb1_garps
            refreshed = [at for at in lb1_garps if at not in ours and split < at < back]
            assert refreshed == [], (refreshed, back)
            assert back - single <= BACK_WITHIN, segs
            assert vrrp_state(lb2) == "FAULT" and lb1.has_vip() and not lb2.has_vip()

            # -- VRRP back: lb2 hears lb1 again and leaves FAULT, for BACKUP -----------------
            lab.set_vrrp(True)
            restored = tl.mark("VRRP restored")
            wait_for(lambda: said(lb2, HEARD_AGAIN, restored), 10, what="lb2 to hear VRRP again")
            tl.mark("lb2: advertisements arrive again (lbwatch)", said(lb2, HEARD_AGAIN)[0][0])
            wait_for(lambda: vrrp_state(lb2) == "BACKUP", 10, what="lb2 BACKUP")
            backup = transition(lb2, "BACKUP", restored)
            tl.mark("lb2 BACKUP (keepalived)", backup)
            assert track_value(lb2) == trackfile.OK
            # A second split brain, had it come, is stood down about a second after both claims.
            wait_for(lambda: time.time() > backup + 4, 10, what="the watch after the restore")
            probe.stop()
        assert [s for _, s in transitions(lb2, t0)] == ["MASTER", "FAULT", "BACKUP"]
        assert transitions(lb1, t0) == []  # MASTER throughout
        assert vrrp_state(lb1) == "MASTER" and lb1.has_vip() and not lb2.has_vip()
        assert len(said(lb2, STANDING_DOWN)) == 1
        assert [a.detail for a in actions(lb2, "track", t0)] == [
            "written: VI_1=-254",
            "written: VI_1=0",
        ]
        segs = probe.segments()
        assert probe.ended is not None
        assert alone_since(segs, "lb1", probe.ended[0]) == back  # through the restore too
        print(f"client, cut to end: {gets_by_answer(segs, t0, probe.ended[0])}")


def test_with_resolution_off_both_hold_the_vip_until_vrrp_is_back() -> None:
    """The control, today's behaviour (``resolve_split_brain = false``): the same cut leaves
    both nodes MASTER with the VIP until VRRP is restored, both agents alert and neither stands
    down, and the client stays on whichever MAC it learnt last (lb2's from the split until
    lb1's next refresh, then each node's in turn)."""
    with Lab() as lab:
        lb1, lb2 = settled_pair(lab, RESOLVE_OFF)
        with watching(lab, "The same cut with resolve_split_brain = false") as (tl, cap, probe):
            t0, last, refresh = cut_before_refresh(lab, cap)
            tl.mark(CUT, t0)
            tl.mark("lb1's refresh before the cut on the wire (keepalived)", last)
            wait_for(lb2.has_vip, SPLIT_WITHIN, interval=0.02, what="lb2 to take the VIP too")
            tl.mark("lb2 holds the VIP too (polled)")
            split = transition(lb2, "MASTER", t0)
            tl.mark("lb2 MASTER (keepalived)", split)
            wait_for(lambda: time.time() > split + SPLIT_HELD, SPLIT_HELD + 5, interval=0.02,
                     what="the split held")  # fmt: skip
            assert lb1.has_vip() and lb2.has_vip()
            lab.set_vrrp(True)
            restored = tl.mark("VRRP restored")
            wait_for(lambda: not lb2.has_vip(), 10, interval=0.02, what="lb2 to drop the VIP")
            tl.mark("the VIP on lb1 alone (polled)")
            backup = transition(lb2, "BACKUP", restored)
            tl.mark("lb2 BACKUP (keepalived)", backup)
            wait_for(lambda: [a.outcome for a in actions(lb1, "announce", t0)] == ["ok"], 10,
                     what="lb1's ANNOUNCE once the declared split brain ended")  # fmt: skip
            tl.mark("lb1: ANNOUNCE issued (lbwatch)", actions(lb1, "announce", t0)[0].at)
            wait_for(lambda: time.time() > backup + 2, 5, what="the watch after the restore")
            probe.stop()
            for node in (lb1, lb2):
                for at in garps(cap, node, t0):
                    tl.mark(f"{node.name}'s gratuitous ARP on the wire", at)
        segs = probe.segments()
        for s in segs:
            if s.end > t0:
                print(f"  client {s.start - t0:7.3f} .. {s.end - t0:7.3f}  {s.answer}")
        off = seconds_off(segs, split, restored, "lb1")
        print(f"client: not answered by lb1 for {off:.3f} s of the {restored - split:.3f} s "
              f"split; GETs: {gets_by_answer(segs, t0, restored)}")  # fmt: skip
        assert [s for _, s in transitions(lb2, t0)] == ["MASTER", "BACKUP"]
        assert transitions(lb1, t0) == []
        declared = f"split brain: VI_1 (VIP {VIP}) is claimed by lb1 and lb2 at once"
        for node in (lb1, lb2):
            assert [line for line in node.log_text().splitlines() if declared in line], node.name
        assert not said(lb2, STANDING_DOWN)
        assert track_value(lb2) in (None, trackfile.OK)
        assert actions(lb2, "track", t0) == []
        # Stranded on lb2's MAC from the split until lb1's refresh (the cut timed for it).
        assert answer_at(segs, split + 0.5) == "lb2", segs
        assert off >= refresh + REFRESH - split - 0.5, (off, segs)
