"""Delivering versions to one peer: the pure status classification and backoff, and the
PeerLink thread against a peer whose staging directory is on the local disk and whose ssh
port is a real TCP listener on loopback (what the link knocks on while the peer is away)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbwatch.backoff import delay as retry_delay
from lbwatch.events import Outcome
from lbwatch.services import CommandResult
from lbwatch.sync.peers import (
    Attempt,
    PeerLink,
    PeerState,
    PeerView,
    Said,
    Watch,
    classify,
    failed,
    watch_after,
    watch_knocked,
)
from lbwatch.sync.peerstatus import FileStatus, Held, Result
from lbwatch.sync.receive import Received, write_status
from lbwatch.sync.transport import Peer
from lbwatch.sync.versions import Version, parse_staged_name
from tests.fakes import FakeCarrier
from tests.util import wait_for


def version(text: str, edited: int = 1) -> Version:
    return Version("haproxy.cfg", "lb1", edited, edited, hashlib.sha256(text.encode()).hexdigest())


def entry(
    current: Version | None, received: Version | None, result: Result, message: str = ""
) -> FileStatus:
    def held(v: Version | None) -> Held | None:
        return Held.of(v) if v is not None else None

    return FileStatus(
        result=result, message=message, received=held(received), current=held(current), at=1.0
    )


A, B = version("a", 1), version("b", 2)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, None),
        (entry(B, None, "current"), Said(PeerState.IN_SYNC, "")),
        (entry(A, None, "local-edit"), None),
        (entry(A, B, "rejected", "exit 1: x"), Said(PeerState.REJECTED, "exit 1: x")),
        (entry(A, B, "reload-failed", "r"), Said(PeerState.REJECTED, "r")),
        (entry(A, B, "kept-local", "newer"), Said(PeerState.PEER_NEWER, "newer")),
        # A verdict about another version of the same content says nothing about ours.
        (entry(A, version("b", 9), "rejected"), None),
        # Refused as claiming too much: not settled, pushed again (the peer has learned).
        (entry(A, B, "implausible", "claims"), Said(PeerState.REJECTED, "claims", False)),
        # The same content, held under an earlier version (a sync --now re-claim): pushed.
        (entry(version("b", 1), None, "current"), None),
        # A later version of other content: ours would only be kept aside there.
        (
            entry(version("c", 3), None, "current"),
            Said(PeerState.PEER_NEWER, "the peer holds a later version"),
        ),
    ],
)
def test_classify(status: FileStatus | None, expected: tuple[PeerState, str] | None) -> None:
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


class Port:
    """The peer's ssh port on loopback: a real listener that can be shut and opened again on
    the same number. It counts the connections it accepted: the link's knocks."""

    def __init__(self) -> None:
        self.accepted = 0
        self._sock: socket.socket | None = None
        self.number = self._bind(0).getsockname()[1]
        self.shut()

    def _bind(self, number: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", number))
        sock.listen(8)
        self._sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return sock

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # shut
            self.accepted += 1
            conn.close()

    def open(self) -> None:
        self._bind(self.number)

    def shut(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            self._sock.close()
            self._sock = None


Rig = tuple[PeerLink, FakeCarrier, list[PeerView], Path]


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., tuple[Rig, Port]]]:
    """A link to a peer at 127.0.0.1 whose port starts shut, with the given retry timing."""
    made: list[tuple[PeerLink, Port]] = []

    def make(retry_initial: float = 0.05, retry_max: float = 0.2) -> tuple[Rig, Port]:
        staging = tmp_path / f"peer-staging-{len(made)}"
        staging.mkdir()
        carrier = FakeCarrier(staging)
        views: list[PeerView] = []
        port = Port()
        peer = Peer("lb2", "127.0.0.1", port.number)
        link = PeerLink(
            peer, carrier, 2.0, retry_initial, retry_max, views.append, knock_every=0.05
        )
        link.start()
        made.append((link, port))
        return (link, carrier, views, tmp_path), port

    yield make
    for link, port in made:
        link.stop()
        port.shut()


@pytest.fixture
def rig(make_rig: Callable[..., tuple[Rig, Port]]) -> Rig:
    return make_rig()[0]


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


def test_a_settled_link_rechecks_by_reading_only(rig) -> None:
    """In sync, the link reads the peer's status again every retry_max (a peer that lost its
    state is seen and brought back in line); those looks never push: three of them counted
    after the link settled, and no push among them."""
    link, carrier, _, tmp = rig
    peer = Peerside(carrier.staging)
    try:
        link.set_target(A, source(tmp, A, "a"))
        wait_for(lambda: link.view().state is PeerState.IN_SYNC, 5, what="in sync")
        settled = len(carrier.calls)
        wait_for(
            lambda: sum(w.startswith("fetch") for _, w in carrier.calls[settled:]) >= 3,
            5,
            what="three re-checks",
        )
    finally:
        peer.stop.set()
    assert not [w for _, w in carrier.calls[settled:] if w.startswith("push")]
    assert carrier.pushed == [A.staged_name()] and link.view().pushes == 1


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
    started = time.monotonic()
    link.set_target(A, source(tmp, A, "a"))
    wait_for(lambda: link.view().state is PeerState.UNREACHABLE, 5, what="unreachable")
    since = link.view().since
    wait_for(lambda: attempts(carrier, started) >= 3, 10, what="two retries")
    assert link.view().since == since  # still unreachable since the first
    assert link.view().message.startswith("ssh: connection refused (127.0.0.1:")
    link.set_target(B, source(tmp, B, "b"))
    peer = Peerside(carrier.staging)
    try:
        carrier.up = True
        wait_for(lambda: link.view().state is PeerState.IN_SYNC, 5, what="in sync")
    finally:
        peer.stop.set()
    assert carrier.pushed == [B.staged_name()]
    assert link.view().target == B


def test_the_peers_counter_is_learned_from_its_status(rig) -> None:
    """The peer holds a later edit (PEER_NEWER): the view carries that version's counter, which
    the agent counts as seen, so its own next edit wins over it."""
    link, carrier, _, tmp = rig
    theirs = Version("haproxy.cfg", "lb2", 57, 1, hashlib.sha256(b"theirs").hexdigest())
    write_status(carrier.staging, Received("haproxy.cfg", "kept-local", "newer", A, theirs))
    link.set_target(A, source(tmp, A, "a"))
    wait_for(lambda: link.view().state is PeerState.PEER_NEWER, 5, what="peer newer")
    assert link.view().peer_counter == 57 and carrier.pushed == []


def test_what_the_peer_holds_is_read_at_once_on_asking(rig) -> None:
    """Asked from another thread, the link reads the peer's status file at once and gives the
    counter of the version it holds; nothing for a peer with no status, or one unreachable."""
    link, carrier, _, _ = rig
    assert link.held_now("haproxy.cfg") is None
    theirs = Version("haproxy.cfg", "lb2", 1_000_057, 1, hashlib.sha256(b"theirs").hexdigest())
    write_status(carrier.staging, Received("haproxy.cfg", "applied", "installed", A, theirs))
    assert link.held_now("haproxy.cfg") == 1_000_057
    carrier.up = False
    assert link.held_now("haproxy.cfg") is None


def attempts(carrier: FakeCarrier, since: float) -> int:
    """Delivery attempts begun after ``since``: each begins with a status read or a push."""
    return sum(1 for at, _ in carrier.calls if at >= since)


def test_a_refusal_by_the_peers_receiver_is_retried_with_backoff_over_the_kept_connection(
    make_rig,
) -> None:
    """A peer whose receiver refuses (its staging full, its sessions for this key all taken) is
    tried again with the backoff, not in a loop, and its kept connection, which carried the
    refusal, is not ended; once the receiver takes the version it is delivered."""
    (link, carrier, _, tmp), _ = make_rig(retry_initial=0.2, retry_max=0.4)
    carrier.up = False
    carrier.fault = "lbwatch receive: busy: 8 sessions of lb1's sync key are open here"
    started = time.monotonic()
    link.set_target(A, source(tmp, A, "a"))
    wait_for(lambda: link.view().failures >= 3, 5, what="three refused attempts")
    assert "busy" in link.view().message and link.view().state is PeerState.UNREACHABLE
    # At 0, 0.2, 0.6, 1.0, 1.4 ... s: the backoff, not a loop.
    assert attempts(carrier, started) <= 2 + (time.monotonic() - started) / 0.4
    assert carrier.closed == 0
    peer = Peerside(carrier.staging)
    try:
        carrier.up = True
        wait_for(lambda: link.view().state is PeerState.IN_SYNC, 5, what="in sync")
    finally:
        peer.stop.set()


def test_returning_peer_is_delivered_to_as_soon_as_its_port_answers(make_rig) -> None:
    """A peer that was down is delivered to within a second of its ssh port answering again,
    not when the backoff (5 s here, a minute after a long outage) next comes round; the kept
    connection is ended after each failed attempt."""
    (link, carrier, _, tmp), port = make_rig(retry_initial=5.0, retry_max=60.0)
    carrier.up = False
    link.set_target(A, source(tmp, A, "a"))
    wait_for(lambda: link.view().state is PeerState.UNREACHABLE, 5, what="unreachable")
    assert link.view().message == f"ssh: connection refused (127.0.0.1:{port.number})"
    assert carrier.closed == 1
    peer = Peerside(carrier.staging)
    try:
        back = time.monotonic()
        carrier.up = True
        port.open()
        wait_for(lambda: link.view().state is PeerState.IN_SYNC, 2, what="in sync")
        took = time.monotonic() - back
    finally:
        peer.stop.set()
    print(f"delivered {took:.2f} s after the port answered (backoff: 5 s)")
    assert carrier.pushed == [A.staged_name()]
    assert port.accepted == 1  # one knock found it back; none once it answered


def test_new_version_resets_the_backoff(make_rig) -> None:
    """A new version is tried at once and its retries start again from retry_initial, however
    far the backoff grew for the version before."""
    (link, carrier, _, tmp), _port = make_rig(retry_initial=0.05, retry_max=10.0)
    carrier.up = False
    link.set_target(A, source(tmp, A, "a"))
    # 0.05, 0.1, 0.2, 0.4, 0.8: the sixth failure waits 1.6 s, the next 3.2 s.
    wait_for(lambda: len(carrier.calls) >= 6, 5, what="the backoff grown")
    started = time.monotonic()
    link.set_target(B, source(tmp, B, "b"))
    wait_for(lambda: attempts(carrier, started) >= 3, 1.0, what="B tried three times")
    assert link.view().target == B


def test_port_that_answers_while_ssh_fails_is_not_knocked_on(make_rig) -> None:
    """ssh reaches the peer and is refused (key not authorized): the link keeps to the backoff
    and never knocks, so the peer's sshd logs no bare connections."""
    (link, carrier, _, tmp), port = make_rig(retry_initial=0.2, retry_max=0.2)
    port.open()
    carrier.up = False
    carrier.fault = FakeCarrier.DENIED
    started = time.monotonic()
    link.set_target(A, source(tmp, A, "a"))
    wait_for(lambda: link.view().state is PeerState.UNREACHABLE, 5, what="unreachable")
    assert link.view().message.startswith("ssh: permission denied (publickey) for root@127.0.0.1")
    threading.Event().wait(1.0)
    tried = attempts(carrier, started)
    assert 3 <= tried <= 7, tried  # one every 0.2 s
    assert port.accepted == 0


def test_port_and_ssh_that_disagree_do_not_drive_each_other(make_rig) -> None:
    """ssh says the port is shut while a knock finds it open (ssh goes some other way): each
    backoff attempt is brought forward at most once, never a loop at the knock's pace."""
    (link, carrier, _, tmp), port = make_rig(retry_initial=0.3, retry_max=0.3)
    port.open()
    carrier.up = False
    started = time.monotonic()
    link.set_target(A, source(tmp, A, "a"))
    threading.Event().wait(1.5)
    tried = attempts(carrier, started)
    # Two per 0.3 s period (the backoff's and one brought forward), against about 30 if every
    # answered knock (one per 0.05 s) brought one forward.
    assert 4 <= tried <= 2 * 5 + 3, tried
    assert link.view().state is PeerState.UNREACHABLE


DOWN = Attempt(PeerState.UNREACHABLE, "ssh: connection refused", unanswered=True)
DENIED = Attempt(PeerState.UNREACHABLE, "ssh: permission denied")


@pytest.mark.parametrize(
    ("attempt", "brought_forward", "expected"),
    [
        (DOWN, False, Watch(11.0, seen_down=True)),  # ssh found the port shut: watch
        (DOWN, True, Watch(11.0, seen_down=False)),  # it answered, ssh says shut: a knock decides
        (DENIED, False, Watch()),  # the port answers, ssh fails past it: no watching
        (Attempt(PeerState.PENDING, "pushed"), False, Watch()),
    ],
)
def test_watch_after_an_attempt(attempt: Attempt, brought_forward: bool, expected: Watch) -> None:
    """Whether a failed attempt makes the link watch the peer's port, and on what evidence."""
    assert watch_after(attempt, brought_forward, 10.0, 1.0) == expected


@pytest.mark.parametrize(
    ("said", "answered"),
    [
        ("lbwatch receive: busy: 8 sessions of lb1's sync key are open here", True),
        ("lbwatch receive: unready (no-staging, as root): /var/lib/lbwatch/incoming: x", True),
        ("ssh: connect to host 192.0.2.12 port 22: Connection refused", False),
        ("bash: line 1: lbwatch: command not found", False),
    ],
)
def test_a_receiver_that_answered_keeps_the_connection(said: str, answered: bool) -> None:
    """A refusal the peer's receiver said, also that it cannot serve at all (lbwatch there not
    set up for sync yet), came over a working connection, kept for the next attempt."""
    result = CommandResult(Outcome.FAILED, "exit 1", 0.1, said + "\n")
    assert failed(result, "push").answered is answered


@pytest.mark.parametrize(
    ("watch", "answered", "expected"),
    [
        (Watch(5.0, seen_down=True), False, (Watch(11.0, seen_down=True), False)),
        (Watch(5.0, seen_down=False), False, (Watch(11.0, seen_down=True), False)),
        (Watch(5.0, seen_down=True), True, (Watch(), True)),  # back: deliver now
        (Watch(5.0, seen_down=False), True, (Watch(), False)),  # never seen shut: the backoff
    ],
)
def test_watch_after_a_knock(watch: Watch, answered: bool, expected: tuple[Watch, bool]) -> None:
    """A knock unanswered keeps watching; answered after the port was seen shut, it delivers."""
    assert watch_knocked(watch, answered, 10.0, 1.0) == expected
