"""End to end: two LB nodes in network namespaces, real haproxy (master-worker) and keepalived
(VRRP, VIP 192.0.2.100) and lbwatch on each, a backend and a client. Needs root."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from tests.lab.netlab import VIP, Lab, Node
from tests.util import wait_for

TOOLS = ("ip", "nsenter", "unshare", "haproxy", "keepalived", "start-stop-daemon")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS), reason=f"the lab needs {', '.join(TOOLS)}"
    ),
    pytest.mark.timeout(180),
]


def services_up(node: Node) -> bool:
    doc = node.status()
    return doc is not None and doc.ready and all(v.running for v in doc.services.values())


@pytest.fixture
def cluster() -> Iterator[Lab]:
    """Both nodes configured; lbwatch started on each with nothing running, so the start-up
    reconcile brings up haproxy and then keepalived; lb1 (priority 254) ends up holding the VIP."""
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        for node in (lb1, lb2):
            node.write_configs()
            node.start_lbwatch()
        try:
            wait_for(lambda: services_up(lb1) and services_up(lb2), 20, what="both nodes up")
            wait_for(lb1.has_vip, 15, what="lb1 to hold the VIP")
            wait_for(lambda: lab.client_get() == (200, "lb1"), 10, what="HTTP 200 via lb1")
            yield lab
        finally:
            for node in (lb1, lb2):
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")


def pids(node: Node, name: str) -> set[int]:
    return {p.pid for p in node.live(name)}


STAT_ROW = re.compile(r"^monitor,FRONTEND,", re.M)


def monitor_answers(node: Node) -> tuple[int, int] | None:
    """Asked on the node's haproxy stats socket: the PID (inside the node) of the worker that
    answers and how many requests its ``monitor`` frontend has served, all of them lbwatch's
    health probes; None while the socket does not answer (mid-reload)."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2.0)
            sock.connect(f"/proc/{node.init_pid}/root/run/haproxy/admin.sock")
            sock.sendall(b"show info;show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    text = data.decode(errors="replace")
    pid = re.search(r"^Pid: (\d+)$", text, re.M)
    header = next((ln for ln in text.splitlines() if ln.startswith("# pxname,")), None)
    row = next((ln for ln in text.splitlines() if STAT_ROW.match(ln)), None)
    if pid is None or header is None or row is None:
        return None
    served = dict(zip(header[2:].split(","), row.split(",")))["req_tot"]
    return int(pid.group(1)), int(served or 0)


def test_haproxy_killed_on_master_vip_moves_and_node_heals(cluster: Lab) -> None:
    """kill -9 of haproxy (master and workers) on the MASTER: the client gets HTTP 200 through
    the VIP from lb2, then lb1 restarts haproxy, restarts keepalived and takes the VIP back."""
    lb1, lb2 = cluster.nodes["lb1"], cluster.nodes["lb2"]
    lb2_history = lb2.doc().recent_actions
    with cluster.client_watch("lb2", 15) as watcher:
        assert watcher.stdout is not None
        watcher.stdout.readline()  # the client is running
        killed_at = time.time()
        assert lb1.kill("haproxy")
        first_ok = json.loads(watcher.stdout.readline())["first_ok"]
    assert first_ok is not None and first_ok - killed_at < 5.0
    wait_for(
        lambda: "stopping keepalived so the VIP moves" in lb1.log_text(),
        5,
        what="lb1's stop reason",
    )
    assert lb2.has_vip()
    # lb1 heals and, with the higher priority, takes the VIP back.
    wait_for(lambda: services_up(lb1), 20, what="lb1 services back")
    wait_for(lb1.has_vip, 20, what="lb1 to hold the VIP again")
    wait_for(lambda: cluster.client_get() == (200, "lb1"), 10, what="HTTP 200 via lb1 again")
    actions = [a.action for a in lb1.doc().recent_actions]
    assert "stop keepalived" in actions and actions[-1] == "start keepalived"
    assert lb2.doc().recent_actions == lb2_history  # the peer had nothing to do


def test_keepalived_killed_is_restarted(cluster: Lab) -> None:
    """kill -9 of keepalived on the MASTER: lbwatch starts it again and lb1 serves the VIP."""
    lb1 = cluster.nodes["lb1"]
    before = pids(lb1, "keepalived")
    assert lb1.kill("keepalived")
    wait_for(
        lambda: pids(lb1, "keepalived") and not pids(lb1, "keepalived") & before,
        15,
        what="a new keepalived on lb1",
    )
    # Its children, killed with it, may still be on their way out when the parent's exit is
    # seen: then the start waits for them and says so.
    said = (
        r"exited \(pidfd\);( the child processes it left have exited;)? starting keepalived "
        r"\(attempt "
    )
    wait_for(lambda: re.search(said, lb1.log_text()), 5, what="the restart's reason logged")
    wait_for(lb1.has_vip, 20, what="lb1 to hold the VIP")
    wait_for(lambda: cluster.client_get() == (200, "lb1"), 10, what="HTTP 200 via lb1")


def test_broken_haproxy_backs_off_gives_up_and_keeps_keepalived_down(cluster: Lab) -> None:
    """haproxy cannot start (broken config): attempts back off, lbwatch gives up loudly, and
    keepalived is never started meanwhile; the VIP stays on the healthy node."""
    lb1, lb2 = cluster.nodes["lb1"], cluster.nodes["lb2"]
    (lb2.dir / "haproxy" / "haproxy.cfg").write_text("global\n    no-such-keyword\n")
    mark = len(lb2.log_text())
    lb2.kill("haproxy")
    wait_for(
        lambda: "giving up on haproxy: 4 start attempts" in lb2.log_text(),
        30,
        what="give-up on lb2",
    )
    after = lb2.log_text()[mark:]
    assert "stopping keepalived so the VIP moves" in after
    assert "starting keepalived" not in after
    assert not lb2.live("keepalived") and not lb2.live("haproxy")
    # The log line comes a moment before the status file is rewritten.
    wait_for(
        lambda: (doc := lb2.status()) is not None and doc.services["haproxy"].given_up,
        5,
        what="status",
    )
    last_failure = lb2.doc().services["haproxy"].last_failure
    assert last_failure is not None and last_failure.startswith("exit 1")
    assert lb1.has_vip() and not lb2.has_vip()
    assert "GIVEN UP" in lb2.lbwatch_cli("status")
    assert cluster.client_get() == (200, "lb1")


def test_haproxy_reload_leaves_keepalived_alone(cluster: Lab) -> None:
    """A master-worker reload (SIGUSR2): same master, new workers, keepalived untouched."""
    lb1 = cluster.nodes["lb1"]
    keepalived_before = pids(lb1, "keepalived")
    history = lb1.doc().recent_actions
    master = int(lb1.read("/run/haproxy.pid"))
    old_workers = set(lb1.doc().services["haproxy"].children)
    lb1.run(
        "start-stop-daemon",
        "--stop",
        "--signal",
        "USR2",
        "--pidfile",
        "/run/haproxy.pid",
        "--name",
        "haproxy",
    )
    wait_for(
        lambda: f"haproxy reloaded (master {master} kept" in lb1.log_text(),
        10,
        what="reload noticed",
    )
    assert "keepalived untouched" in lb1.log_text()
    # The first status listing a new worker is written after the policy decided on the scan
    # that found it, the reload: an action taken on it would be in recent_actions already.
    wait_for(
        lambda: (
            (doc := lb1.status()) is not None
            and set(doc.services["haproxy"].children) - old_workers
        ),
        10,
        what="the new worker in lbwatch's status",
    )
    assert lb1.doc().recent_actions == history
    # Failing probes around the reload (fall = 2) would stop keepalived later. lbwatch probes
    # one at a time and starts the next only once the last one's result has been decided on:
    # when the new worker has answered fall + 1 probes, every result before them and the first
    # fall of them (failures any of them, a streak of fall) are decided on and published.
    wait_for(
        lambda: (
            (answers := monitor_answers(lb1)) is not None
            and answers[0] not in old_workers
            and answers[1] >= 3
        ),
        10,
        what="the new worker answering 3 health probes",
    )
    assert lb1.doc().recent_actions == history
    assert lb1.doc().health.state == "up"
    assert pids(lb1, "keepalived") == keepalived_before
    assert lb1.has_vip() and cluster.client_get() == (200, "lb1")


def test_lbwatch_killed_and_restarted_reconciles_without_flapping(cluster: Lab) -> None:
    """kill -9 of lbwatch, then a new lbwatch: it adopts the running services, takes no action,
    and the VIP never leaves lb1."""
    lb1, lb2 = cluster.nodes["lb1"], cluster.nodes["lb2"]
    keepalived_before = pids(lb1, "keepalived")
    haproxy_before = pids(lb1, "haproxy")
    old_agent = lb1.doc().agent.pid
    lb1.stop_lbwatch(signal.SIGKILL)
    lb1.start_lbwatch()
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # watch for a flap while the new agent starts
        assert not lb2.has_vip(), "the VIP moved to lb2"
        time.sleep(0.1)
    wait_for(
        lambda: (doc := lb1.status()) is not None and doc.agent.pid != old_agent and doc.ready,
        10,
        what="new agent ready",
    )
    assert lb1.doc().recent_actions == []
    assert pids(lb1, "keepalived") == keepalived_before
    assert pids(lb1, "haproxy") == haproxy_before
    assert lb1.has_vip()
    out = lb1.lbwatch_cli("status")
    assert re.search(rf"vrrp +VI_1: [A-Za-z]+, holds {re.escape(VIP)} of {re.escape(VIP)}", out)
