"""Resolving a split brain (``cluster.standdown``): tables, and a property over two agents
whose views of each other arrive late and out of step, checked by an oracle that knows only
the global truth: the two nodes never both stand down for one instance."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.cluster import standdown
from lbwatch.cluster.splitbrain import AGENT, KERNEL, By, Conflict, Heard
from lbwatch.cluster.standdown import MAX_STANDS, STABLE, Book, decide, loses
from lbwatch.handover import CURRENT_FOR
from lbwatch.statusdoc import (
    KeepalivedConfView,
    NodeAgent,
    NodeService,
    NodeView,
    VipsView,
    VrrpSettings,
)

VIP = "192.0.2.100"


def view(
    node: str,
    prio: int,
    holds: bool = True,
    serving: bool = True,
    drained: bool = False,
    source: str = "",
) -> NodeView:
    state = "MASTER" if holds else "FAULT"
    return NodeView(
        node=node,
        agent=NodeAgent(pid=1, start_ticks=1, version="t"),
        haproxy=NodeService(running=serving),
        keepalived=NodeService(running=True),
        health="up" if serving else "down",
        vrrp={"VI_1": VipsView(state=state, vips=[VIP], held=[VIP] if holds else [])},
        keepalived_conf=KeepalivedConfView(
            path="k", instances={"VI_1": VrrpSettings(priority=prio, vips=[VIP])}
        ),
        drained=["VI_1"] if drained else [],
        sources={"VI_1": source} if source else {},
    )


def split(declared: bool = True, since: float = 0.0) -> dict[str, Conflict]:
    """Both nodes claim VI_1, seen here first at ``since``."""
    return {"VI_1": Conflict("VI_1", ("lb1", "lb2"), (VIP,), since, 0.0, declared=declared)}


LB1, LB2 = view("lb1", 254), view("lb2", 253)


def settled(me: NodeView, rival: NodeView, at: float = 100.0) -> Book:
    """A book that has seen these terms since long before ``at``."""
    first = decide(Book(), me, {rival.node: Heard(rival, AGENT, at - STABLE - 1)}, {}, {},
                   at - STABLE - 1)  # fmt: skip
    return first.book


def test_the_lower_priority_stands_down_the_higher_never() -> None:
    """lb2 (253) stands down for lb1 (254); lb1, deciding on the same views, does not."""
    t = 100.0
    lb2 = decide(settled(LB2, LB1, t), LB2, {"lb1": Heard(LB1, AGENT, t)}, split(), {}, t)
    assert standdown.instances(lb2.book) == {"VI_1"}
    (said,) = lb2.said
    assert said.kind == "split_brain_standdown"
    assert "lb1 serves and holds it" in said.text and "priority 254 against this node's 253"
    lb1 = decide(settled(LB1, LB2, t), LB1, {"lb2": Heard(LB2, AGENT, t)}, split(), {}, t)
    assert standdown.instances(lb1.book) == frozenset()


def test_no_stand_down_without_each_condition() -> None:
    """Both claims not yet confirmed an interval and 0.2 s on (nor declared), the rival
    silent, its view old, its haproxy down, it not holding, or the terms new: nothing; the
    control, all of them: a stand-down. Confirmed without being declared is enough."""
    t = 100.0
    book = settled(LB2, LB1, t)

    def stands(heard: Heard, conflicts: dict[str, Conflict], b: Book = book) -> bool:
        return bool(standdown.instances(decide(b, LB2, {"lb1": heard}, conflicts, {}, t).book))

    assert stands(Heard(LB1, AGENT, t), split())  # the positive control
    # advert_int 1 s (keepalived's default: the views say none) and CONFIRM: 1.2 s
    assert not stands(Heard(LB1, AGENT, t), split(declared=False, since=t - 1.1))
    assert stands(Heard(LB1, AGENT, t), split(declared=False, since=t - 1.2))
    assert not stands(Heard(LB1, KERNEL, t, kernel=frozenset({VIP})), split())
    assert not stands(Heard(LB1, AGENT, t - CURRENT_FOR - 0.1), split())
    assert not stands(Heard(view("lb1", 254, serving=False), AGENT, t), split())
    assert not stands(Heard(view("lb1", 254, holds=False), AGENT, t), split())
    assert not stands(Heard(LB1, AGENT, t), split(), Book())  # terms seen just now


def test_ties_go_as_vrrp_breaks_them() -> None:
    """Equal priorities: the lower source address loses; a drained instance runs at 1."""
    a, b = view("lb1", 200, source="192.0.2.11"), view("lb2", 200, source="192.0.2.12")
    assert loses(a, b, "VI_1") is True and loses(b, a, "VI_1") is False
    drained = view("lb1", 254, drained=True)
    assert loses(drained, LB2, "VI_1") is True and loses(LB2, drained, "VI_1") is False
    unknown = LB1.model_copy(update={"keepalived_conf": None})
    assert loses(unknown, LB2, "VI_1") is None


def test_back_when_vrrp_works_again_or_the_rival_fails() -> None:
    """Each end, and the line that says which."""
    t = 100.0
    down = decide(settled(LB2, LB1, t), LB2, {"lb1": Heard(LB1, AGENT, t)}, split(), {}, t).book
    later = t + 5

    def end(heard: Heard, vrrp: dict[str, float]) -> str:
        d = decide(down, view("lb2", 253, holds=False), {"lb1": heard}, {}, vrrp, later)
        if standdown.instances(d.book):
            return ""
        (said,) = d.said
        return said.text

    assert end(Heard(LB1, AGENT, later), {}) == ""  # the cut goes on: standing down
    assert end(Heard(LB1, AGENT, later), {"VI_1": t - 1}) == ""  # heard before: no news
    assert "advertisements between the nodes arrive again" in end(
        Heard(LB1, AGENT, later), {"VI_1": t + 1}
    )
    assert "lb1 no longer serves VI_1" in end(Heard(view("lb1", 254, serving=False), AGENT,
                                                     later), {})  # fmt: skip
    assert "lb1 cannot be asked any more" in end(Heard(None, KERNEL, later), {})


def test_never_in_a_loop() -> None:
    """After MAX_STANDS stand-downs within the window, no more: said once, as a split brain."""
    t = 100.0
    book = settled(LB2, LB1, t)
    said = []
    for i in range(MAX_STANDS + 2):
        now = t + i * 20
        d = decide(book, LB2, {"lb1": Heard(LB1, AGENT, now)}, split(), {}, now)
        said += list(d.said)
        healed = decide(d.book, LB2, {"lb1": Heard(LB1, AGENT, now + 1)}, {}, {"VI_1": now + 1},
                        now + 1)  # fmt: skip
        book = healed.book
    stands = [s for s in said if s.kind == "split_brain_standdown"]
    gave_up = [s for s in said if s.kind == "split_brain"]
    assert len(stands) == MAX_STANDS and len(gave_up) == 1
    assert "resolve it by hand" in gave_up[0].text


def test_the_node_left_holding_it_announces_after_a_stand_down() -> None:
    """A split brain that ended with the rival in FAULT, as a node that stood down is (before
    the split brain was declared on this side: the stand-down comes a second after both
    claims), is announced, as is one declared here that ended any way; an undeclared one the
    rival left by BACKUP or STOP (a failover's overlap), one still going, or a rival whose
    agent cannot speak for its state: not."""

    def rival(state: str, by: By = AGENT) -> dict[str, Heard]:
        v = LB2.model_copy(update={"vrrp": {"VI_1": VipsView(state=state, vips=[VIP])}})
        return {"lb2": Heard(v if by == AGENT else None, by, 100.0)}

    def announced(before: dict[str, Conflict], state: str, by: By = AGENT) -> list[str]:
        return [c.instance for c in standdown.to_announce(before, {}, rival(state, by))]

    assert announced(split(declared=False), "FAULT") == ["VI_1"]
    assert announced(split(declared=True), "BACKUP") == ["VI_1"]
    assert announced(split(declared=True), "FAULT") == ["VI_1"]
    assert announced(split(declared=False), "BACKUP") == []
    assert announced(split(declared=False), "STOP") == []
    assert announced(split(declared=False), "FAULT", KERNEL) == []
    assert standdown.to_announce(split(False), split(False), rival("FAULT")) == []


# ---------------------------------------------------------------------------------------------
# Two agents, their views of each other late and out of step.

LAG = 0.5  # the longest trip of an answer (the content's age when it arrives)


@dataclass
class Node:
    name: str
    prio: int
    source: str
    serving: bool = True
    drained: bool = False
    book: Book = field(default_factory=Book)
    published: list[tuple[float, NodeView]] = field(default_factory=list)
    heard: Heard = field(default_factory=lambda: Heard(None, "nobody"))
    heard_as_of: float = 0.0  # when the content last delivered was the rival's view

    @property
    def standing(self) -> bool:
        return bool(standdown.instances(self.book))

    def view(self) -> NodeView:
        # VRRP is cut all along: a node that does not stand down is MASTER.
        return view(self.name, self.prio, not self.standing, self.serving, self.drained,
                    self.source)  # fmt: skip

    def publish(self, now: float) -> None:
        v = self.view()
        if not self.published or self.published[-1][1] != v:
            self.published.append((now, v))

    def as_of(self, t: float) -> NodeView | None:
        older = [v for at, v in self.published if at <= t]
        return older[-1] if older else None


STEP = st.one_of(
    st.tuples(st.just("advance"), st.just(0), st.floats(0.05, 4.0)),
    st.tuples(st.just("prio"), st.sampled_from([0, 1]), st.sampled_from([100, 200, 253, 254])),
    st.tuples(st.just("drain"), st.sampled_from([0, 1]), st.booleans()),
    st.tuples(st.just("serve"), st.sampled_from([0, 1]), st.booleans()),
    st.tuples(st.just("deliver"), st.sampled_from([0, 1]), st.floats(0.0, LAG)),
    st.tuples(st.just("decide"), st.sampled_from([0, 1]), st.just(0)),
)


@settings(max_examples=600, deadline=None)
@given(
    st.lists(STEP, min_size=5, max_size=120),
    st.sampled_from([200, 253, 254]),
    st.sampled_from([200, 253, 254]),
)
def test_two_agents_never_both_stand_down(steps: list[tuple], p1: int, p2: int) -> None:
    """Whatever the order of views, their delays (up to LAG), priority and drain changes and
    haproxy failures: at no moment do both nodes stand down for VI_1."""
    nodes = [Node("lb1", p1, "192.0.2.11"), Node("lb2", p2, "192.0.2.12")]
    now = 0.0
    for n in nodes:
        n.publish(now)
    for kind, who, arg in steps:
        me, other = nodes[who], nodes[1 - who]
        if kind == "advance":
            now += arg
        elif kind == "prio":
            me.prio = arg
        elif kind == "drain":
            me.drained = arg
        elif kind == "serve":
            me.serving = arg
        elif kind == "deliver":
            # In order, as the watch's long poll delivers: never older than the last.
            me.heard_as_of = max(now - arg, me.heard_as_of)
            me.heard = Heard(other.as_of(me.heard_as_of), AGENT, now)
        else:
            rival = me.heard.view
            # Split brain as this node sees it: it claims VI_1 and its view of the rival does.
            claims = not me.standing and rival is not None and rival.vrrp["VI_1"].held != []
            conflicts = {"VI_1": Conflict("VI_1", ("lb1", "lb2"), (VIP,), 0, 0, True)}
            me.book = decide(me.book, me.view(), {other.name: me.heard},
                             conflicts if claims else {}, {}, now).book  # fmt: skip
        for n in nodes:
            n.publish(now)
        # The oracle: the global truth at this instant.
        assert not (nodes[0].standing and nodes[1].standing), (now, p1, p2)


def test_a_priority_changed_in_flight_never_makes_both_stand_down() -> None:
    """The race the stability rule closes: lb2's priority drops below lb1's while lb1 still
    sees the old one. lb1 (older terms, settled) stands down; lb2 (terms just changed) waits,
    then sees lb1 no longer holding, and never stands down."""
    t = 100.0
    a, b = view("lb1", 253), view("lb2", 254)
    book_a, book_b = settled(a, b, t), settled(b, a, t)
    b = view("lb2", 200)  # an operator's edit on lb2, not yet seen by lb1
    da = decide(book_a, a, {"lb2": Heard(view("lb2", 254), AGENT, t)}, split(), {}, t)
    db = decide(book_b, b, {"lb1": Heard(a, AGENT, t)}, split(), {}, t)
    assert standdown.instances(da.book) == {"VI_1"}  # lb1, on the old terms
    assert standdown.instances(db.book) == frozenset()  # lb2 waits: its terms are new
    faulted = view("lb1", 253, holds=False)
    for dt in (1.0, 5.0, STABLE + 1):
        db = decide(db.book, b, {"lb1": Heard(faulted, AGENT, t + dt)}, split(), {}, t + dt)
        assert standdown.instances(db.book) == frozenset()
