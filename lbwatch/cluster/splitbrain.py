"""Split brain: one VRRP instance claimed by two nodes at once. Pure; time comes in as ``now``
(monotonic, this node's) and ``wall`` (for reading only).

A node claims an instance when keepalived reported it MASTER there, or when any of the
instance's VIPs (as this node's config names them) sits on its interfaces: the VIPs are measured,
the state is what keepalived last said. Instances are matched by name for the state and by
address for the VIPs, so a peer whose instance has another name still counts when it holds the
address; one of the same name whose configured VIPs share none with this node's is another VRRP
group's (two pairs syncing one haproxy config), and its MASTER is no claim.

The evidence for a peer's claim, by who can speak for it at its last answer (``Heard.by``):
- ``AGENT``: its agent, in a current view (its receiver vouched that the agent runs and renewed
  its heartbeat within ``heartbeat.STALE_AFTER``): MASTER as keepalived told the agent, or a VIP
  the agent saw on its interfaces, as above.
- ``KERNEL``: its agent cannot speak (it has ended, or is stopped or hung), so nothing of its
  view counts, neither the MASTER nor the VIPs it last saw: only the VIPs its kernel holds, as
  its receiver (a process of its own) read them when it answered. A node whose kernel holds the
  VIP claims it, whatever its agent last said; keepalived's MASTER is the agent's word, and
  counts only from a current view. (A MASTER without its VIP is then missed: that is the price
  of not taking a stopped agent's word.)
- ``NOBODY``: it cannot be asked (unreachable, no view): nothing is known of its claim.

The rules, for each instance of this node:
- It is a split brain when this node claims it and a peer claims it too (on the evidence above),
  and a peer confirmed that claim (an answer of its cluster watch, received here) at least
  ``after`` seconds after this node first saw both claims. An answer is the peer saying what it
  holds *at that moment*: so a view that has gone stale (a peer that lost power while holding
  the VIP, just before this node took it over) never makes a split brain, whatever the timing;
  nor does the last view of a stopped agent, which its receiver serves as current for at most
  ``STALE_AFTER`` (and a tenth of a second) after the agent's last renewal: less than the
  shortest ``after`` allowed (``config.SPLIT_BRAIN_FLOOR``).
- This node alerts only for instances it claims itself; the other claimant alerts on its side.
- It ends when this node no longer claims it, or when every other claimant answers that it no
  longer does. While a claimant cannot be asked, nothing is concluded: the split brain stays,
  with what it waits for.
- Once it ends after having been declared, one message says who holds the VIP: the node that
  still claims it says so; when no node does, the first of the former claimants by name. A
  node that lets go while another still claims it keeps the split brain until that claim is
  confirmed ``after`` seconds later (that node then says it holds it), so that two nodes letting
  go a moment apart, each having seen the other still claim it, still end it with a message.
  A claim that ends before ``after`` (the usual overlap of a failover) says nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from lbwatch.heartbeat import vip_address
from lbwatch.statusdoc import NodeView, SplitBrainView

MASTER = "MASTER"
By = Literal["agent", "kernel", "nobody"]  # who speaks for a peer (``Heard.by``)
AGENT: By = "agent"
KERNEL: By = "kernel"
NOBODY: By = "nobody"


@dataclass(frozen=True)
class Heard:
    """A peer as its cluster watch last heard it, and who spoke for it then (see the module's
    docstring): its agent, in ``view`` (current: its last answer came and the connection
    stands); its kernel, the VIP addresses in ``kernel``; or nobody. ``answered``: when that
    answer came (this node's monotonic clock)."""

    view: NodeView | None
    by: By
    answered: float = 0.0
    reason: str = ""
    kernel: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Conflict:
    instance: str
    nodes: tuple[str, ...]  # every node claiming it, this one included, by name
    vips: tuple[str, ...]
    since: float  # monotonic
    since_wall: float
    declared: bool = False
    waiting: str = ""
    # When this node let go of it while another still claimed it (monotonic), or None.
    let_go: float | None = None


@dataclass(frozen=True)
class Said:
    kind: str  # the alert's kind: "split_brain" or "split_brain_resolved"
    text: str


@dataclass(frozen=True)
class Decision:
    state: dict[str, Conflict] = field(default_factory=dict)
    said: tuple[Said, ...] = ()


def claims(view: NodeView, instance: str, vips: frozenset[str]) -> bool:
    """Whether ``view``'s node claims ``instance`` (whose VIPs, as this node knows them, are
    ``vips``, addresses only)."""
    own = view.vrrp.get(instance)
    if own is not None and own.state == MASTER:
        theirs = {vip_address(v) for v in own.vips}
        # The same name for VIPs that share none with these: another VRRP group's instance
        # (two pairs that sync one haproxy config, each with keepalived's usual "VI_1").
        if not (theirs and vips and not theirs & vips):
            return True
    held = {vip_address(v) for inst in view.vrrp.values() for v in inst.held}
    return bool(held & vips)


def speaks(heard: Heard) -> bool:
    """Whether anything is known of what the peer claims now."""
    return heard.by == KERNEL or (heard.by == AGENT and heard.view is not None)


def claimed(heard: Heard, instance: str, vips: frozenset[str]) -> bool:
    """Whether the peer claims ``instance`` on admissible evidence: its agent's current view, or
    its kernel's addresses while its agent cannot speak; never a view that is not current."""
    if heard.by == AGENT:
        return heard.view is not None and claims(heard.view, instance, vips)
    return heard.by == KERNEL and bool(heard.kernel & vips)


def decide(
    state: Mapping[str, Conflict],
    me: NodeView,
    peers: Mapping[str, Heard],
    now: float,
    wall: float,
    after: float,
) -> Decision:
    out: dict[str, Conflict] = {}
    said: list[Said] = []
    for name, inst in sorted(me.vrrp.items()):
        if name.startswith("group:"):
            continue
        vips = frozenset(vip_address(v) for v in inst.vips)
        mine = claims(me, name, vips)
        current = {p: h for p, h in peers.items() if speaks(h)}
        rivals = sorted(p for p, h in current.items() if claimed(h, name, vips))
        old = state.get(name)
        shown = tuple(sorted({*inst.vips}))
        if mine and rivals:
            nodes = tuple(sorted({me.node, *rivals}))
            new = old or Conflict(name, nodes, shown, now, wall)
            new = replace(new, nodes=tuple(sorted({*new.nodes, *nodes})), waiting="", let_go=None)
            confirmed = any(peers[p].answered >= new.since + after for p in rivals)
            if not new.declared and confirmed:
                new = replace(new, declared=True)
                by_kernel = [p for p in rivals if peers[p].by == KERNEL]
                said.append(Said("split_brain", _declared(new, now, by_kernel)))
            out[name] = new
            continue
        if old is None or not old.declared:
            # An overlap not declared ends here; one whose claimant could not be asked starts
            # over with its next answer (what it claimed meanwhile is unknown).
            continue
        silent = [p for p in old.nodes if p != me.node and p not in current]
        if mine and silent:
            # It may still be claimed there: nothing is concluded until that node answers.
            out[name] = replace(old, waiting=f"{', '.join(silent)} cannot be asked")
            continue
        if mine:
            said.append(Said("split_brain_resolved", _resolved(old, me.node, now)))
            continue
        if rivals:
            # This node let go, another still claims it as last heard: that one says it holds
            # it once it hears this node let go, which a claim it confirms ``after`` seconds on
            # shows. Until then it may be letting go too, having seen this node still claim it
            # (both a moment apart): kept, so that "no node holds" is still said.
            let_go = now if old.let_go is None else old.let_go
            if not any(peers[p].answered >= let_go + after for p in rivals):
                waiting = f"let go here; {', '.join(rivals)} still claiming"
                out[name] = replace(old, let_go=let_go, waiting=waiting)
            continue
        if not silent and me.node == old.nodes[0]:
            said.append(Said("split_brain_resolved", _resolved(old, None, now)))
    return Decision(out, tuple(said))


def _what(c: Conflict) -> str:
    vips = f" (VIP {', '.join(c.vips)})" if c.vips else ""
    return f"{c.instance}{vips}"


def _declared(c: Conflict, now: float, by_kernel: list[str]) -> str:
    """``by_kernel``: the claimants whose agents cannot speak (their kernels' VIPs said it)."""
    text = (
        f"split brain: {_what(c)} is claimed by {' and '.join(c.nodes)} at once, for "
        f"{now - c.since:.0f} s; VRRP between them is cut (advertisements not arriving) "
        "while the nodes still reach each other"
    )
    if by_kernel:
        text += f" ({' and '.join(by_kernel)}: agent not answering, the VIP is on its interfaces)"
    return text


def _resolved(c: Conflict, holder: str | None, now: float) -> str:
    lasted = f"after {now - c.since:.0f} s of split brain"
    if holder is None:
        return f"resolved: no node holds {_what(c)} now, {lasted}"
    return f"resolved: {holder} holds {_what(c)} alone, {lasted}"


def views(state: Mapping[str, Conflict]) -> list[SplitBrainView]:
    """The conflicts as the status document shows them."""
    return [
        SplitBrainView(
            instance=c.instance,
            nodes=list(c.nodes),
            vips=list(c.vips),
            since=c.since_wall,
            declared=c.declared,
            waiting=c.waiting,
        )
        for c in state.values()
    ]
