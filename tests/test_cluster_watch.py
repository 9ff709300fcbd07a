"""A peer's cluster watch (``cluster.watch.PeerWatch``) over a real sshd on loopback, with the
sync key restricted to lbwatch's receiver as an operator installs it: the view arrives, a
change arrives at once, an unchanged view is confirmed every heartbeat, an agent that ended,
an agent that stopped (its view no longer current, its kernel's VIPs said instead) and a key
still on rrsync are told apart, and a push on the sync channel is not held up by the watch's
long poll on the same peer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lbwatch import pstat
from lbwatch.cluster.nodeview import NODE
from lbwatch.cluster.watch import AGENT_DOWN, NOT_RESPONDING, RRSYNC, UP, PeerWatch, Report
from lbwatch.config import Config
from lbwatch.events import Outcome
from lbwatch.heartbeat import STALE_AFTER
from lbwatch.loop import Selector
from lbwatch.peering import Peering
from lbwatch.statusdoc import AgentInfo, StatusDoc, VipsView
from lbwatch.sync.channel import Channel
from lbwatch.sync.transport import Peer, Transport, rrsync_authorized_keys_line
from tests.conftest import free_port
from tests.fakes import config
from tests.sshd import NEEDS_SSHD, Sshd
from tests.test_cluster_sink import beating_agent, replace_file, ticks_of, view
from tests.test_sync_channel import receiver_line, version_file
from tests.test_sync_sink import Conn
from tests.util import wait_for

pytestmark = NEEDS_SSHD


class Reports:
    def __init__(self) -> None:
        self.items: list[Report] = []
        self._lock = threading.Lock()

    def post(self, report: Report) -> None:
        with self._lock:
            self.items.append(report)

    def seen(self) -> list[Report]:
        with self._lock:
            return list(self.items)

    def last(self) -> Report | None:
        got = self.seen()
        return got[-1] if got else None


@pytest.fixture
def agent() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for the peer's agent: the view names its PID."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def beating(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A stand-in agent renewing its heartbeat (``test_cluster_sink.beating_agent``)."""
    with beating_agent(tmp_path) as stand_in:
        yield stand_in


def watch_of(sshd: Sshd, control_dir: Path) -> tuple[PeerWatch, Reports, Channel]:
    channel = Channel(Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=5))
    reports = Reports()
    w = PeerWatch(Peer("lb2", "127.0.0.1", sshd.port), channel, reports.post)
    return w, reports, channel


def test_the_view_arrives_changes_at_once_and_is_confirmed_every_heartbeat(
    tmp_path: Path, control_dir: Path, agent: subprocess.Popen[bytes]
) -> None:
    sshd = Sshd(tmp_path / "peer", receiver_line)
    w, reports, channel = watch_of(sshd, control_dir)
    node = sshd.staging / "node.json"
    node.write_bytes(view(agent.pid, ticks_of(agent.pid), state="BACKUP"))
    try:
        w.start()
        wait_for(lambda: any(r.view for r in reports.seen()), 15, what="the first view")
        first = next(r for r in reports.seen() if r.view)
        assert first.state == UP and first.view is not None
        assert first.view.vrrp["VI_1"].state == "BACKUP"
        # Confirmations: UP reports without a view, about one per heartbeat.
        count = len(reports.seen())
        wait_for(lambda: len(reports.seen()) >= count + 3, 10, what="three confirmations")
        # Each without the view: the hash the watch sent back was the one the receiver holds.
        assert all(r.state == UP and r.view is None for r in reports.seen()[count:])
        changed = time.monotonic()
        replace_file(node, view(agent.pid, ticks_of(agent.pid), state="MASTER"))

        def master_seen() -> bool:
            last = [r for r in reports.seen() if r.view]
            return bool(last) and last[-1].view.vrrp["VI_1"].state == "MASTER"  # type: ignore[union-attr]

        wait_for(master_seen, 5, interval=0.01, what="the changed view")
        print(f"\nchange seen after {time.monotonic() - changed:.3f} s")
        # The agent ends: the peer's receiver says so within a second or two.
        agent.kill()
        agent.wait()
        wait_for(lambda: (reports.last() or first).state == AGENT_DOWN, 10, what="agent down")
        assert "not running" in (reports.last() or first).reason
        assert (reports.last() or first).kernel == frozenset()  # 192.0.2.100 is not here
    finally:
        w.stop()
        channel.end_sessions()
        w.join(5)
        channel.close(w.peer)  # and the kept connection
        sshd.stop()


def test_a_stopped_agent_is_not_responding_and_its_kernel_speaks_for_its_node(
    tmp_path: Path, control_dir: Path, beating: tuple[subprocess.Popen[bytes], Path]
) -> None:
    """The peer's agent stops (SIGSTOP) with a view saying MASTER: the watch reports "agent not
    responding" (never "up") within the bound and a few seconds, with the VIPs the peer's kernel
    holds (loopback's, of the view's two) and not the view; it keeps asking once a heartbeat;
    resumed, the peer is up again with its view."""
    agent, beat = beating
    sshd = Sshd(tmp_path / "peer", receiver_line)
    w, reports, channel = watch_of(sshd, control_dir)
    ticks = ticks_of(agent.pid)
    vips = ("127.0.0.1", "192.0.2.100")
    data = view(agent.pid, ticks, state="MASTER", heartbeat=beat, vips=vips)
    (sshd.staging / "node.json").write_bytes(data)
    try:
        w.start()
        wait_for(lambda: any(r.view for r in reports.seen()), 15, what="the first view")
        agent.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(
            lambda: (reports.last() or Report("", UP, 0)).state == NOT_RESPONDING,
            STALE_AFTER + 5,
            what="not responding",
        )
        print(f"\nnot responding {time.monotonic() - stopped:.2f} s after the stop")
        said = reports.last()
        assert said is not None and said.view is None
        assert said.kernel == frozenset({"127.0.0.1"})
        assert said.reason.endswith(
            "has not renewed its heartbeat for 2 s); its kernel holds 127.0.0.1"
        )
        count = len(reports.seen())
        wait_for(lambda: len(reports.seen()) >= count + 3, 10, what="three more answers")
        later = reports.seen()[count:]
        assert all(r.state == NOT_RESPONDING for r in later), later
        assert all(b.answered - a.answered < 2.5 for a, b in zip(later, later[1:])), later
        agent.send_signal(signal.SIGCONT)
        wait_for(lambda: (reports.last() or said).state == UP, 15, what="up again")
        last = [r for r in reports.seen() if r.view][-1]
        assert last.view is not None and last.view.vrrp["VI_1"].state == "MASTER"
    finally:
        agent.send_signal(signal.SIGCONT)
        w.stop()
        channel.end_sessions()
        w.join(5)
        channel.close(w.peer)
        sshd.stop()


def test_a_push_is_not_held_up_by_the_watch_on_the_same_peer(
    tmp_path: Path, control_dir: Path, agent: subprocess.Popen[bytes]
) -> None:
    """While the watch sits in its long poll, pushes on the sync channel (its own session over
    the same kept connection) take what they take without it."""
    sshd = Sshd(tmp_path / "peer", receiver_line)
    w, reports, watch_channel = watch_of(sshd, control_dir)
    (sshd.staging / "node.json").write_bytes(view(agent.pid, ticks_of(agent.pid)))
    sync = Channel(Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=5))
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    try:
        w.start()
        wait_for(lambda: any(r.view for r in reports.seen()), 15, what="the first view")
        took = []
        for i in range(1, 6):
            local, name = version_file(tmp_path, f"global\n    maxconn {i}\n".encode(), i)
            started = time.monotonic()
            assert sync.push(peer, local, name).outcome is Outcome.OK
            took.append(time.monotonic() - started)
        print("\npush times beside the watch:", [f"{t * 1000:.1f} ms" for t in took])
        # Every push after the session's first answered well within one heartbeat.
        assert max(took[1:]) < 0.9, took
    finally:
        w.stop()
        watch_channel.end_sessions()
        w.join(5)
        sync.close(peer)
        sshd.stop()


def test_a_key_still_on_rrsync_is_said_and_not_polled_through_rsync(
    tmp_path: Path, control_dir: Path
) -> None:
    sshd = Sshd(tmp_path / "old-peer", rrsync_authorized_keys_line)
    w, reports, channel = watch_of(sshd, control_dir)
    try:
        w.start()
        wait_for(lambda: reports.last() is not None, 15, what="a report")
        last = reports.last()
        assert last is not None and last.state == RRSYNC
        assert "rrsync" in last.reason
        assert len(reports.seen()) == 1  # asked again only after a minute
    finally:
        w.stop()
        channel.end_sessions()
        w.join(5)
        channel.close(w.peer)  # and the kept connection
        sshd.stop()


def test_a_key_moved_from_rrsync_to_the_receiver_is_watched_once_asked_again(
    tmp_path: Path, control_dir: Path, agent: subprocess.Popen[bytes]
) -> None:
    """A long poll that found the key on rrsync asks the peer again the next time (what the
    watch's minute between tries is for): once the operator moved the key to lbwatch's
    receiver and the kept connection was renewed, the view arrives."""
    sshd = Sshd(tmp_path / "peer", rrsync_authorized_keys_line)
    (sshd.staging / "node.json").write_bytes(view(agent.pid, ticks_of(agent.pid)))
    channel = Channel(Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=5))
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    try:
        assert channel.wait(peer, "node.json", None, 1).outcome == "rrsync"
        # The operator moves the key; the kept connection ends, as sync's own channel (the
        # agent's other user of it) renews it.
        pub = sshd.client_key.with_name("sync_key.pub").read_text()
        sshd.auth.write_text(receiver_line(sshd.staging, pub) + "\n")
        sync = Channel(Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=5))
        assert sync.close(peer).outcome is Outcome.OK
        got = channel.wait(peer, "node.json", None, 1)
        assert got.outcome == "data", got
    finally:
        channel.end_sessions()
        channel.close(peer)
        sshd.stop()


def ssh_connections(port: int) -> int:
    """Established TCP connections from this host to ``port`` (the client side of each)."""
    return sum(
        1
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr[1] == port
    )


def test_the_watch_and_the_sync_link_starting_together_share_one_connection(
    tmp_path: Path, control_dir: Path, agent: subprocess.Popen[bytes]
) -> None:
    """At the agent's start the sync link and the cluster watch ask the same peer at once, each
    on its own channel: the second waits for the first's kept connection instead of opening a
    second TCP connection (ssh with ControlMaster=auto that finds no master yet connects on its
    own and keeps that connection unshared for the session's life)."""
    sshd = Sshd(tmp_path / "peer", receiver_line)
    (sshd.staging / "node.json").write_bytes(view(agent.pid, ticks_of(agent.pid)))
    (sshd.staging / "status.json").write_bytes(b"{}")
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    sync = Channel(Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=5))
    watch = Channel(Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=5))
    together = threading.Barrier(2)
    got: dict[str, object] = {}

    def fetch() -> None:
        together.wait()
        got["sync"] = sync.fetch(peer, "status.json", tmp_path / "status.json").outcome

    def poll() -> None:
        together.wait()
        got["watch"] = watch.wait(peer, "node.json", None, 1).outcome

    threads = [threading.Thread(target=fetch), threading.Thread(target=poll)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert got == {"sync": Outcome.OK, "watch": "data"}
        # Both sessions are kept open: each is a connection of its own, or both share one.
        assert ssh_connections(sshd.port) == 1
    finally:
        watch.end_sessions()
        sync.close(peer)
        sshd.stop()


def peering_config(tmp: Path, control_dir: Path, watch: bool) -> Config:
    """One node with config sync to a peer that never answers, the cluster watch on or off."""
    live = tmp / "haproxy.cfg"
    if not live.exists():
        live.write_text("global\n")
    return config(
        agent={"node_name": "lb1", "state_dir": str(tmp / "state"), "run_dir": str(tmp)},
        sync={
            "config": str(live),
            "check": ["true", "{file}"],
            "control_dir": str(control_dir),
            "ssh_key": str(tmp / "no_key"),
            "peers": [{"name": "lb2", "host": "127.0.0.1", "port": free_port()}],
        },
        cluster={"watch": watch},
    )


def this_agent(node: str = "lb1") -> StatusDoc:
    """A status document as this process's agent would publish it."""
    me = pstat.read_stat(os.getpid())
    assert me is not None
    agent = AgentInfo(
        pid=os.getpid(), start_ticks=me.start_ticks, create_time=1.0, node=node, version="t"
    )
    return StatusDoc(
        agent=agent,
        summary="",
        vrrp={"VI_1": VipsView(state="MASTER", vips=["192.0.2.100"], held=["192.0.2.100"])},
    )


def test_a_view_no_longer_written_is_not_served_as_current(
    tmp_path: Path, control_dir: Path
) -> None:
    """A reload that turns the cluster watch off leaves the agent running but its view
    unwritten from then on: the receiver must not go on serving the last one as this node's
    current view (its writer still runs, so it would pass the liveness check, and a frozen
    MASTER in it is a split brain on the peer the next time the peer takes the VIP)."""
    sel = Selector()
    alerts: list[tuple[str, str]] = []
    peering = Peering(sel, lambda k, t: alerts.append((k, t)), lambda: None, lambda job: None)
    on = peering_config(tmp_path, control_dir, watch=True)
    staging = on.staging_path()
    try:
        peering.start(on)
        assert peering.cluster is not None
        peering.local(this_agent())
        conn = Conn(staging)
        conn.greeting()
        head, body = conn.get("node.json")
        assert head.startswith(b"DATA ") and b'"MASTER"' in body  # served while written
        conn.kill()
        # SIGHUP with [cluster] watch = false: the agent rebuilds its peering without it.
        assert peering.stop()
        peering.start(peering_config(tmp_path, control_dir, watch=False))
        assert peering.cluster is None
        peering.local(this_agent())
        conn = Conn(staging)
        conn.greeting()
        head, _ = conn.get("node.json")
        conn.kill()
        assert head.startswith(b"ERR "), head
    finally:
        peering.stop()
        sel.close()


def inside(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is running ``function`` now (anywhere down its stack)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_ending_the_watch_is_not_held_up_by_another_channel_opening_to_the_peer(
    tmp_path: Path, control_dir: Path
) -> None:
    """The watch waits for the sync link's session to the same peer to open first; when the
    agent ends the watch meanwhile (a reload, shutdown: on its loop), that wait ends at once,
    not when the other session's ssh gives up on a peer that never answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # TCP connects; no ssh banner ever comes
    peer = Peer("lb2", "127.0.0.1", silent.getsockname()[1])
    key = tmp_path / "no_key"
    sync = Channel(Transport(key, control_dir, None, timeout=5))
    watch = Channel(Transport(key, control_dir, None, timeout=5))
    got: dict[str, object] = {}
    first = threading.Thread(target=lambda: got.update(sync=sync.fetch(peer, "status.json", key)))
    second = threading.Thread(target=lambda: got.update(watch=watch.wait(peer, NODE, None, 1)))
    try:
        first.start()
        wait_for(lambda: peer in sync._sessions, 5, what="the sync link's ssh under way")
        second.start()
        wait_for(lambda: inside(second, "_open"), 5, what="the watch opening its session")
        started = time.monotonic()
        watch.end_sessions()
        second.join(5)
        took = time.monotonic() - started
        assert not second.is_alive() and took < 1.0, took
        assert got["watch"].outcome == "failed"  # type: ignore[attr-defined]
    finally:
        watch.end_sessions()
        sync.close(peer)
        first.join(15)
        second.join(15)
        silent.close()
