"""Adversarial tests of the peers as a policy input (``handover``): what a peer's view can make
this node do. Each attack follows the allowed case it is measured against."""

from __future__ import annotations

from lbwatch.events import Group, ProcessDown, Service
from lbwatch.handover import release
from lbwatch.policy import decide
from tests.test_handover import NOW, VI_1, peer
from tests.test_policy import verbs
from tests.test_policy_peers import CFG, MASTER, T, holding, lb2

HA = Service.HAPROXY


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
