"""Resolving a split brain: the node VRRP would make BACKUP stands down. Pure; time comes in
as ``now`` (monotonic, this node's).

A split brain (``splitbrain``: one instance claimed by two nodes, confirmed for
``split_brain_after``) means VRRP between the nodes is cut while the peer link still works:
both nodes answer ARP for the VIP, and each client goes to whichever MAC it learnt last.
keepalived cannot end it (it cannot hear the peer). lbwatch can: the peer link proves what the
other node holds. So, for each instance of this node:

- **Stand down** (the instance put in FAULT through its track file, ``trackfile.FAULT``) when
  both nodes claim it and the rival confirmed its claim in an answer at least one
  advertisement interval and ``CONFIRM`` seconds after this node first saw both (or the split
  brain is declared: ``split_brain_after`` is for alerting, longer), the rival's view is
  current (its agent answered within ``handover.CURRENT_FOR``) and shows it serving
  (haproxy), running keepalived and holding the instance, and VRRP would make this node the
  BACKUP: its effective priority is lower (a drained instance's is 1), or equal and its VRRP
  source address lower (RFC 5798 6.4.3), or both equal and its name greater (a last, total
  order: two nodes never both lose).
- **Come back** (the track file back to what the drain says) when VRRP between the nodes works
  again (an advertisement from another node for the instance's virtual router was heard here
  since the stand-down: ``vrrpwire``), or the rival stops being healthy or holding it, or its
  view is not current any more (never standing down on a peer link that is down).
- **Announce** (on the node left holding the instance): a split brain that ended with this
  node still claiming the instance, when it was declared here or a rival left it by going to
  FAULT, as a node that stands down does (``to_announce``).
- **Never in a loop**: at most ``MAX_STANDS`` stand-downs per instance within ``WINDOW``
  seconds; past that, the split brain is left to the operator, and said once.

The rule is antisymmetric on what both nodes publish (priorities, drains, source addresses,
names), so two agents never both stand down for one instance; the property test checks it
over interleavings of views and delays.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from lbwatch.cluster.splitbrain import AGENT, MASTER, Conflict, Heard, Said
from lbwatch.handover import CURRENT_FOR
from lbwatch.heartbeat import vip_address
from lbwatch.statusdoc import NodeView

# Both claims seen for one advertisement interval and this much more, confirmed by an answer
# of the rival's: no failover's overlap lasts it (milliseconds; a node back on the network
# while VRRP works hears the MASTER's next advertisement within an interval and steps back),
# and a classic-timer cut is resolved within 5 s of it: 2.8 s for VRRP to make the second
# MASTER, 1.2 s, then the rival's next answer (its watch confirms once a second: up to 1 s).
CONFIRM = 0.2
MAX_STANDS = 3
WINDOW = 600.0  # seconds
# What decides who loses (both priorities, source addresses) must have been the same here for
# this long: longer than twice the age a current view's content may have (CURRENT_FOR since
# its last answer, plus the answer's trip) plus the time a stand-down takes to show in this
# node's view. Then the rival, if it decides at all, decides on the same values, and the
# rule's antisymmetry holds across the two agents: never both (tests/test_standdown.py).
STABLE = 3 * CURRENT_FOR
DRAINED_PRIORITY = 1  # what a drained instance runs at (trackfile.DRAINED, weight 1)
FAULT = "FAULT"


@dataclass(frozen=True)
class Standing:
    """This node stands down for ``instance`` in favour of ``rival`` since ``since``."""

    instance: str
    rival: str
    since: float
    why: str


@dataclass(frozen=True)
class Book:
    standing: dict[str, Standing] = field(default_factory=dict)
    history: dict[str, tuple[float, ...]] = field(default_factory=dict)  # stand-downs, by instance
    gave_up: frozenset[str] = frozenset()  # instances whose stand-downs ran out (said once)
    # (instance, rival) -> (what decides who loses, as seen now; since when it is so)
    seen: dict[tuple[str, str], tuple[tuple[object, ...], float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    book: Book
    said: tuple[Said, ...] = ()


def priority(view: NodeView, instance: str) -> int | None:
    """The priority keepalived runs ``instance`` with on ``view``'s node, as its agent says:
    keepalived.conf's, or 1 while drained there; None when unknown."""
    if instance in view.drained:
        return DRAINED_PRIORITY
    conf = view.keepalived_conf
    settings = conf.instances.get(instance) if conf is not None else None
    return settings.priority if settings is not None else None


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None


def terms(me: NodeView, rival: NodeView, instance: str) -> tuple[object, ...]:
    """What ``loses`` compares: both priorities, both source addresses, both names."""
    return (
        priority(me, instance),
        priority(rival, instance),
        me.sources.get(instance),
        rival.sources.get(instance),
        me.node,
        rival.node,
    )


def loses(me: NodeView, rival: NodeView, instance: str) -> bool | None:
    """Whether VRRP makes ``me`` the BACKUP of ``instance`` against ``rival``; None when the
    views do not tell (no priority on either side)."""
    mine, theirs = priority(me, instance), priority(rival, instance)
    if mine is None or theirs is None:
        return None
    if mine != theirs:
        return mine < theirs
    a, b = _address(me.sources.get(instance)), _address(rival.sources.get(instance))
    if a is not None and b is not None and a.version == b.version and a != b:
        return int(a) < int(b)
    return me.node > rival.node


def _holds(view: NodeView, instance: str, vips: frozenset[str]) -> bool:
    own = view.vrrp.get(instance)
    if own is not None and own.state == MASTER:
        return True
    return bool({vip_address(v) for i in view.vrrp.values() for v in i.held} & vips)


def healthy(view: NodeView) -> bool:
    return (
        view.haproxy.running
        and not view.haproxy.given_up
        and view.health != "down"
        and view.keepalived.running
    )


def _current(heard: Heard | None, now: float) -> NodeView | None:
    if heard is None or heard.by != AGENT or heard.view is None:
        return None
    return heard.view if now - heard.answered <= CURRENT_FOR else None


def decide(
    book: Book,
    me: NodeView,
    peers: Mapping[str, Heard],
    conflicts: Mapping[str, Conflict],
    vrrp_heard: Mapping[str, float],
    now: float,
) -> Decision:
    """``vrrp_heard``: per instance, when an advertisement from another node for its virtual
    router was last heard here (monotonic)."""
    standing = dict(book.standing)
    history = dict(book.history)
    gave_up = set(book.gave_up)
    seen = _seen(book, me, peers, now)
    said: list[Said] = []
    for name, inst in sorted(me.vrrp.items()):
        if name.startswith("group:"):
            continue
        vips = frozenset(vip_address(v) for v in inst.vips)
        stand = standing.get(name)
        if stand is not None:
            why = _ended(stand, peers, vrrp_heard, now, vips)
            if why:
                del standing[name]
                said.append(Said("split_brain_standdown_end", f"{why}: {name} back in VRRP"))
            continue
        conflict = conflicts.get(name)
        if conflict is None or not _confirmed(conflict, peers, _advert(me, name)):
            continue
        winner = _winner(me, conflict, peers, now, vips, seen)
        if winner is None:
            continue
        recent = tuple(t for t in history.get(name, ()) if t > now - WINDOW)
        history[name] = recent
        if len(recent) >= MAX_STANDS:
            if name not in gave_up:
                gave_up.add(name)
                said.append(Said("split_brain", _gave_up(name, len(recent))))
            continue
        rival_name, rival = winner
        why = (
            f"split brain on {name}: {rival_name} serves and holds it and VRRP makes it the "
            f"MASTER (priority {priority(rival, name)} against this node's "
            f"{priority(me, name)}); standing down here (the instance in FAULT) until VRRP "
            "between the nodes works again"
        )
        standing[name] = Standing(name, rival_name, now, why)
        history[name] = (*recent, now)
        said.append(Said("split_brain_standdown", why))
    quiet = {n for n in gave_up if n not in conflicts and not history.get(n)}
    return Decision(Book(standing, history, frozenset(gave_up - quiet), seen), tuple(said))


def _seen(
    book: Book, me: NodeView, peers: Mapping[str, Heard], now: float
) -> dict[tuple[str, str], tuple[tuple[object, ...], float]]:
    """The terms each rival would be compared on, and since when they are what they are."""
    out = {}
    for rival_name, heard in peers.items():
        rival = _current(heard, now)
        if rival is None:
            continue
        for name in me.vrrp:
            key = (name, rival_name)
            now_terms = terms(me, rival, name)
            old = book.seen.get(key)
            out[key] = old if old is not None and old[0] == now_terms else (now_terms, now)
    return out


def _advert(me: NodeView, instance: str) -> float:
    """The instance's advert_int here, as keepalived.conf has it (keepalived's default, 1 s)."""
    conf = me.keepalived_conf
    settings = conf.instances.get(instance) if conf is not None else None
    advert = settings.advert_int if settings is not None else None
    return advert if advert is not None and 0 < advert <= 255 else 1.0


def _confirmed(conflict: Conflict, peers: Mapping[str, Heard], advert: float) -> bool:
    """Declared, or a rival's answer came an advertisement interval and ``CONFIRM`` after
    both claims were first seen."""
    if conflict.declared:
        return True
    return any(
        h.answered >= conflict.since + advert + CONFIRM
        for name, h in peers.items()
        if name in conflict.nodes
    )


def _ended(
    stand: Standing,
    peers: Mapping[str, Heard],
    vrrp_heard: Mapping[str, float],
    now: float,
    vips: frozenset[str],
) -> str:
    """Why a stand-down ends now, or "" while it holds."""
    rival = _current(peers.get(stand.rival), now)
    if rival is None:
        return f"{stand.rival} cannot be asked any more"
    if not healthy(rival) or not _holds(rival, stand.instance, vips):
        return f"{stand.rival} no longer serves {stand.instance}"
    if vrrp_heard.get(stand.instance, -1.0) > stand.since:
        return "VRRP advertisements between the nodes arrive again"
    return ""


def _winner(
    me: NodeView,
    conflict: Conflict,
    peers: Mapping[str, Heard],
    now: float,
    vips: frozenset[str],
    seen: Mapping[tuple[str, str], tuple[tuple[object, ...], float]],
) -> tuple[str, NodeView] | None:
    """A rival in the split brain that serves, holds the instance, speaks now, and that VRRP
    makes the MASTER over this node, on terms that have been the same for ``STABLE``."""
    for name in conflict.nodes:
        if name == me.node:
            continue
        rival = _current(peers.get(name), now)
        if rival is None or not healthy(rival) or not _holds(rival, conflict.instance, vips):
            continue
        since = seen.get((conflict.instance, name))
        if since is None or now - since[1] < STABLE:
            continue
        if loses(me, rival, conflict.instance) is True:
            return name, rival
    return None


def _gave_up(name: str, count: int) -> str:
    return (
        f"split brain on {name} again after {count} stand-downs within {WINDOW:.0f} s: not "
        "standing down again (VRRP keeps failing between the nodes); resolve it by hand"
    )


def to_announce(
    before: Mapping[str, Conflict], after: Mapping[str, Conflict], peers: Mapping[str, Heard]
) -> list[Conflict]:
    """The split brains of ``before`` that ended in ``after`` and call for the gratuitous ARP
    of the node still holding the instance (the caller checks that this node does): one
    declared here, or one a rival left by going to FAULT, as its node does when it stands
    down. The stand-down comes an advertisement interval and ``CONFIRM`` after the loser saw
    both claims, before
    ``split_brain_after`` declares the split brain here: waiting for the declaration left the
    clients that learnt the loser's MAC stranded until keepalived's next refresh, if any
    (tests/e2e/test_lab_splitbrain.py). A rival that ends its claim otherwise (BACKUP once VRRP
    works, STOP) ends a short overlap: nothing to announce unless it was declared."""
    return [
        c
        for name, c in before.items()
        if name not in after and (c.declared or _left_by_fault(c, peers))
    ]


def _left_by_fault(conflict: Conflict, peers: Mapping[str, Heard]) -> bool:
    """A rival's agent shows the instance in FAULT, or says it stands down for it."""
    for name in conflict.nodes:
        heard = peers.get(name)
        view = heard.view if heard is not None and heard.by == AGENT else None
        if view is None:
            continue
        if conflict.instance in view.standing_down:
            return True
        inst = view.vrrp.get(conflict.instance)
        if inst is not None and inst.state == FAULT:
            return True
    return False


def instances(book: Book) -> frozenset[str]:
    return frozenset(book.standing)
