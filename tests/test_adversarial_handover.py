"""Adversarial tests of the peers as a policy input (``handover``): what a peer's view can make
this node do. Each attack follows the allowed case it is measured against."""

from __future__ import annotations

from lbwatch.events import Group, InstanceFacts, ProbeResult, ProcessDown, Service
from lbwatch.handover import orphaned, release
from lbwatch.policy import ServiceState, State, decide
from tests.fakes import proc
from tests.test_handover import NOW, VI_1, VI_1_STOP, peer
from tests.test_policy import verbs
from tests.test_policy_peers import CFG, MASTER, PROBED, STOPPED, T, holding, lb2

HA = Service.HAPROXY
VI_1_UNKNOWN = InstanceFacts("VI_1", "unknown", frozenset({"192.0.2.100"}))


# ---------------------------------------------------------------------------------------------
# A drained peer is a healthy BACKUP at priority 1: it can take the VIP over


def test_a_drained_peer_that_cannot_serve_is_unable() -> None:
    """The allowed keep: lb2 drained and its haproxy down, so nobody could serve."""
    verdict = release((VI_1,), Group((peer(serving=False, drained=frozenset({"VI_1"})),)), NOW)
    assert not verdict.release


def test_a_drained_peer_that_serves_takes_the_vip_when_haproxy_here_dies() -> None:
    """lb2 drained (priority 1 through its track file) but serving, keepalived running, VI_1
    BACKUP: when this node's keepalived stops, lb2 is the highest priority left and becomes
    MASTER, as keepalived.conf(5) has it (a track_file adds to the priority, floored at 1; only
    below -253 is FAULT). Keeping the VIP on a dead haproxy here black-holes traffic that lb2
    would serve; before peers were weighed, lbwatch stopped keepalived here."""
    group = lb2(drained=frozenset({"VI_1"}))
    assert release((VI_1,), group, T).release
    d = decide(holding(group), ProcessDown(HA, MASTER, "pidfd"), T, CFG)
    assert verbs(d) == [("keepalived", "stop"), ("haproxy", "start")]
    assert d.state.kept is None


# ---------------------------------------------------------------------------------------------
# "No node holds it" needs each peer to say what it holds


def test_a_peer_whose_keepalived_is_stopped_holds_nothing() -> None:
    """The allowed fast start: lb2's keepalived stopped, so it holds nothing, whatever state
    its view shows for VI_1 (STOP, or unknown where only its keepalived.conf names VI_1)."""
    for theirs in (VI_1_STOP, VI_1_UNKNOWN):
        group = Group((peer(keepalived=False, instances=(theirs,)),))
        assert orphaned((VI_1_STOP,), group, NOW) == ("VI_1",), theirs


def test_a_peer_that_does_not_know_its_vrrp_state_may_hold_it() -> None:
    """lb2's keepalived runs, and its view names VI_1 only from its keepalived.conf (no notify
    FIFO report yet, VIPs not measured: state "unknown", held False): lb2 may well be MASTER.
    That proves nothing, so keepalived here waits for rise and keepalived_start_delay as
    before, instead of starting at the first probe and preempting lb2 with a haproxy that has
    passed one probe."""
    assert orphaned((VI_1_STOP,), Group((peer(instances=(VI_1_UNKNOWN,)),)), NOW) == ()
    fresh = proc(4800, started=T)
    state = State(
        haproxy=ServiceState(proc=fresh),
        keepalived=ServiceState(),
        primed=True,
        vrrp=STOPPED,
        group=lb2(instances=(VI_1_UNKNOWN,)),
    )
    d = decide(state, ProbeResult(True, "200", master=fresh), T + 0.1, PROBED)
    assert verbs(d) == []
