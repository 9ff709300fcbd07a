"""End to end: the group as one. Both lab nodes run config sync (so each watches the other's
node view over the sync key), keepalived reports to lbwatch's FIFO, and mail goes to the real
SMTP server on the backend host. VRRP between the nodes is cut on the bridge (multicast
flooding off on their ports) while unicast, the client's traffic and the sync link's ssh, flows
on: both nodes become MASTER, which only the peer link can see."""

from __future__ import annotations

import email
import email.policy
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from lbwatch.doctor.checks import Finding
from lbwatch.statusdoc import ClusterReport
from tests.e2e.test_lab import services_up
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.lab.netlab import LB_ADDR, METRICS, VIP, Lab, Node, notify_toml, sh
from tests.util import wait_for

pytestmark = sync_marks

NOTIFY = notify_toml()
# Detection and its alerts alone: the resolution (one node standing down) has its own tests,
# tests/e2e/test_lab_splitbrain.py.
DETECT_ONLY = "\n[cluster]\nresolve_split_brain = false\n"
SPLIT_BRAIN_AFTER = 3.0  # lbwatch's default


def mails(maildir: Path) -> list[tuple[float, str]]:
    """(arrival time on this host's clock, subject) of every message the SMTP server took."""
    out = []
    for path in sorted(maildir.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        out.append((path.stat().st_mtime, str(msg["Subject"])))
    return out


def with_text(maildir: Path, text: str) -> list[tuple[float, str]]:
    return [m for m in mails(maildir) if text in m[1]]


def peer_up(node: Node, other: str) -> bool:
    doc = node.status()
    peer = doc.cluster.peers.get(other) if doc is not None and doc.cluster is not None else None
    return peer is not None and peer.state == "up"


def cluster_json(node: Node) -> ClusterReport:
    """``lbwatch status --cluster --json`` on ``node``, read through its model."""
    return ClusterReport.model_validate_json(node.lbwatch_cli("status", "--cluster", "--json"))


def vrrp_state(report: ClusterReport, node: str) -> str | None:
    """VI_1's VRRP state in ``node``'s view as ``report`` shows it; None while it shows none."""
    view = report.nodes[node].view
    instance = view.vrrp.get("VI_1") if view is not None else None
    return instance.state if instance is not None else None


def pair(lab: Lab, extra: str, **configs: Any) -> tuple[Path, Node, Node]:
    """Both nodes syncing (so watching each other), keepalived reporting to the FIFO, mail to
    the lab's SMTP server; returned once both serve, lb1 holds the VIP and both watches are up.
    ``configs``: more of ``Node.write_configs``'s arguments, the same for both nodes.
    """
    maildir = lab.start_smtp_sink()
    lab.enable_sync()
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    for node in (lb1, lb2):
        node.write_configs(sync=True, keepalived_notify="fifo", lbwatch_extra=extra, **configs)
        node.start_lbwatch()
    wait_for(lambda: services_up(lb1) and services_up(lb2), 30, what="both nodes up")
    wait_for(lb1.has_vip, 20, what="lb1 to hold the VIP")
    wait_for(lambda: peer_up(lb1, "lb2") and peer_up(lb2, "lb1"), 20, what="watches up")
    return maildir, lb1, lb2


def no_split_brain_said(maildir: Path, nodes: tuple[Node, ...]) -> None:
    """No node said split brain: a mark sent now through each node's senders arrives, and a
    split-brain mail spooled before it would have arrived first."""
    for node in nodes:
        node.lbwatch_cli("notify", "GROUP", f"MARK{node.name}", "FAULT", "0")
    for node in nodes:
        wait_for(lambda n=node: with_text(maildir, f"MARK{n.name}"), 30, what="the marks")  # type: ignore[misc]
    assert with_text(maildir, "split brain") == []
    for node in nodes:
        assert "split brain" not in node.log_text()
        assert cluster_json(node).split_brain == []


def test_status_cluster_and_a_split_brain_alerted_by_both_and_resolved_once() -> None:
    with Lab() as lab:
        maildir, lb1, lb2 = pair(lab, NOTIFY + METRICS + DETECT_ONLY)

        # -- status --cluster: one table, both nodes, as lb1's agent last heard them -------------
        def settled() -> bool:
            rep = cluster_json(lb1)
            return vrrp_state(rep, "lb1") == "MASTER" and vrrp_state(rep, "lb2") == "BACKUP"

        wait_for(settled, 20, what="lb1 MASTER and lb2 BACKUP in lb1's cluster view")
        rep = cluster_json(lb1)
        assert rep.seen_from == "lb1" and rep.watching is True
        view1, view2 = rep.nodes["lb1"].view, rep.nodes["lb2"].view
        assert view1 is not None and view2 is not None
        assert view1.vrrp["VI_1"].held == [VIP]
        assert view2.vrrp["VI_1"].held == []
        assert view2.haproxy.running is True
        assert view1.config is not None and view2.config is not None
        assert view2.config.digest == view1.config.digest
        table = lb1.lbwatch_cli("status", "--cluster")
        print(table)
        rows = {line.split()[0]: line.split() for line in table.splitlines()[2:4]}
        assert "MASTER*" in rows["lb1"] and "BACKUP" in rows["lb2"]
        assert rep.split_brain == []

        # -- lbwatch doctor on lb1: the whole node, lb2's settings and its sync key included --
        out = lb1.lbwatch_cli("doctor", "--json")  # exit 0: no error
        found = TypeAdapter(list[Finding]).validate_json(out)
        wrong = [f for f in found if f.level == "error"]
        assert wrong == [], wrong
        said = [f.what for f in found if f.level == "ok"]
        for expected in (
            "keepalived reports transitions to lbwatch's FIFO",
            "VI_1: settings agree with lb2's",
            "peer lb2 (192.0.2.12) answers through lbwatch's receiver",
            "peer lb2: the sync key runs nothing else",
            "master-worker mode (the running haproxy",
        ):
            assert any(expected in w for w in said), (expected, found)

        # -- a restarted agent knows keepalived's states at once, and lb2 hears it again ---------
        old = lb1.doc().agent.pid
        lb1.stop_lbwatch(signal.SIGKILL)
        wait_for(lambda: cluster_json(lb2).nodes["lb1"].state == "agent down", 10,
                 what="lb2 to see lb1's agent down")  # fmt: skip
        lb1.start_lbwatch()
        wait_for(
            lambda: (doc := lb1.status()) is not None and doc.agent.pid != old and doc.ready,
            20,
            what="lb1's new agent ready",
        )
        # No transition since: the state is the one the first agent heard from this keepalived.
        assert vrrp_state(cluster_json(lb1), "lb1") == "MASTER"
        wait_for(lambda: vrrp_state(cluster_json(lb2), "lb1") == "MASTER", 10,
                 what="lb2 to hear lb1's new agent")  # fmt: skip

        # -- VRRP cut: both MASTER, both alert -------------------------------------------------
        lab.set_vrrp(False)
        cut = time.time()
        wait_for(lb2.has_vip, 15, interval=0.02, what="lb2 to take the VIP as well")
        split = time.time()
        assert lb1.has_vip(), "lb1 let go of the VIP: VRRP was not cut"
        # The client reaches both nodes (unicast flows): the case VRRP cannot see.
        assert lab.client_fetch(LB_ADDR["lb1"])["config"]
        assert lab.client_fetch(LB_ADDR["lb2"])["config"]
        for name in ("lb1", "lb2"):
            wait_for(
                lambda name=name: with_text(maildir, f"] {name}: split brain: VI_1"),  # type: ignore[misc]
                split + 5 - time.time(),  # the bound, from the second MASTER
                what=f"{name}'s split-brain mail",
            )
        for name in ("lb1", "lb2"):
            at, subject = with_text(maildir, f"] {name}: split brain: VI_1")[0]
            took, after_cut = at - split, at - cut
            print(f"{name}: mail {took:.2f} s after the 2nd MASTER, {after_cut:.2f} s after cut")
            assert "claimed by lb1 and lb2" in subject
            assert took <= 5
        assert any("split brain" in line for line in lb1.log_text().splitlines())
        for node in (lb1, lb2):  # and Prometheus sees it on both, from their own metrics
            scraped = node.scrape()
            assert 'lbwatch_split_brain{vrrp="VI_1"} 1.0' in scraped
            assert 'lbwatch_vrrp_state{kind="instance",state="MASTER",vrrp="VI_1"} 1.0' in scraped
            assert 'lbwatch_vip_held{vip="192.0.2.100",vrrp="VI_1"} 1.0' in scraped
        shown = cluster_json(lb2).split_brain
        assert [(s.instance, s.nodes, s.declared) for s in shown] == [
            ("VI_1", ["lb1", "lb2"], True)
        ]

        # -- VRRP back: lb2 (lower priority) steps back; lb1 alone says it is resolved -------------
        lab.set_vrrp(True)
        wait_for(lambda: not lb2.has_vip(), 15, what="lb2 to drop the VIP")
        resolved = "resolved: lb1 holds VI_1 (VIP 192.0.2.100) alone"
        wait_for(lambda: with_text(maildir, resolved), 15, what="lb1's resolved mail")
        # A mark through lb2's own senders, sent after lb2 saw the end: a resolved mail of
        # lb2's would have been spooled before it and arrive first.
        lb2.lbwatch_cli("notify", "GROUP", "MARK", "FAULT", "0")
        wait_for(lambda: with_text(maildir, "MARK"), 15, what="lb2's mark")
        assert [s for _, s in with_text(maildir, "resolved")] == [
            f"[lbwatch] lb1: {s}" for s in [with_text(maildir, resolved)[0][1].split(": ", 1)[1]]
        ]
        assert len(with_text(maildir, "split brain: VI_1")) == 2  # one each, no repeat
        assert cluster_json(lb1).split_brain == []

        # -- a peer that cannot be asked is shown as such, with the reason ------------------------
        lb2.stop_lbwatch()
        wait_for(lambda: cluster_json(lb1).nodes["lb2"].state == "agent down", 10, what="down")
        assert "not running" in cluster_json(lb1).nodes["lb2"].reason
        lb2.stop_sshd()
        wait_for(
            lambda: cluster_json(lb1).nodes["lb2"].state == "unreachable",
            20,
            what="lb2 unreachable",
        )
        table = lb1.lbwatch_cli("status", "--cluster")
        print(table)
        assert "lb2: UNREACHABLE since" in table


def test_ordinary_failovers_are_no_split_brain() -> None:
    """haproxy killed on the MASTER (lbwatch stops keepalived, lb2 takes the VIP, lb1 heals and
    takes it back) and keepalived killed on it (restarted at once): the overlaps of ordinary
    failovers are shorter than split_brain_after, so neither agent alerts, with both watches
    up throughout."""
    with Lab() as lab:
        maildir, lb1, lb2 = pair(lab, NOTIFY)

        assert lb1.kill("haproxy")
        wait_for(lb2.has_vip, 15, interval=0.02, what="lb2 to take the VIP")
        wait_for(lambda: services_up(lb1), 20, what="lb1 services back")
        wait_for(lb1.has_vip, 20, what="lb1 to hold the VIP again")
        wait_for(lambda: not lb2.has_vip(), 10, what="lb2 to let it go")

        assert lb1.kill("keepalived")
        wait_for(lambda: lb2.has_vip() or lb1.has_vip(), 15, what="someone to hold the VIP")
        wait_for(lambda: lb1.has_vip() and not lb2.has_vip(), 30, what="lb1 alone again")

        no_split_brain_said(maildir, (lb1, lb2))


def cut(lab: Lab, name: str, off: bool) -> None:
    """``name``'s bridge port stops (or goes on) forwarding: its link stays up (keepalived
    sees no fault), nothing reaches it or comes from it."""
    sw = lab.ns("sw")
    state = "0" if off else "3"  # disabled, forwarding
    sh("bridge", "-n", sw, "link", "set", "dev", f"p-{name}", "state", state)


def test_a_node_cut_off_holding_the_vip_and_back_is_no_split_brain() -> None:
    """lb1, holding the VIP, is cut off the network (as a peer that lost power looks to lb2):
    lb2 takes the VIP while its last view of lb1 still says MASTER, and the cut lasts well over
    split_brain_after. Neither agent can confirm the other's claim meanwhile, so neither alerts;
    nor when lb1 comes back and VRRP sorts it out at once."""
    with Lab() as lab:
        maildir, lb1, lb2 = pair(lab, NOTIFY)

        cut(lab, "lb1", True)
        wait_for(lb2.has_vip, 15, interval=0.02, what="lb2 to take the VIP")
        assert lb1.has_vip()
        wait_for(lambda: not peer_up(lb2, "lb1"), 30, what="lb2's watch of lb1 to fail")
        shown = cluster_json(lb2).split_brain
        print("lb2 during the cut:", shown)
        assert all(not s.declared for s in shown)
        cut(lab, "lb1", False)
        wait_for(lambda: lb1.has_vip() and not lb2.has_vip(), 15, what="lb1 alone again")
        wait_for(lambda: peer_up(lb1, "lb2") and peer_up(lb2, "lb1"), 60, what="watches up")

        no_split_brain_said(maildir, (lb1, lb2))
