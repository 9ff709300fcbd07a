"""`lbwatch status --cluster` and the cluster lines of `lbwatch status`, rendered from status
documents built through the models: every node a row, a peer that cannot be asked shown with
its reason, a split brain said, and a node that watches no peers says so."""

from __future__ import annotations

from lbwatch.cluster.table import format_cluster, report
from lbwatch.status_text import format_status
from lbwatch.statusdoc import (
    AgentInfo,
    ClusterView,
    NodeAgent,
    NodeView,
    PeerNode,
    ServiceView,
    SplitBrainView,
    StatusDoc,
    VipsView,
)

NOW = 1_800_000_000.0


def doc(cluster: ClusterView | None) -> StatusDoc:
    return StatusDoc(
        agent=AgentInfo(pid=7, start_ticks=1, create_time=NOW - 60, node="lb1", version="1.2"),
        summary="ok",
        services={"haproxy": ServiceView(running=True), "keepalived": ServiceView(running=True)},
        vrrp={"VI_1": VipsView(state="MASTER", vips=["192.0.2.100"], held=["192.0.2.100"])},
        cluster=cluster,
    )


def lb2(state: str = "BACKUP") -> NodeView:
    return NodeView(
        node="lb2",
        agent=NodeAgent(pid=9, start_ticks=1, version="1.2"),
        vrrp={"VI_1": VipsView(state=state, vips=["192.0.2.100"])},
    )


def test_every_node_is_a_row_and_a_peer_that_cannot_be_asked_says_why() -> None:
    cluster = ClusterView(
        peers={
            "lb2": PeerNode(state="up", since=NOW - 30, view=lb2()),
            "lb3": PeerNode(state="unreachable", since=NOW - 5, reason="ssh: connection refused"),
        }
    )
    text = format_cluster(report(doc(cluster)), NOW)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:5]}
    assert rows["lb1"][1:4] == ["1.2", "(this)", "up"]
    assert "MASTER*" in rows["lb1"] and "BACKUP" in rows["lb2"]
    assert rows["lb3"][1] == "UNREACHABLE"
    assert any(line.startswith("lb3: UNREACHABLE since ") and line.endswith(
        ": ssh: connection refused") for line in text.splitlines())  # fmt: skip
    assert "peers are not watched" not in text


def test_a_split_brain_is_said_in_both_views() -> None:
    cluster = ClusterView(
        peers={"lb2": PeerNode(state="up", since=NOW - 30, view=lb2("MASTER"))},
        split_brain=[
            SplitBrainView(
                instance="VI_1",
                nodes=["lb1", "lb2"],
                vips=["192.0.2.100"],
                since=NOW - 12,
                declared=True,
            )
        ],
    )
    table = format_cluster(report(doc(cluster)), NOW)
    assert "SPLIT BRAIN: VI_1 (VIP 192.0.2.100) claimed by lb1 and lb2 since" in table
    status = format_status(doc(cluster), NOW)
    assert "cluster     lb2 up for 30s" in status
    assert "cluster     SPLIT BRAIN: VI_1 claimed by lb1 and lb2 for 12s" in status
    assert "vrrp        VI_1: MASTER, holds 192.0.2.100 of 192.0.2.100" in status


def test_a_node_watching_no_peers_shows_itself_and_says_so() -> None:
    rep = report(doc(None))
    assert list(rep.nodes) == ["lb1"] and rep.watching is False
    assert "peers are not watched" in format_cluster(rep, NOW)
    assert "cluster " not in format_status(doc(None), NOW)
