"""The policy with the peers' state as an input: the VIP is never let go to nobody, and a node
comes back at once when no node holds its instance. Tables of (state, event, time) -> actions."""

from __future__ import annotations

import logging
from dataclasses import replace

from lbwatch.events import (
    Group,
    Health,
    InstanceFacts,
    Outcome,
    PauseChanged,
    PeerFacts,
    PeersSeen,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    Service,
    Tick,
    VrrpSeen,
)
from lbwatch.handover import CURRENT_FOR
from lbwatch.policy import Decision, ServiceState, State, decide, summary
from tests.fakes import config, proc
from tests.test_policy import result, verbs

HA, KA = Service.HAPROXY, Service.KEEPALIVED
CFG = config(policy={"keepalived_start_delay": 2.0, "kept_alert_after": 10.0})
PROBED = config(
    haproxy={"health": {"url": "http://127.0.0.1:8404/health", "fall": 2, "rise": 2}},
    policy={"keepalived_start_delay": 2.0},
)
MASTER, KEEPALIVED = proc(4711), proc(99, name="keepalived")
T = 100.0
VIP = frozenset({"192.0.2.100"})
HELD = (InstanceFacts("VI_1", "MASTER", VIP, held=True),)
BACKUP = (InstanceFacts("VI_1", "BACKUP", VIP),)
STOPPED = (InstanceFacts("VI_1", "STOP", VIP),)


def lb2(at: float = T, **kw: object) -> Group:
    """lb2 as heard at ``at``: serving, keepalived running, VI_1 BACKUP there, unless told."""
    base: dict[str, object] = {
        "node": "lb2",
        "answered": at,
        "serving": True,
        "keepalived": True,
        "paused": False,
        "instances": BACKUP,
    }
    base.update(kw)
    return Group((PeerFacts(**base),))  # type: ignore[arg-type]


def holding(group: Group | None, **kw: object) -> State:
    """Both services up, this node holding VI_1, the peers as ``group``."""
    base = State(
        haproxy=ServiceState(proc=MASTER),
        keepalived=ServiceState(proc=KEEPALIVED),
        primed=True,
        vrrp=HELD,
        group=group,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def said(decision: Decision) -> str:
    return "\n".join(n.text for n in decision.notes)


def test_haproxy_dies_and_the_peer_cannot_serve_keepalived_keeps_the_vip() -> None:
    """haproxy's death with lb2's haproxy down too: no stop, haproxy is started, said once."""
    d = decide(holding(lb2(serving=False)), ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    assert verbs(d) == [("haproxy", "start")]
    assert "keeping keepalived running and the VIP here" in said(d)
    assert "no peer can take VI_1 (VIP 192.0.2.100) over (lb2: haproxy not serving)" in said(d)
    assert d.state.kept is not None
    assert "VIP KEPT" in summary(d.state, CFG)
    again = decide(d.state, Tick(), T + 1, CFG)
    assert verbs(again) == [] and "keeping" not in said(again)  # said once


def test_haproxy_dies_and_the_peer_can_serve_the_vip_moves() -> None:
    """The positive control: lb2 serving as BACKUP, so keepalived is stopped at once."""
    d = decide(holding(lb2()), ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    assert verbs(d) == [("keepalived", "stop"), ("haproxy", "start")]
    assert d.state.kept is None


def test_without_a_current_view_the_policy_acts_as_alone() -> None:
    """A peer that cannot be asked, or whose view is too old, or no watch: stop as always."""
    for group in (
        None,
        Group((), ("lb2",)),
        lb2(at=T - CURRENT_FOR - 0.1, serving=False),
    ):
        d = decide(holding(group), ProcessDown(HA, MASTER, "pidfd"), T, CFG)
        assert verbs(d) == [("keepalived", "stop"), ("haproxy", "start")], group


def test_a_backup_node_stops_keepalived_whatever_the_peer() -> None:
    """A node that holds nothing loses nothing by stopping keepalived."""
    state = holding(lb2(serving=False, instances=HELD), vrrp=BACKUP)
    d = decide(state, ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    assert ("keepalived", "stop") in verbs(d)


def test_a_failing_probe_keeps_the_vip_too_when_the_peer_is_stopped() -> None:
    """The probe failing while lb2's keepalived is stopped: kept, with the probe's words."""
    state = holding(lb2(keepalived=False), health=Health.UP)
    d = decide(state, ProbeResult(False, "timeout"), T, PROBED)
    d = decide(d.state, ProbeResult(False, "timeout"), T + 1, PROBED)
    assert verbs(d) == []
    assert "haproxy health check failing (timeout); keeping keepalived running" in said(d)
    assert "lb2: keepalived not running" in said(d)


def test_kept_until_the_peer_can_take_it_then_let_go() -> None:
    """lb2 heals and reports BACKUP: the VIP is let go then, and the sentence says why."""
    kept = decide(holding(lb2(serving=False)), ProcessDown(HA, MASTER, "pidfd"), T, CFG).state
    d = decide(kept, PeersSeen(lb2(at=T + 2)), T + 2, CFG)
    assert ("keepalived", "stop") in verbs(d)
    assert "lb2 can take VI_1 over: letting the VIP go after keeping it 2.0 s" in said(d)
    assert d.state.kept is None


def test_kept_until_the_view_lapses_then_acting_alone() -> None:
    """lb2 stops answering: its view lapses, the policy wakes for it and acts as alone."""
    d = decide(holding(lb2(serving=False)), ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    assert d.wake_at is not None and d.wake_at <= T + CURRENT_FOR
    early = decide(d.state, Tick(), T + CURRENT_FOR - 0.1, CFG)
    assert ("keepalived", "stop") not in verbs(early)
    late = decide(early.state, Tick(), T + CURRENT_FOR + 0.1, CFG)
    assert ("keepalived", "stop") in verbs(late)
    assert "lb2 cannot be asked: letting the VIP go" in said(late)


def test_kept_and_haproxy_heals_the_vip_never_moved() -> None:
    """haproxy back while kept: no stop at all, and the end is said."""
    d = decide(holding(lb2(serving=False)), ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    start = d.actions[0]
    d = decide(d.state, result(start), T + 0.3, CFG)
    new = proc(4800, started=T + 0.4)
    d = decide(d.state, ProcessUp(HA, new, None), T + 0.5, CFG)
    assert verbs(d) == []
    assert "haproxy is serving again; the VIP stayed on this node throughout (0.5 s)" in said(d)
    assert d.state.kept is None


def test_kept_long_is_mailed_once() -> None:
    """After kept_alert_after the keep is an alert (agent:vip_kept), once."""
    d = decide(holding(lb2(serving=False)), ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    d = decide(d.state, result(d.actions[0], Outcome.FAILED), T + 0.1, CFG)
    renewed = d.state
    alerts = []
    for t in (T + 5, T + 9.9, T + 10.0, T + 12, T + 20):
        renewed = replace(renewed, group=lb2(at=t, serving=False))  # lb2 keeps answering
        d = decide(renewed, Tick(), t, CFG)
        renewed = d.state
        alerts += [n for n in d.notes if n.alert == "vip_kept"]
    assert len(alerts) == 1
    assert "the VIP has stayed 10 s on this node" in alerts[0].text
    assert alerts[0].level == logging.WARNING


def test_paused_keeps_saying_once() -> None:
    """While paused nothing is done; the keep is said once, not on every event."""
    state = holding(lb2(serving=False), paused=True)
    d = decide(state, ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    assert verbs(d) == []
    d2 = decide(d.state, Tick(), T + 0.5, CFG)
    assert "keeping keepalived" not in said(d2)
    d3 = decide(d2.state, PauseChanged(False), T + 1, CFG)
    assert verbs(d3) == [("haproxy", "start")]


def test_nobody_holds_keepalived_starts_at_the_first_passing_probe() -> None:
    """Both keepalived stopped and lb2 holding nothing: started at haproxy's first good probe,
    not after rise probes and keepalived_start_delay."""
    fresh = proc(4800, started=T)
    state = State(
        haproxy=ServiceState(proc=fresh),
        keepalived=ServiceState(),
        primed=True,
        vrrp=STOPPED,
        group=lb2(keepalived=False, serving=False, instances=STOPPED),
    )
    d = decide(state, ProbeResult(True, "200", master=fresh), T + 0.1, PROBED)
    assert verbs(d) == [("keepalived", "start")]
    assert "no node holds VI_1, so one passing probe is enough" in (d.actions[0].reason)


def test_someone_holds_so_the_start_waits_as_before() -> None:
    """The control: lb2 holds VI_1, so rise and keepalived_start_delay apply as before."""
    fresh = proc(4800, started=T)
    state = State(
        haproxy=ServiceState(proc=fresh),
        keepalived=ServiceState(),
        primed=True,
        vrrp=STOPPED,
        group=lb2(instances=HELD),
    )
    d = decide(state, ProbeResult(True, "200", master=fresh), T + 0.1, PROBED)
    assert verbs(d) == []
    d = decide(d.state, ProbeResult(True, "200", master=fresh), T + 1.1, PROBED)
    assert verbs(d) == []  # healthy, not yet up for the start delay
    d = decide(replace(d.state, group=lb2(at=T + 2, instances=HELD)), Tick(), T + 2.0, PROBED)
    assert verbs(d) == [("keepalived", "start")]


def test_vrrp_seen_and_peers_seen_are_folded() -> None:
    """This node's instances and its peers, as reported, are what the policy weighs."""
    state = holding(None, vrrp=())
    d = decide(state, VrrpSeen(HELD), T, CFG)
    assert d.state.vrrp == HELD
    d = decide(d.state, PeersSeen(lb2()), T, CFG)
    assert d.state.group == lb2()
    d = decide(d.state, PeersSeen(None), T, CFG)
    assert d.state.group is None


def test_a_hang_that_ends_when_nobody_holds_needs_one_probe() -> None:
    """haproxy failing its probe, then passing once, with the peer link proving that no node
    holds VI_1: healthy at once (rise 1) and keepalived started, without the start delay."""
    old = proc(4711, started=T - 100)
    state = State(
        haproxy=ServiceState(proc=old),
        keepalived=ServiceState(),
        primed=True,
        health=Health.DOWN,
        probe_streak=-3,
        vrrp=STOPPED,
        group=lb2(keepalived=False, serving=False, instances=STOPPED),
    )
    d = decide(state, ProbeResult(True, "200", master=old), T, PROBED)
    assert d.state.health is Health.UP
    assert verbs(d) == [("keepalived", "start")]
    assert "no node holds VI_1" in d.actions[0].reason
    held = replace(state, group=lb2(instances=HELD))  # the control: lb2 holds it
    d = decide(held, ProbeResult(True, "200", master=old), T, PROBED)
    assert d.state.health is Health.DOWN and verbs(d) == []


def test_the_keep_says_the_probe_once() -> None:
    """The probe's failure is said inside the keep's sentence, not a second time alone."""
    state = holding(lb2(keepalived=False), health=Health.UP, probe_streak=-1)
    d = decide(state, ProbeResult(False, "timeout"), T, PROBED)
    assert [n.text for n in d.notes if "health check failing" in n.text] == [
        n.text for n in d.notes if "keeping keepalived" in n.text
    ]


def test_a_keep_that_ends_with_nothing_held_says_so() -> None:
    """keepalived let the VIP go meanwhile (an operator): the stop follows, and the line says
    this node holds nothing, not that a peer may take it."""
    d = decide(holding(lb2(serving=False)), ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    d = decide(d.state, VrrpSeen(STOPPED), T + 1, CFG)
    assert "this node holds no VIP any more" in said(d)
    assert "a peer may" not in said(d)
