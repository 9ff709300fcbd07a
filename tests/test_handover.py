"""Who can take a VRRP instance over (``handover``): tables, and a property against an oracle
written from the README's invariant, apart from the code."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.events import Group, InstanceFacts, PeerFacts
from lbwatch.handover import CURRENT_FOR, orphaned, release

NOW = 1000.0
VI_1 = InstanceFacts("VI_1", "MASTER", frozenset({"192.0.2.100"}), held=True)
VI_1_BACKUP = InstanceFacts("VI_1", "BACKUP", frozenset({"192.0.2.100"}))
VI_1_STOP = InstanceFacts("VI_1", "STOP", frozenset({"192.0.2.100"}))


def peer(**kw: object) -> PeerFacts:
    """lb2, answered just now: serving, keepalived running, VI_1 BACKUP there."""
    base: dict[str, object] = {
        "node": "lb2",
        "answered": NOW - 0.5,
        "serving": True,
        "keepalived": True,
        "paused": False,
        "instances": (VI_1_BACKUP,),
    }
    base.update(kw)
    return PeerFacts(**base)  # type: ignore[arg-type]


def state(name: str) -> InstanceFacts:
    """VI_1 on lb2 in keepalived state ``name``."""
    return InstanceFacts("VI_1", name, frozenset({"192.0.2.100"}))


def g(*peers: PeerFacts, silent: tuple[str, ...] = ()) -> Group:
    return Group(peers, silent)


OTHER_PAIR = InstanceFacts("VI_1", "BACKUP", frozenset({"192.0.2.200"}))  # none of these VIPs
RENAMED = InstanceFacts("web", "BACKUP", frozenset({"192.0.2.100"}))
HELD_QUIET = InstanceFacts("VI_1", "unknown", frozenset({"192.0.2.100"}), held=True)
OLD = NOW - CURRENT_FOR - 0.1

RELEASE = [
    # (description, this node's instances, group, may let go, words in the sentence)
    ("no peers watched: acting alone", (VI_1,), None, True, ""),
    ("nothing held here", (VI_1_BACKUP,), g(peer(serving=False)), True, ""),
    ("a serving BACKUP peer", (VI_1,), g(peer()), True, "lb2 can take VI_1 over"),
    ("peer's haproxy down", (VI_1,), g(peer(serving=False)), False, "lb2: haproxy not serving"),
    ("peer's keepalived stopped", (VI_1,), g(peer(keepalived=False)), False, "not running"),
    ("peer paused", (VI_1,), g(peer(paused=True)), False, "lb2: paused"),
    ("peer's VI_1 in FAULT", (VI_1,), g(peer(instances=(state("FAULT"),))), False, "in FAULT"),
    ("peer runs another pair's", (VI_1,), g(peer(instances=(OTHER_PAIR,))), False, "no instance"),
    ("peer reports no VRRP state", (VI_1,), g(peer(instances=())), True, ""),
    ("peer's state unknown", (VI_1,), g(peer(instances=(state("unknown"),))), True, "lb2 can"),
    ("peer cannot be asked", (VI_1,), g(silent=("lb2",)), True, "lb2 cannot be asked"),
    ("peer's view too old", (VI_1,), g(peer(serving=False, answered=OLD)), True, "cannot be"),
    ("one of two able", (VI_1,), g(peer(serving=False), peer(node="lb3")), True, "lb3 can"),
    ("one unable, one silent", (VI_1,), g(peer(serving=False), silent=("lb3",)), True, "lb3"),
    (
        "both unable",
        (VI_1,),
        g(peer(serving=False), peer(node="lb3", keepalived=False)),
        False,
        "lb2: haproxy not serving, lb3: keepalived not running",
    ),
    ("matched by VIP", (VI_1,), g(peer(instances=(RENAMED,))), True, "lb2 can take VI_1"),
    ("held, state unknown", (HELD_QUIET,), g(peer(serving=False)), False, "no peer can take"),
]


@pytest.mark.parametrize(
    ("desc", "local", "group", "lets_go", "words"), RELEASE, ids=[r[0] for r in RELEASE]
)
def test_release(
    desc: str, local: tuple[InstanceFacts, ...], group: Group | None, lets_go: bool, words: str
) -> None:
    """The VIP is kept only when every peer, current, is proven unable; the sentence says why."""
    verdict = release(local, group, NOW)
    assert verdict.release is lets_go, verdict
    assert words in verdict.why


def test_orphaned_needs_every_peer_current_and_reporting() -> None:
    """No node holds VI_1 only when each peer answered in time and reports holding none of it."""
    stopped = peer(keepalived=False, instances=(VI_1_STOP,))
    assert orphaned((VI_1_STOP,), Group((stopped,)), NOW) == ("VI_1",)
    assert orphaned((VI_1,), Group((stopped,)), NOW) == ()  # this node holds it
    assert orphaned((VI_1_STOP,), Group((peer(instances=(VI_1,)),)), NOW) == ()  # lb2 holds it
    assert orphaned((VI_1_STOP,), Group((stopped,), ("lb3",)), NOW) == ()  # lb3 unknown
    assert orphaned((VI_1_STOP,), Group((peer(instances=()),)), NOW) == ()  # says nothing
    old = peer(keepalived=False, instances=(VI_1_STOP,), answered=NOW - CURRENT_FOR - 1)
    assert orphaned((VI_1_STOP,), Group((old,)), NOW) == ()
    assert orphaned((VI_1_STOP,), None, NOW) == ()
    held_by_vip = InstanceFacts("VI_1", "BACKUP", frozenset({"192.0.2.100"}), held=True)
    assert orphaned((VI_1_STOP,), Group((peer(instances=(held_by_vip,)),)), NOW) == ()


# ---------------------------------------------------------------------------------------------
# The property: the oracle restates the invariant on plain values, not through the module.

STATES = ["MASTER", "BACKUP", "FAULT", "STOP", "unknown"]
VIPS = ["192.0.2.100", "192.0.2.101"]

INSTANCE = st.builds(
    InstanceFacts,
    st.sampled_from(["VI_1", "VI_2"]),
    st.sampled_from(STATES),
    st.frozensets(st.sampled_from(VIPS), max_size=2),
    st.booleans(),
)
PEER = st.builds(
    PeerFacts,
    st.sampled_from(["lb2", "lb3"]),
    st.floats(NOW - 2 * CURRENT_FOR, NOW),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.lists(INSTANCE, max_size=2, unique_by=lambda i: i.name).map(tuple),
    st.frozensets(st.sampled_from(["VI_1", "VI_2"])),  # drained there: no bar to taking over
)
GROUP = st.one_of(
    st.none(),
    st.builds(
        Group,
        st.lists(PEER, max_size=2).map(tuple),
        st.lists(st.sampled_from(["lb4", "lb5"]), max_size=1).map(tuple),
    ),
)


def same(t: InstanceFacts, inst: InstanceFacts) -> bool:
    """One instance on two nodes: a VIP in common, or one name and one of them with no VIPs."""
    return bool(t.vips & inst.vips) or (t.name == inst.name and not (t.vips and inst.vips))


def oracle_keeps(local: list[InstanceFacts], group: Group | None) -> bool:
    """Keep iff some instance this node holds (VIP here or MASTER) has, among peers that ALL
    spoke within CURRENT_FOR, none that is serving, running keepalived, unpaused, and whose
    copy of it (the same name first) is in a state other than FAULT/STOP -- or that reports
    no instances at all (benefit of doubt)."""
    if group is None or group.silent or not group.peers:
        return False
    if any(NOW - p.answered > CURRENT_FOR for p in group.peers):
        return False
    for inst in local:
        if not (inst.held or inst.state == "MASTER"):
            continue

        def could(p: PeerFacts, inst: InstanceFacts = inst) -> bool:
            if not (p.serving and p.keepalived and not p.paused):
                return False
            if not p.instances:
                return True
            copies = [t for t in p.instances if same(t, inst)]
            named = [t for t in copies if t.name == inst.name]
            theirs = (named or copies)[:1]
            return bool(theirs) and theirs[0].state not in ("FAULT", "STOP")

        if not any(could(p) for p in group.peers):
            return True
    return False


@settings(max_examples=2000, deadline=None)
@given(st.lists(INSTANCE, max_size=3, unique_by=lambda i: i.name), GROUP)
def test_release_agrees_with_the_invariant(local: list[InstanceFacts], group: Group | None) -> None:
    """The VIP is let go unless the peer link proves no peer can take an instance held here."""
    assert release(local, group, NOW).release is not oracle_keeps(local, group)


@settings(max_examples=2000, deadline=None)
@given(st.lists(INSTANCE, max_size=3, unique_by=lambda i: i.name), GROUP)
def test_an_orphan_is_held_by_nobody(local: list[InstanceFacts], group: Group | None) -> None:
    """An instance called orphaned is held neither here nor by any peer, all of them current."""
    for name in orphaned(local, group, NOW):
        assert group is not None and not group.silent and group.peers
        (mine,) = [i for i in local if i.name == name]
        assert not (mine.held or mine.state == "MASTER")
        for p in group.peers:
            assert NOW - p.answered <= CURRENT_FOR and p.instances
            assert not any((t.held or t.state == "MASTER") and same(t, mine) for t in p.instances)
            # a running keepalived that has not said the state may be MASTER
            assert not any(
                p.keepalived and t.state == "unknown" and same(t, mine) for t in p.instances
            )
