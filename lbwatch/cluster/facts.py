"""Node views (this node's status, the peers' views) turned into the frozen facts the policy
weighs (``events.InstanceFacts``, ``PeerFacts``, ``Group``): one reading for both sides, so
that this node and its peers are judged alike. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from lbwatch.cluster import splitbrain
from lbwatch.events import Group, InstanceFacts, PeerFacts
from lbwatch.heartbeat import vip_address
from lbwatch.statusdoc import KeepalivedConfView, NodeView, VipsView


def instances(
    vrrp: Mapping[str, VipsView], conf: KeepalivedConfView | None
) -> tuple[InstanceFacts, ...]:
    """A node's VRRP instances (not its sync groups): those its agent reports, and those its
    keepalived.conf names that it does not (state unknown, held not measured)."""
    out = {
        name: InstanceFacts(
            name,
            v.state,
            frozenset(vip_address(a) for a in v.vips),
            bool(v.held),
        )
        for name, v in vrrp.items()
        if not name.startswith("group:")
    }
    for name, settings in (conf.instances if conf is not None else {}).items():
        if name not in out:
            out[name] = InstanceFacts(name, "unknown", frozenset(settings.vips or ()))
        elif not out[name].vips and settings.vips:
            out[name] = InstanceFacts(
                name, out[name].state, frozenset(settings.vips), out[name].held
            )
    return tuple(out[name] for name in sorted(out))


def peer(name: str, view: NodeView, answered: float) -> PeerFacts:
    """Peer ``name`` (as this node's config calls it) as ``view`` shows it."""
    return PeerFacts(
        node=name,
        answered=answered,
        serving=view.haproxy.running and not view.haproxy.given_up and view.health != "down",
        keepalived=view.keepalived.running,
        paused=view.paused,
        instances=instances(view.vrrp, view.keepalived_conf),
        drained=frozenset(view.drained),
    )


def group(heard: Mapping[str, splitbrain.Heard]) -> Group:
    """Every configured peer as last heard: through its agent (a current view), or silent."""
    peers, silent = [], []
    for name in sorted(heard):
        h = heard[name]
        if h.by == splitbrain.AGENT and h.view is not None:
            peers.append(peer(name, h.view, h.answered))
        else:
            silent.append(name)
    return Group(tuple(peers), tuple(silent))


def renewal(old: Group, new: Group) -> bool:
    """Whether ``new`` is ``old`` answered again: the same peers saying the same."""
    if old.silent != new.silent or len(old.peers) != len(new.peers):
        return False
    return all(replace(a, answered=b.answered) == b for a, b in zip(old.peers, new.peers))
