"""Who can take a VRRP instance over: the pair decides together. Pure; time comes in as ``now``
(monotonic, this node's).

lbwatch stops keepalived when haproxy is down so that the VIP moves to a peer. That is right
only while some peer can serve it: with the peer's haproxy down too, or its keepalived
stopped, the VIP would go to nobody (a BACKUP with no keepalived cannot take it), and when the
haproxy here heals, keepalived must start again and win an election (3 x advert_int + skew)
before anyone serves. Doing nothing costs only the time haproxy takes to heal.

So, for each instance this node holds (its VIP is here, or keepalived said MASTER), keepalived
is kept running only when the peer link proves that no peer can take it over: every configured
peer answered within ``CURRENT_FOR`` seconds through its agent, and each is unable (``unable``).
A peer that cannot be asked (link down, its agent stopped), or whose view does not say (no
VRRP state reported), may be able: then lbwatch acts as it did alone, and lets the VIP go.
This node never keeps a VIP on a guess.

The converse: when the peer link proves that no node holds one of this node's instances
(``orphaned``), the instance has no holder to wait for, and keepalived is started as soon as
haproxy answers one probe, without ``keepalived_start_delay``.

Who speaks here, and what it can make this node do: each peer's view comes from the peer's
agent through its receiver (root there, reached over the sync key's ssh session,
``cluster.watch``), and counts only while that agent's heartbeat is renewed. A peer's view can
only (1) keep keepalived running here beside a haproxy that cannot serve, by saying that it
cannot take the VIP (its haproxy down, its keepalived stopped, paused, the instance in FAULT or
STOP or absent there): said at once, shown as ``VIP KEPT`` and mailed after
``kept_alert_after``, and ended by haproxy here healing or the view lapsing; and (2) start
keepalived here at haproxy's first passing probe, by saying that it holds nothing. Neither is
more than root on a peer can do through VRRP itself (an advertisement at priority 254 takes
the VIP), so the view is trusted as far as the peer's keepalived is. A view that says nothing
of its VRRP state counts as "may be able" and "may hold": the node acts as it did alone.

Instances are matched across nodes as split-brain detection matches them (``cluster.splitbrain``):
by a shared VIP address, or by name where one of them states no VIPs; the same name with VIPs
that share none is another VRRP group's instance (two pairs syncing one haproxy config).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lbwatch.events import Group, InstanceFacts, PeerFacts

# Seconds after its last answer that a peer's view still counts. The watch's long poll
# answers at least once a second (``cluster.watch.HEARTBEAT``) and the peer's receiver answers
# for the view only while its agent's loop renews the heartbeat (``heartbeat.STALE_AFTER``):
# three missed answers, and the peer is one this node cannot ask.
CURRENT_FOR = 3.0
UNABLE_STATES = frozenset({"FAULT", "STOP"})


@dataclass(frozen=True)
class Verdict:
    """Whether keepalived may be stopped here (``release``), and the sentence that says why
    not: which instance this node keeps and what each peer lacks."""

    release: bool
    why: str = ""


def current(peer: PeerFacts, now: float) -> bool:
    return now - peer.answered <= CURRENT_FOR


def related(theirs: InstanceFacts, inst: InstanceFacts) -> bool:
    """Whether a peer's instance ``theirs`` is ``inst`` there: a shared VIP, or the same name
    where either states no VIPs."""
    if theirs.vips & inst.vips:
        return True
    return theirs.name == inst.name and (not theirs.vips or not inst.vips)


def match(peer: PeerFacts, inst: InstanceFacts) -> InstanceFacts | None:
    """The peer's instance that is ``inst`` there, the one of the same name first."""
    found = [t for t in peer.instances if related(t, inst)]
    return next((t for t in found if t.name == inst.name), found[0] if found else None)


def unable(peer: PeerFacts, inst: InstanceFacts) -> str:
    """Why ``peer`` (current) cannot take ``inst`` over, as its view proves; "" when it can, or
    when its view does not tell (then it may)."""
    if not peer.serving:
        return "haproxy not serving"
    if not peer.keepalived:
        return "keepalived not running"
    if peer.paused:
        return "paused"
    if not peer.instances:
        return ""  # it reports no VRRP state: it may well be able
    theirs = match(peer, inst)
    if theirs is None:
        return f"no instance of {inst.name} there"
    if theirs.state in UNABLE_STATES:
        return f"{theirs.name} in {theirs.state}"
    # Drained there is no reason: a drained instance is a healthy BACKUP at priority 1
    # (``trackfile.DRAINED``), and once keepalived here stops it is the highest priority left
    # and takes the VIP. Drained is the operator's "not from here while another can"; it is
    # for `lbwatch drain` to weigh (a second node is not drained), not for this decision.
    return ""


def release(local: Iterable[InstanceFacts], group: Group | None, now: float) -> Verdict:
    """Whether keepalived may be stopped on this node, whose haproxy cannot serve: yes, unless
    the peer link proves that some instance this node holds has no peer able to take it. The
    sentence says what it rests on."""
    if group is None:
        return Verdict(True)  # no peers watched: lbwatch acts alone, as it always did
    said = []
    for inst in local:
        if not inst.holds:
            continue
        stale = [*group.silent, *(p.node for p in group.peers if not current(p, now))]
        if stale or not group.peers:
            # A peer that cannot be asked may be able: acting alone, as without peers.
            return Verdict(True, f"{', '.join(stale) or 'no peer'} cannot be asked")
        reasons = [(p.node, unable(p, inst)) for p in group.peers]
        able = [node for node, why in reasons if not why]
        if not able:
            lacks = ", ".join(f"{node}: {why}" for node, why in reasons)
            return Verdict(False, f"no peer can take {_what(inst)} over ({lacks})")
        said.append(f"{able[0]} can take {inst.name} over")
    return Verdict(True, "; ".join(said))


def orphaned(local: Iterable[InstanceFacts], group: Group | None, now: float) -> tuple[str, ...]:
    """The instances of this node that, as the peer link proves, no node holds: every peer
    answered in time through its agent, reports its VRRP state, and holds none of them (its
    keepalived stopped, or the state keepalived reported there neither MASTER nor unknown,
    and the VIP not on the node)."""
    if group is None or group.silent or not group.peers:
        return ()
    if any(not current(p, now) or not p.instances for p in group.peers):
        return ()
    out = []
    for inst in local:
        if inst.holds:
            continue
        if not any(_may_hold(p, t) and related(t, inst) for p in group.peers for t in p.instances):
            out.append(inst.name)
    return tuple(out)


def _may_hold(peer: PeerFacts, theirs: InstanceFacts) -> bool:
    """Whether ``peer`` may hold its instance ``theirs``: it does (``holds``), or its keepalived
    runs and has not said the instance's state ("unknown": a view that names the instance
    from keepalived.conf alone, its VIPs not measured, proves nothing)."""
    return theirs.holds or (peer.keepalived and theirs.state == "unknown")


def lapses(group: Group | None, now: float) -> list[float]:
    """When each peer's view stops being current (for the policy's wake-up)."""
    if group is None:
        return []
    return [p.answered + CURRENT_FOR for p in group.peers if current(p, now)]


def _what(inst: InstanceFacts) -> str:
    vips = f" (VIP {', '.join(sorted(inst.vips))})" if inst.vips else ""
    return f"{inst.name}{vips}"
