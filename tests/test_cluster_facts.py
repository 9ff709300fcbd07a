"""Node views read as the facts the policy weighs (``cluster.facts``): one reading for this node
and its peers."""

from __future__ import annotations

from lbwatch.cluster import facts, splitbrain
from lbwatch.events import Group, InstanceFacts
from lbwatch.statusdoc import (
    KeepalivedConfView,
    NodeAgent,
    NodeService,
    NodeView,
    VipsView,
    VrrpSettings,
)

AGENT = NodeAgent(pid=1, start_ticks=1, version="x")


def view(**kw: object) -> NodeView:
    base: dict[str, object] = {
        "node": "lb2",
        "agent": AGENT,
        "haproxy": NodeService(running=True),
        "keepalived": NodeService(running=True),
        "health": "up",
        "vrrp": {
            "VI_1": VipsView(state="BACKUP", vips=["192.0.2.100/24 dev eth0"], held=[]),
            "group:G": VipsView(state="BACKUP"),
        },
    }
    base.update(kw)
    return NodeView(**base)  # type: ignore[arg-type]


def test_instances_from_the_agents_report_and_keepalived_conf() -> None:
    """VIPs as addresses; sync groups left out; an instance only keepalived.conf names is there,
    state unknown; a reported one without VIPs takes keepalived.conf's."""
    conf = KeepalivedConfView(
        path="/etc/keepalived/keepalived.conf",
        instances={
            "VI_2": VrrpSettings(vips=["192.0.2.101"]),
            "VI_3": VrrpSettings(vips=["192.0.2.102"]),
        },
    )
    vrrp = {
        "VI_1": VipsView(state="MASTER", vips=["192.0.2.100/24"], held=["192.0.2.100/24"]),
        "VI_3": VipsView(state="BACKUP"),
        "group:G": VipsView(state="MASTER"),
    }
    assert facts.instances(vrrp, conf) == (
        InstanceFacts("VI_1", "MASTER", frozenset({"192.0.2.100"}), True),
        InstanceFacts("VI_2", "unknown", frozenset({"192.0.2.101"})),
        InstanceFacts("VI_3", "BACKUP", frozenset({"192.0.2.102"})),
    )


def test_a_peer_serves_only_running_healthy_and_not_given_up() -> None:
    """Serving: haproxy running, its probe not failing, not given up."""
    assert facts.peer("lb2", view(), 5.0).serving
    assert not facts.peer("lb2", view(health="down"), 5.0).serving
    assert not facts.peer("lb2", view(haproxy=NodeService(running=False)), 5.0).serving
    given_up = NodeService(running=True, given_up=True)
    assert not facts.peer("lb2", view(haproxy=given_up), 5.0).serving
    p = facts.peer("lb2", view(paused=True), 5.0)
    assert p.paused and p.answered == 5.0 and p.keepalived
    assert p.instances == (InstanceFacts("VI_1", "BACKUP", frozenset({"192.0.2.100"})),)


def test_group_counts_only_the_agents_word() -> None:
    """A peer heard through its agent is a peer; one heard through its kernel, or not at all,
    is silent."""
    heard = {
        "lb2": splitbrain.Heard(view(), splitbrain.AGENT, 7.0),
        "lb3": splitbrain.Heard(view(node="lb3"), splitbrain.KERNEL, 7.0),
        "lb4": splitbrain.Heard(None, splitbrain.NOBODY),
    }
    group = facts.group(heard)
    assert [p.node for p in group.peers] == ["lb2"] and group.silent == ("lb3", "lb4")


def test_renewal_is_the_same_word_answered_again() -> None:
    """Only ``answered`` moved: a renewal; anything else: news."""
    a = Group((facts.peer("lb2", view(), 1.0),))
    assert facts.renewal(a, Group((facts.peer("lb2", view(), 2.0),)))
    assert not facts.renewal(a, Group((facts.peer("lb2", view(health="down"), 2.0),)))
    assert not facts.renewal(a, Group((), ("lb2",)))
