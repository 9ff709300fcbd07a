"""keepalived's settings here against each peer's, as the peers' agents last told this node's
(their node views, over the cluster watch; ``lbwatch.vrrpview`` builds them): the same
instance must have the same VRID, VIPs, advert_int, VRRP version and authentication on every
node, different priorities, not MASTER on both, and trackers whose weight can move the VIP.

A view from an older lbwatch lacks the newer fields: those are said not compared (a
warning), never a mismatch.
"""

from __future__ import annotations

from collections.abc import Iterator

from lbwatch.config import Config
from lbwatch.doctor.checks import Finding, error, ok, warn
from lbwatch.status import read_status
from lbwatch.statusdoc import TrackView, VrrpSettings

AREA = "keepalived"
TOP = 254  # keepalived caps a tracked priority at 254 and floors it at 1 (2.2 vrrp_track.c)


def peer_vrrp(cfg: Config) -> Iterator[Finding]:
    """This node's settings (as its agent publishes them) against each peer's view."""
    if not cfg.sync.peers or not cfg.cluster.watch:
        return
    read = read_status(cfg.agent.run_dir)
    doc = read.data
    if not read.agent_running or doc is None:
        yield warn(
            AREA,
            "lbwatch is not running here: keepalived's settings are not compared with the peers'",
            "start lbwatch, then run doctor again",
        )
        return
    mine = doc.keepalived_conf
    if mine is None or mine.error:
        return  # said by the keepalived check
    for name, peer in sorted((doc.cluster.peers if doc.cluster else {}).items()):
        theirs = peer.view.keepalived_conf if peer.view is not None else None
        if peer.state != "up" or theirs is None or theirs.error:
            why = peer.reason or (theirs.error if theirs else "") or "no keepalived settings"
            yield warn(
                AREA,
                f"keepalived's settings not compared with {name}: {peer.state} ({why})",
                f"see `lbwatch status --cluster`; upgrade lbwatch on {name} if it is older",
            )
            continue
        yield from compare(doc.agent.node, mine.instances, name, theirs.instances)


def compare(
    me: str, mine: dict[str, VrrpSettings], peer: str, theirs: dict[str, VrrpSettings]
) -> Iterator[Finding]:
    for inst, a in sorted(mine.items()):
        b = theirs.get(inst)
        if b is None:
            yield warn(AREA, f"{inst} is not in {peer}'s keepalived.conf", "name it alike there")
            continue
        found = [*_basics(inst, me, a, peer, b), *_identity(inst, me, a, peer, b)]
        found += _tracks(inst, a, peer, b)
        yield from found
        if not any(f.level == "error" for f in found):
            yield ok(AREA, f"{inst}: settings agree with {peer}'s (priorities differ)")


def _basics(inst: str, me: str, a: VrrpSettings, peer: str, b: VrrpSettings) -> Iterator[Finding]:
    if a.priority is not None and a.priority == b.priority:
        yield error(
            AREA,
            f"{inst} has priority {a.priority} on both {me} and {peer}: which node is "
            "MASTER is then left to their IP addresses",
            "give each node its own priority (the preferred MASTER the highest)",
        )
    for what, x, y in (  # keepalived's defaults: advert_int 1, VRRP version 2
        ("advert_int", a.advert_int or 1.0, b.advert_int or 1.0),
        ("VRRP version", a.version or 2, b.version or 2),
    ):
        if x != y:
            yield error(
                AREA,
                f"{inst}: {what} is {x:g} on {me} and {y:g} on {peer}: keepalived drops "
                "the other's advertisements",
                f"set the same {what} on every node",
            )
    if a.state == "MASTER" and b.state == "MASTER":
        yield error(
            AREA,
            f"{inst} is `state MASTER` on both {me} and {peer}: both take the VIP at once "
            "whenever they start together",
            "set `state BACKUP` on both and let the priorities choose",
        )


def _identity(inst: str, me: str, a: VrrpSettings, peer: str, b: VrrpSettings) -> Iterator[Finding]:
    """VRID, VIPs and authentication: any difference and the two never form one virtual
    router (each drops or ignores the other's advertisements), so both are MASTER."""
    for side, s, fix in ((me, a, "restart lbwatch here"), (peer, b, f"upgrade lbwatch on {peer}")):
        if s.vrid is None or s.vips is None or s.auth is None:
            yield warn(
                AREA,
                f"{inst}: VRID, VIPs and authentication cannot be compared with {peer}: "
                f"{side}'s lbwatch does not publish them (older than this doctor)",
                fix,
            )
            return
    assert a.vips is not None and b.vips is not None and a.auth is not None
    assert b.auth is not None
    both = "both become MASTER"
    if a.vrid != b.vrid:
        yield error(
            AREA,
            f"{inst}: virtual_router_id is {a.vrid} on {me} and {b.vrid} on {peer}: they are "
            f"two virtual routers, {both}",
            "set the same virtual_router_id on every node",
        )
    if sorted(a.vips) != sorted(b.vips):
        yield error(
            AREA,
            f"{inst}: VIPs are {', '.join(a.vips) or 'none'} on {me} and "
            f"{', '.join(b.vips) or 'none'} on {peer}: a failover moves other addresses",
            "set the same virtual_ipaddress on every node",
        )
    if a.auth.type != b.auth.type:
        yield error(
            AREA,
            f"{inst}: authentication is {a.auth.type or 'none'} on {me} and "
            f"{b.auth.type or 'none'} on {peer}: keepalived drops the other's advertisements, "
            f"{both}",
            "use the same authentication block on every node (or none)",
        )
    elif a.auth.check != b.auth.check:
        yield error(
            AREA,
            f"{inst}: auth_pass differs between {me} and {peer} (compared by an 8-bit check, "
            f"never sent): keepalived drops the other's advertisements, {both}",
            "set the same auth_pass (at most 8 characters) on every node",
        )


def _tracks(inst: str, a: VrrpSettings, peer: str, b: VrrpSettings) -> Iterator[Finding]:
    if a.priority is None or b.priority is None:
        return
    for t in a.tracks or []:
        if t.kind == "file":
            continue  # the file's value scales the weight: lbwatch's writes -253 (trackfile)
        said = stuck(a.priority, b.priority, t.weight)
        if said is not None:
            yield warn(AREA, f"{inst}: {_name(t)} cannot move the VIP: priority {a.priority} "
                       f"here, {b.priority} on {peer}: {said[0]}", said[1])  # fmt: skip


def _name(t: TrackView) -> str:
    return f"track_{t.kind} {t.name} (weight {t.weight})"


def _cap(prio: int) -> int:
    return max(1, min(TOP, prio))


def stuck(mine: int, theirs: int, weight: int) -> tuple[str, str] | None:
    """Why a tracker of ``weight`` on this node (priority ``mine``, the peer's ``theirs``) can
    never change which node is MASTER, and the fix; None when it can (or it does not apply).

    The rule, with keepalived's tracked priority capped to 1..254 and the peer tracking the
    same thing with the same weight (a pair's configs mirror each other):
    - weight 0: the tracker's failure puts the instance into FAULT, which gives the VIP up
      whatever the priorities: it always can;
    - negative: the failure here must take this node below the peer, min/max-capped
      ``mine + weight < theirs``; it is checked where this node is the higher (where it is
      the lower, a failure cannot make it MASTER and there is nothing to move); equal is a
      tie the higher IP address breaks, so not enough either;
    - positive: the healthy node keeps the bonus and the failed one loses it, so the lower
      node's ``lower + weight`` (capped) must exceed the higher's base priority; and with both
      healthy the two capped priorities must still differ (254 + 5 and 253 + 5 are both 254).
    """
    if weight == 0 or mine == theirs:
        return None  # equal priorities are an error of their own
    hi, lo = max(mine, theirs), min(mine, theirs)
    gap = hi - lo
    if weight < 0:
        if mine < theirs:
            return None
        after = _cap(mine + weight)
        if after >= theirs:
            how = "ties with" if after == theirs else "stays above"
            return (
                f"a failure leaves {after}, which {how} the peer's {theirs}",
                f"weight -{gap + 1} or lower (beyond the gap of {gap}), or 0 to go FAULT",
            )
        return None
    if _cap(mine + weight) == _cap(theirs + weight):
        return (
            f"with both healthy both are at {TOP} (keepalived caps there): the higher IP "
            "address is MASTER",
            f"use a negative weight, -{gap + 1} or lower, or 0 to go FAULT",
        )
    if _cap(lo + weight) <= hi:
        return (
            f"a failure on the higher node leaves its {hi}, the other has {_cap(lo + weight)}",
            f"weight {gap + 1} or more (beyond the gap of {gap}), or 0 to go FAULT",
        )
    return None
