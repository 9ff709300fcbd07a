"""``lbwatch status --cluster``: the group as this node's agent sees it, one row per node, from
the agent's status document alone (this node's view is built from it as the peers see it; the
peers' are what its cluster watch last heard). No ssh from the command: it works for anyone who
can read the status, and shows what the agent bases its split-brain decisions on.
"""

from __future__ import annotations

import time

from lbwatch.cluster.nodeview import from_status
from lbwatch.statusdoc import ClusterReport, NodeView, PeerNode, StatusDoc

UP = "up"


def report(doc: StatusDoc) -> ClusterReport:
    me = from_status(doc)
    nodes = {me.node: PeerNode(state=UP, since=doc.agent.create_time, view=me)}
    cluster = doc.cluster
    if cluster is not None:
        nodes.update(cluster.peers)
    return ClusterReport(
        seen_from=me.node,
        watching=cluster is not None,
        nodes=nodes,
        split_brain=cluster.split_brain if cluster is not None else [],
    )


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _service(view: NodeView, name: str) -> str:
    svc = view.haproxy if name == "haproxy" else view.keepalived
    if svc.running:
        return "up"
    return "GIVEN UP" if svc.given_up else "DOWN"


def _instance(view: NodeView, name: str) -> str:
    inst = view.vrrp.get(name)
    if inst is None:
        return "-"
    return inst.state + ("*" if inst.held else "")


def _config(view: NodeView) -> str:
    c = view.config
    return f"c{c.counter} {c.origin} {c.digest[:8]}" if c is not None else "-"


def _last(view: NodeView) -> str:
    a = view.last_action
    if a is None:
        return "-"
    return f"{_clock(a.at)} {a.action}: {a.outcome}"


def format_cluster(rep: ClusterReport, now_wall: float) -> str:
    instances = sorted(
        {
            name
            for node in rep.nodes.values()
            if node.view is not None and node.state == UP
            for name in node.view.vrrp
            if not name.startswith("group:")
        }
    )
    head = ["NODE", "AGENT", "HAPROXY", "KEEPALIVED", *instances, "CONFIG", "LAST ACTION"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for name, node in rep.nodes.items():
        view = node.view
        if node.state != UP or view is None:
            since = _clock(node.since)
            notes.append(f"{name}: {node.state.upper()} since {since}: {node.reason or '?'}")
            rows.append([name, node.state.upper(), "?", "?", *("?" for _ in instances), "?", "?"])
            continue
        agent = f"{view.agent.version}" + (" (this)" if name == rep.seen_from else "")
        if view.paused:
            agent += " PAUSED"
        if view.drained:
            agent += " DRAINED"
        rows.append(
            [
                name,
                agent,
                _service(view, "haproxy"),
                _service(view, "keepalived"),
                *(_instance(view, i) for i in instances),
                _config(view),
                _last(view),
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"cluster seen from {rep.seen_from} at {_clock(now_wall)}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.append("(* holds the instance's VIPs)")
    lines += notes
    if not rep.watching:
        lines.append("peers are not watched: config sync has no peers, or [cluster] watch = false")
    for sb in rep.split_brain:
        vips = f" (VIP {', '.join(sb.vips)})" if sb.vips else ""
        what = "SPLIT BRAIN" if sb.declared else "overlap"
        waiting = f"; waiting: {sb.waiting}" if sb.waiting else ""
        lines.append(
            f"{what}: {sb.instance}{vips} claimed by {' and '.join(sb.nodes)} "
            f"since {_clock(sb.since)}{waiting}"
        )
    return "\n".join(lines)
