"""End to end, adversarial: a stopped agent is not a live one (issue 23, finding 4). An agent
stopped with SIGSTOP (for less than the unit's 10 s WatchdogSec) still exists, so before the
heartbeat its receiver served its last view as current: lb2 mailed a split brain that was not
there, and missed one that was. Both directions, in the two-node lab with config sync (so each
agent watches the other), keepalived reporting to the FIFO and mail to the lab's SMTP server.
Each stopped agent is resumed in a ``finally``."""

from __future__ import annotations

import os
import signal
import time

from lbwatch.cluster.watch import NOT_RESPONDING
from lbwatch.heartbeat import STALE_AFTER
from tests.e2e.test_lab_cluster import (
    NOTIFY,
    SPLIT_BRAIN_AFTER,
    cluster_json,
    no_split_brain_said,
    pair,
    peer_up,
    vrrp_state,
    with_text,
)
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.lab.netlab import VIP, Lab
from tests.util import wait_for

pytestmark = sync_marks

STOPPED_FOR = 8.0  # the finding's stop: below the unit's WatchdogSec (10 s)
MARGIN = 3.0  # for a loaded machine: mail, ssh and the lab's own commands


def test_a_stopped_agents_last_view_makes_no_split_brain() -> None:
    """lb1's agent is stopped for 8 s, and lb1's keepalived is then stopped normally: lb2 takes
    the VIP while lb1's last view still says MASTER holding it. lb2 shows lb1's agent as not
    responding, its kernel holding no VIP, and mails no split brain: only lb2 held the VIP
    (checked throughout). Control: before the stop lb2 heard lb1 as MASTER, and lb2 held the VIP
    alone for longer than split_brain_after plus the staleness bound, so a stale claim would
    have been declared; after it, lb1 is heard again and takes the VIP back."""
    with Lab() as lab:
        maildir, lb1, lb2 = pair(lab, NOTIFY)
        wait_for(lambda: vrrp_state(cluster_json(lb2), "lb1") == "MASTER", 20,
                 what="lb2 to hear lb1 as MASTER")  # fmt: skip
        agent = lb1.agent_pid()
        assert agent is not None
        states: set[str] = set()
        tables: list[str] = []
        os.kill(agent, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            assert lb1.kill("keepalived", signal.SIGTERM)
            wait_for(lambda: not lb1.has_vip(), 10, what="lb1's keepalived to let go")
            wait_for(lb2.has_vip, 10, interval=0.02, what="lb2 to take the VIP")
            taken = time.monotonic()
            until = max(stopped + STOPPED_FOR, taken + SPLIT_BRAIN_AFTER + STALE_AFTER + 1)
            while time.monotonic() < until:  # bounded by the clock: the stop's length
                rep = cluster_json(lb2)
                states.add(rep.nodes["lb1"].state)
                if rep.nodes["lb1"].state == NOT_RESPONDING and not tables:
                    tables.append(lb2.lbwatch_cli("status", "--cluster"))
                assert not lb1.has_vip(), "lb1 holds the VIP: the test proves nothing"
                time.sleep(0.2)
            during = cluster_json(lb2)
            held = time.monotonic() - taken
        finally:
            os.kill(agent, signal.SIGCONT)
        print(f"\nlb1's agent stopped {STOPPED_FOR:g} s; lb2 held the VIP alone {held:.1f} s")
        print(tables[0] if tables else "(no table while not responding)")
        # The finding: no split brain from lb1's last view.
        assert "split brain" not in lb2.log_text()
        assert [s for s in during.split_brain if s.declared] == []
        # lb2 saw lb1's agent as not responding, and lb1's kernel holding nothing.
        assert NOT_RESPONDING in states, states
        assert during.nodes["lb1"].state == NOT_RESPONDING
        assert during.nodes["lb1"].reason.endswith("its kernel holds none of its VIPs")
        assert tables and "lb1: AGENT NOT RESPONDING since" in tables[0]
        # Resumed: lb1 restarts its keepalived and takes the VIP back (higher priority).
        wait_for(lambda: peer_up(lb2, "lb1"), 20, what="lb2 to hear lb1 again")
        wait_for(lambda: lb1.has_vip() and not lb2.has_vip(), 30, what="lb1 alone again")
        no_split_brain_said(maildir, (lb1, lb2))


def test_a_split_brain_with_one_agent_stopped_is_mailed_by_the_other() -> None:
    """lb2's agent is stopped, its last view saying BACKUP. Control first: with VRRP intact lb1
    shows lb2's agent as not responding and sees no split brain (lb2's kernel holds no VIP).
    Then VRRP is cut both ways and lb2's keepalived takes the VIP: lb1 mails the split brain
    within split_brain_after plus the staleness bound (and a margin) of lb2 taking it, on the
    evidence of lb2's kernel as lb2's receiver read it. VRRP back, lb2's keepalived lets go,
    and lb1 mails it resolved, lb2's agent still stopped."""
    with Lab() as lab:
        maildir, lb1, lb2 = pair(lab, NOTIFY)
        wait_for(lambda: vrrp_state(cluster_json(lb1), "lb2") == "BACKUP", 20,
                 what="lb1 to hear lb2 as BACKUP")  # fmt: skip
        agent = lb2.agent_pid()
        assert agent is not None
        os.kill(agent, signal.SIGSTOP)
        try:
            wait_for(lambda: cluster_json(lb1).nodes["lb2"].state == NOT_RESPONDING,
                     STALE_AFTER + 10, what="lb1 to see lb2's agent not responding")  # fmt: skip
            quiet = cluster_json(lb1)
            assert quiet.split_brain == [] and not lb2.has_vip()
            assert quiet.nodes["lb2"].reason.endswith("its kernel holds none of its VIPs")

            lab.set_vrrp(False)
            wait_for(lb2.has_vip, 15, interval=0.02, what="lb2 to take the VIP as well")
            split = time.time()
            assert lb1.has_vip(), "lb1 let go of the VIP: VRRP was not cut"
            bound = SPLIT_BRAIN_AFTER + STALE_AFTER + MARGIN
            wait_for(
                lambda: with_text(maildir, "] lb1: split brain: VI_1"),
                split + bound - time.time(),
                what="lb1's split-brain mail",
            )
            at, subject = with_text(maildir, "] lb1: split brain: VI_1")[0]
            print(f"\nlb1's mail {at - split:.2f} s after lb2 took the VIP (bound {bound:g} s)")
            assert "claimed by lb1 and lb2" in subject
            rep = cluster_json(lb1)
            assert rep.nodes["lb2"].state == NOT_RESPONDING
            assert rep.nodes["lb2"].reason.endswith(f"its kernel holds {VIP}")
            assert [(s.nodes, s.declared) for s in rep.split_brain] == [(["lb1", "lb2"], True)]

            lab.set_vrrp(True)
            wait_for(lambda: not lb2.has_vip(), 15, what="lb2's keepalived to let go")
            resolved = "resolved: lb1 holds VI_1 (VIP 192.0.2.100) alone"
            wait_for(lambda: with_text(maildir, resolved), 15, what="lb1's resolved mail")
        finally:
            os.kill(agent, signal.SIGCONT)
            lab.set_vrrp(True)
        wait_for(lambda: peer_up(lb1, "lb2"), 20, what="lb1 to hear lb2 again")
