"""Delivering versions to one peer: the pure status classification and backoff, and the
PeerLink thread against a peer whose staging directory is on the local disk."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.backoff import delay as retry_delay
from lbwatch.sync.peers import PeerLink, PeerState, PeerView, classify
from lbwatch.sync.receive import Received, write_status
from lbwatch.sync.transport import Peer
from lbwatch.sync.versions import Version, parse_staged_name
from tests.fakes import FakeCarrier
from tests.util import wait_for


def version(text: str, edited: int = 1) -> Version:
    return Version("haproxy.cfg", "lb1", edited, hashlib.sha256(text.encode()).hexdigest())


def entry(current: Version | None, received: Version | None, result: str, message: str = ""):
    def d(v: Version | None) -> dict | None:
        return None if v is None else {"digest": v.digest, "edited_ns": v.edited_ns}

    return {"current": d(current), "received": d(received), "result": result, "message": message}


A, B = version("a", 1), version("b", 2)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, None),
        ("junk", None),
        (entry(B, None, "current"), (PeerState.IN_SYNC, "")),
        (entry(A, None, "local-edit"), None),
        (entry(A, B, "rejected", "exit 1: x"), (PeerState.REJECTED, "exit 1: x")),
        (entry(A, B, "reload-failed", "r"), (PeerState.REJECTED, "r")),
        (entry(A, B, "kept-local", "newer"), (PeerState.PEER_NEWER, "newer")),
        # A verdict about another version of the same content says nothing about ours.
        (entry(A, version("b", 9), "rejected"), None),
    ],
)
def test_classify(status: object, expected: tuple[PeerState, str] | None) -> None:
    """The peer's status entry is read for what it says about the target B, and nothing else."""
    assert classify(status, B) == expected


def test_retry_delay_doubles_up_to_the_cap() -> None:
    """Backoff is 1, 2, 4, 8 ... capped."""
    assert [retry_delay(n, 1.0, 5.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


class Peerside:
    """A stand-in for the peer's lbwatch: applies (or rejects) whatever lands in staging."""

    def __init__(self, staging: Path, verdict: str = "applied") -> None:
        self.staging = staging
        self.verdict = verdict
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            for path in self.staging.iterdir():
                v = parse_staged_name(path.name)
                if v is None:
                    continue
                path.unlink()
                now = v if self.verdict == "applied" else None
                msg = "exit 1: bad" if self.verdict == "rejected" else ""
                write_status(self.staging, Received(v.file, self.verdict, msg, v, now))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[PeerLink, FakeCarrier, list[PeerView], Path]]:
    staging = tmp_path / "peer-staging"
    staging.mkdir()
    carrier = FakeCarrier(staging)
    views: list[PeerView] = []
    link = PeerLink(Peer("lb2", "192.0.2.12"), carrier, 2.0, 0.05, 0.2, views.append)
    link.start()
    yield link, carrier, views, tmp_path
    link.stop()


def source(tmp: Path, v: Version, text: str) -> Path:
    path = tmp / v.staged_name()
    path.write_text(text)
    return path


def test_peer_already_holding_the_version_gets_no_push(rig) -> None:
    """Start-up comparison: the peer's status shows our hash, so nothing is pushed."""
    link, carrier, _, tmp = rig
    write_status(carrier.staging, Received("haproxy.cfg", "current", "", None, A))
    link.set_target(A, source(tmp, A, "a"))
    wait_for(lambda: link.view().state is PeerState.IN_SYNC, 5, what="in sync")
    assert carrier.pushed == [] and link.view().pushes == 0


def test_push_is_confirmed_by_the_peers_status(rig) -> None:
    """No status yet: push, then read the peer's status until it says it holds the version."""
    link, carrier, views, tmp = rig
    peer = Peerside(carrier.staging)
    try:
        link.set_target(A, source(tmp, A, "a"))
        wait_for(lambda: link.view().state is PeerState.IN_SYNC, 5, what="in sync")
    finally:
        peer.stop.set()
    assert carrier.pushed == [A.staged_name()] and link.view().pushes == 1
    assert [v.state for v in views] == [PeerState.PENDING, PeerState.IN_SYNC]


def test_rejection_is_reported_and_not_retried(rig) -> None:
    """The peer's checker refused the version: REJECTED with its message, and no more pushes
    of that version."""
    link, carrier, _, tmp = rig
    peer = Peerside(carrier.staging, verdict="rejected")
    try:
        link.set_target(A, source(tmp, A, "a"))
        wait_for(lambda: link.view().state is PeerState.REJECTED, 5, what="rejected")
        assert link.view().message == "exit 1: bad"
        threading.Event().wait(0.5)
    finally:
        peer.stop.set()
    assert carrier.pushed == [A.staged_name()]


def test_unreachable_peer_is_retried_and_gets_only_the_newest(rig) -> None:
    """A peer that is down is retried with backoff; versions made meanwhile replace each other,
    and when it is back only the newest is pushed."""
    link, carrier, _, tmp = rig
    carrier.up = False
    link.set_target(A, source(tmp, A, "a"))
    wait_for(lambda: link.view().state is PeerState.UNREACHABLE, 5, what="unreachable")
    since = link.view().since
    threading.Event().wait(0.3)  # a few retries, still unreachable since the first
    assert link.view().since == since and "Connection refused" in link.view().message
    link.set_target(B, source(tmp, B, "b"))
    peer = Peerside(carrier.staging)
    try:
        carrier.up = True
        wait_for(lambda: link.view().state is PeerState.IN_SYNC, 5, what="in sync")
    finally:
        peer.stop.set()
    assert carrier.pushed == [B.staged_name()]
    assert link.view().target == B


def test_cleared_target_stops_delivery(rig) -> None:
    """When the current version came from another node, nothing more is pushed: idle."""
    link, carrier, _, tmp = rig
    carrier.up = False
    link.set_target(A, source(tmp, A, "a"))
    wait_for(lambda: link.view().state is PeerState.UNREACHABLE, 5, what="unreachable")
    link.clear_target("current version came from lb2")
    carrier.up = True
    threading.Event().wait(0.5)
    assert link.view().state is PeerState.IDLE and carrier.pushed == []


def test_idle_reason_follows_the_origin_of_the_current_version(rig) -> None:
    """Idle says where the current version came from, also when the link had nothing to deliver
    (a version received at start-up) and when that origin changes while it is idle."""
    link, _, views, _ = rig
    link.clear_target("current version came from lb2")
    assert link.view().state is PeerState.IDLE
    assert link.view().message == "current version came from lb2"
    link.clear_target("current version came from lb3")
    assert link.view().message == "current version came from lb3"
    assert [v.message for v in views] == [
        "current version came from lb2",
        "current version came from lb3",
    ]
    link.clear_target("current version came from lb3")
    assert len(views) == 2  # the same reason again is no change
