"""A peer's cluster watch (``cluster.watch.PeerWatch``) over a real sshd on loopback, with the
sync key restricted to lbwatch's receiver as an operator installs it: the view arrives, a
change arrives at once, an unchanged view is confirmed every heartbeat, an agent that ended
and a key still on rrsync are told apart, and a push on the sync channel is not held up by the
watch's long poll on the same peer."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lbwatch.cluster.watch import AGENT_DOWN, RRSYNC, UP, PeerWatch, Report
from lbwatch.events import Outcome
from lbwatch.sync.channel import Channel
from lbwatch.sync.transport import Peer, Transport, rrsync_authorized_keys_line
from tests.sshd import NEEDS_SSHD, Sshd
from tests.test_cluster_sink import replace_file, ticks_of, view
from tests.test_sync_channel import receiver_line, version_file
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
    finally:
        w.stop()
        channel.end_sessions()
        w.join(5)
        channel.close(w.peer)  # and the kept connection
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
