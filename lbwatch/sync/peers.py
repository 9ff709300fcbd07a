"""Delivering this node's current version to one peer, and knowing whether the peer applied it.

One thread per peer (``PeerLink``), so a slow or dead peer never delays another. It always works
on the newest target: a version replaced while it was being delivered is dropped, never replayed.
Delivery is: read the peer's status file (the hashes it holds) over the kept ssh connection; if
it already holds the target, done (this is also the start-up comparison); otherwise push into
its staging directory and read its status again until it says what it did with the version.
An unreachable peer, or one that does not answer in time, is tried again with backoff.

A peer whose ssh port did not answer is not left to the backoff, which has grown to
``retry_max`` (a minute) after a long outage: the link knocks on the port (a TCP connect, no
ssh) every second and delivers as soon as it answers again, so a returning peer gets the
newest version within about two seconds (1.2 to 1.8 s in the lab: knock, then delivery). The
knock only ever brings an attempt forward; the backoff's attempts go on meanwhile, so a peer
that ssh reaches some other way (a ProxyJump in ssh_config) is still delivered to. A peer whose
port answers while ssh fails past it (a key, host key or rrsync refusal) is not knocked on at
all: it is retried with the backoff alone. A new version resets the backoff.

``classify`` is pure, the backoff is ``backoff.delay``; the thread is the mechanism around them.
"""

from __future__ import annotations

import enum
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from lbwatch import backoff
from lbwatch.events import Outcome
from lbwatch.services import CommandResult
from lbwatch.sync import peerstatus
from lbwatch.sync.peerstatus import STATUS, FileStatus
from lbwatch.sync.timing import step
from lbwatch.sync.transport import Carrier, Failure, Peer, diagnose, knock, unanswered
from lbwatch.sync.versions import Version

log = logging.getLogger(__name__)

RSYNC_PARTIAL = "exit 23"  # rsync: some files were not transferred (here: no status file yet)

# Watching a peer whose port did not answer: a knock every KNOCK_EVERY seconds, each waiting at
# most KNOCK_TIMEOUT. Linux resends an unanswered SYN after 1 s, so a knock sends two; each
# knock starts afresh, where one long connect would wait out SYN backoff (1, 2, 4 s ...).
KNOCK_EVERY = 1.0
KNOCK_TIMEOUT = 1.5


class PeerState(str, enum.Enum):
    IDLE = "idle"  # nothing to deliver yet (no version recorded)
    CHECKING = "checking"
    IN_SYNC = "in-sync"
    PENDING = "pending"  # pushed, not yet applied there
    REJECTED = "rejected"  # the peer's checker or reload refused it
    PEER_NEWER = "peer-newer"  # the peer holds a later edit and kept it (it will push it)
    UNREACHABLE = "unreachable"


# States after which the version needs nothing more from us.
SETTLED = (PeerState.IN_SYNC, PeerState.REJECTED, PeerState.PEER_NEWER)


@dataclass(frozen=True)
class PeerView:
    peer: str
    state: PeerState
    since: float  # wall-clock time the peer entered this state
    message: str
    target: Version | None  # what we want it to hold
    peer_digest: str | None  # what it holds, as last read
    pushes: int  # successful pushes so far, over the agent's lifetime
    # The same instant as ``since`` on the monotonic clock: how long a peer has been unreachable
    # is measured on it, so a wall-clock step neither raises nor hides the alert.
    since_mono: float = 0.0
    # The edit counter of what the peer holds, as last read: seen by this node (a Lamport
    # clock learns from every message), so its next edit wins over it.
    peer_counter: int | None = None
    failures: int = 0  # attempts that could not reach it, over the agent's lifetime
    left_in_sync: float | None = None  # wall-clock time it last stopped being in sync


class Said(NamedTuple):
    state: PeerState
    message: str
    settled: bool = True  # nothing more to do for this target


def classify(entry: FileStatus | None, target: Version) -> Said | None:
    """What the peer's status entry for the file says about ``target``; None when it says
    nothing yet (not received, or not processed): then it is pushed."""
    if entry is None:
        return None
    held = entry.current.key() if entry.current is not None else None
    # The same content is in sync unless it was reached by fewer edits than the target (a
    # `sync --now` re-claim): then it is pushed too, and the peer notes the later version and
    # its counter. Two nodes that recorded the same file at their first starts are in sync.
    if held is not None and held[2] == target.digest and held[0] >= target.counter:
        return Said(PeerState.IN_SYNC, "")
    if held is not None and held[2] != target.digest and held > target.key():
        # It holds a later version, which reaches this node the same way: pushing this one
        # would only be kept aside there, as a conflict that is none.
        return Said(PeerState.PEER_NEWER, "the peer holds a later version")
    received = entry.received.key() if entry.received is not None else None
    if received != target.key():
        return None
    if entry.result in ("rejected", "reload-failed"):
        return Said(PeerState.REJECTED, entry.message)
    if entry.result == "implausible":
        # Refused as claiming too much for what the peer vouches for, after it asked its peers
        # (this node among them) what they hold: not final, the peer may have found this node
        # unreachable then, or learn the counter later from its own link.
        return Said(PeerState.REJECTED, entry.message, settled=False)
    if entry.result == "kept-local":
        return Said(PeerState.PEER_NEWER, entry.message)
    return None


@dataclass(frozen=True)
class Attempt:
    state: PeerState
    message: str
    peer_digest: str | None = None
    settled: bool = False  # nothing more to do for this target
    peer_counter: int | None = None  # the edit counter of what the peer holds, as read
    unanswered: bool = False  # the peer's port did not answer: watch for its return
    # The peer's receiver answered with a refusal (staging full, its sessions all taken, no
    # staging it can use): the kept connection works and is kept.
    answered: bool = False


class Due(enum.Enum):
    """What the link's thread wakes up for."""

    STOP = "stop"
    DELIVER = "deliver"  # a target not attempted yet, or the backoff's next attempt
    KNOCK = "knock"  # time to see whether a peer that did not answer is back


@dataclass(frozen=True)
class Watch:
    """Watching a peer whose ssh port did not answer, for its return. ``knock_at``: when to
    knock next (None: not watching); ``seen_down``: the port has been found shut since the last
    attempt, so its answering now means the peer came back."""

    knock_at: float | None = None
    seen_down: bool = False


def watch_after(attempt: Attempt, brought_forward: bool, now: float, every: float) -> Watch:
    """Whether to watch the peer after a failed ``attempt``. ssh finding the port shut is
    evidence the peer is down, unless this very attempt came from the port answering: then ssh
    and the port disagree (ssh goes some other way), and only a knock that goes unanswered
    counts, so the two never drive each other in a loop."""
    if not attempt.unanswered:
        return Watch()
    return Watch(now + every, seen_down=not brought_forward)


def watch_knocked(watch: Watch, answered: bool, now: float, every: float) -> tuple[Watch, bool]:
    """After a knock: the new watch, and whether to deliver now (the peer is back)."""
    if not answered:
        return Watch(now + every, seen_down=True), False
    # It answers: no more knocking until ssh fails to reach it again.
    return Watch(), watch.seen_down


def failed(res: CommandResult, doing: str) -> Attempt:
    """An UNREACHABLE attempt from a failed transfer: ssh's reason as it is (it says who
    failed), anything else prefixed with what was being done."""
    failure = diagnose(res.output)[0]
    message = res.detail if failure is not Failure.OTHER else f"{doing} failed: {res.detail}"
    answered = failure in (Failure.RECEIVER, Failure.UNREADY)
    return Attempt(PeerState.UNREACHABLE, message, unanswered=unanswered(res), answered=answered)


class PeerLink:
    def __init__(
        self,
        peer: Peer,
        transport: Carrier,
        confirm: float,
        retry_initial: float,
        retry_max: float,
        on_change: Callable[[PeerView], object],
        knock_every: float = KNOCK_EVERY,
        knock_timeout: float = KNOCK_TIMEOUT,
    ) -> None:
        self.peer = peer
        self.transport = transport
        self.confirm = confirm
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.on_change = on_change
        self.knock_every = knock_every
        self.knock_timeout = knock_timeout
        self._cond = threading.Condition()
        self._target: tuple[Version, Path] | None = None
        self._fresh = False
        self._gen = 0
        self._stop = False
        self._view = PeerView(
            peer.name, PeerState.IDLE, time.time(), "", None, None, 0, time.monotonic()
        )
        self._thread = threading.Thread(target=self._run, name=f"lbwatch-peer-{peer.name}")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def set_target(self, version: Version, source: Path, fresh: bool = False) -> None:
        """Deliver ``version`` (content in ``source``); replaces whatever was being delivered.
        ``fresh``: just made here, so skip the first status read (the start-up comparison
        reads it)."""
        with self._cond:
            self._target = (version, source)
            self._fresh = fresh
            self._gen += 1
            self._cond.notify()

    def view(self) -> PeerView:
        with self._cond:
            return self._view

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def _report(
        self, target: Version | None, attempt: Attempt, gen: int | None, pushed: bool = False
    ) -> None:
        """Record the peer's new state; ``gen``: dropped when that delivery was superseded
        meanwhile (its outcome is moot and must not hide the newer one's)."""
        with self._cond:
            if gen is not None and gen != self._gen:
                if pushed:  # still a push made
                    self._view = replace(self._view, pushes=self._view.pushes + 1)
                return
            old = self._view
            same = old.state is attempt.state
            since = old.since if same else time.time()
            since_mono = old.since_mono if same else time.monotonic()
            digest = attempt.peer_digest if attempt.peer_digest is not None else old.peer_digest
            counter = attempt.peer_counter if attempt.peer_counter is not None else old.peer_counter
            left = old.state is PeerState.IN_SYNC and attempt.state is not PeerState.IN_SYNC
            unreached = attempt.state is PeerState.UNREACHABLE
            new = replace(
                old,
                failures=old.failures + (1 if unreached else 0),
                left_in_sync=time.time() if left else old.left_in_sync,
                state=attempt.state,
                since=since,
                since_mono=since_mono,
                message=attempt.message,
                target=target,
                peer_digest=digest,
                peer_counter=counter,
                pushes=old.pushes + (1 if pushed else 0),
            )
            if new == old:
                return
            self._view = new
        self.on_change(new)

    def held_now(self, name: str) -> int | None:
        """The edit counter of the version the peer holds now, from its status file read at
        once; None if it holds none or cannot be read. From any thread: the transport takes
        the peer's lock for each request, so this waits for a request of the link's own."""
        with tempfile.TemporaryDirectory(prefix="lbwatch-ask-") as tmp:
            entry = self._read_status(Path(tmp), name)
        if isinstance(entry, FileStatus) and entry.current is not None:
            return entry.current.counter
        return None

    def _superseded(self, gen: int) -> bool:
        with self._cond:
            return self._stop or self._gen != gen

    def _wait(self, done: int, retry_at: float | None, knock_at: float | None) -> Due:
        """Sleep until a new target, the next retry of target ``done`` or the next knock."""
        with self._cond:
            while not self._stop:
                if self._target is not None and self._gen != done:
                    return Due.DELIVER  # a new target
                if self._target is None or retry_at is None:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if retry_at <= now:
                    return Due.DELIVER  # time to try the same target again
                if knock_at is not None and knock_at <= now:
                    return Due.KNOCK
                wake = retry_at if knock_at is None else min(retry_at, knock_at)
                self._cond.wait(wake - now)
            return Due.STOP

    def _run(self) -> None:
        done = -1  # the generation attempted last; retried at retry_at unless settled
        failures = 0  # failed attempts in a row at generation ``done``
        retry_at: float | None = None
        watch = Watch()
        forward = False  # the next attempt is brought forward: the peer's port answers again
        while True:
            due = self._wait(done, retry_at, watch.knock_at)
            if due is Due.STOP:
                return
            if due is Due.KNOCK:
                answer = knock(self.peer, self.knock_timeout)
                watch, forward = watch_knocked(
                    watch, answer.outcome is Outcome.OK, time.monotonic(), self.knock_every
                )
                if not forward:
                    continue
                log.info(
                    "peer %s: %s:%d answers again; delivering now",
                    self.peer.name,
                    self.peer.host,
                    self.peer.port,
                )
            with self._cond:
                if self._target is None:  # cleared meanwhile: nothing to deliver
                    forward = False
                    continue
                (target, source), gen = self._target, self._gen
                fresh = self._fresh and gen != done  # a re-check or a retry reads first
            if gen != done:
                failures = 0  # a new version starts its own backoff
            retry_at, watch = None, Watch()
            brought_forward, forward = forward, False
            attempt = self._attempt(target, source, gen, fresh)
            if self._superseded(gen):
                continue  # a newer target (or none) replaced this one: its outcome is moot
            self._report(target, attempt, gen)
            done = gen
            if attempt.settled:
                # Looked at again every retry_max: a peer restored from a backup or rebuilt
                # with its state lost is brought in line without waiting for the next edit (one
                # status read over the kept connection; a push only if it lacks the version).
                failures = 0
                retry_at = time.monotonic() + self.retry_max
                continue
            failures += 1
            now = time.monotonic()
            delay = backoff.delay(failures, self.retry_initial, self.retry_max)
            retry_at = now + delay
            watch = watch_after(attempt, brought_forward, now, self.knock_every)
            log.info(
                "peer %s: %s (%s); trying again in %.1f s%s",
                self.peer.name,
                attempt.state.value,
                attempt.message,
                delay,
                ", or as soon as its port answers" if watch.knock_at is not None else "",
            )

    def _attempt(self, target: Version, source: Path, gen: int, fresh: bool) -> Attempt:
        try:
            attempt = self._deliver(target, source, gen, fresh)
        except Exception as exc:  # a bug here must not end deliveries for good
            log.exception("peer %s: delivery failed", self.peer.name)
            attempt = Attempt(PeerState.UNREACHABLE, f"internal error: {exc}")
        if attempt.state is PeerState.UNREACHABLE and not attempt.answered:
            # The kept connection may be one that died without a word (the peer's host went
            # away): the next attempt must not go through it and wait for its ServerAlive.
            # One the receiver refused through is alive; ending it would also end the cluster
            # watch's session on it, for the next attempt to queue for a session again.
            self.transport.close(self.peer)
        return attempt

    def _read_status(self, scratch: Path, name: str) -> Attempt | FileStatus | None:
        """The peer's status entry for ``name`` (None if it has none), or an UNREACHABLE
        attempt."""
        local = scratch / STATUS
        local.unlink(missing_ok=True)
        res = self.transport.fetch(self.peer, STATUS, local)
        if res.outcome is not Outcome.OK:
            if res.detail.startswith(RSYNC_PARTIAL) or diagnose(res.output)[0] is Failure.MISSING:
                return None  # reachable, but it has never recorded anything
            return failed(res, "status read")
        try:
            return peerstatus.parse(local.read_bytes()).get(name)
        except OSError:
            return None

    def _ask(self, scratch: Path, target: Version) -> tuple[Attempt | None, float | None]:
        """What the peer's status says about ``target`` (settled, unreachable, or None: not
        processed yet), and the entry's own time, which tells a new answer from an old one."""
        entry = self._read_status(scratch, target.file)
        if isinstance(entry, Attempt):
            return entry, None
        said = classify(entry, target)
        at = entry.at if entry is not None else None
        if said is None or entry is None:
            return None, at
        current = entry.current
        digest = current.digest if current is not None else None
        counter = current.counter if current is not None else None
        return Attempt(said.state, said.message, digest, said.settled, counter), at

    def _deliver(self, target: Version, source: Path, gen: int, fresh: bool) -> Attempt:
        """``fresh``: a version just made here, which the peer cannot hold yet, so it is pushed
        without reading the peer's status first (one round trip less on every edit)."""
        with tempfile.TemporaryDirectory(prefix="lbwatch-peer-") as tmp:
            scratch = Path(tmp)
            before: float | None = None
            if not fresh:
                known, before = self._ask(scratch, target)
                if known is not None and (known.settled or known.state is PeerState.UNREACHABLE):
                    return known
            if self._superseded(gen):
                return Attempt(PeerState.CHECKING, "superseded by a newer version")
            with step(f"push to {self.peer.name}"):
                pushed = self.transport.push(self.peer, source, target.staged_name())
            if pushed.outcome is not Outcome.OK:
                return failed(pushed, "push")
            self._report(
                target, Attempt(PeerState.PENDING, "pushed; waiting for the peer"), gen, pushed=True
            )
            deadline = time.monotonic() + self.confirm
            pause = 0.05
            while time.monotonic() < deadline and not self._superseded(gen):
                time.sleep(pause)
                pause = min(0.5, pause * 2)
                known, at = self._ask(scratch, target)
                if known is not None and (known.settled or at != before):
                    return known
            return Attempt(
                PeerState.PENDING,
                f"pushed, not applied within {self.confirm:g} s (is lbwatch running there?)",
            )
