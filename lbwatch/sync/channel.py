"""The sender's end of a sync connection: one ssh session per peer, kept open, running the
peer's ``lbwatch receive`` (``sink``), over which a push or a status read is one request and
its answer: about a millisecond on a LAN, where rsync through rrsync started two processes on
the peer per transfer (about 110 ms here).

A peer whose sync key still runs rrsync (authorized before lbwatch had a receiver) says so when
the session starts ("SSH_ORIGINAL_COMMAND does not run rsync"); that peer is then served by
rsync (``Transport``) until its link is closed, and the first time the log says how to move it
to the receiver. Failures are ``CommandResult``s whose output is ssh's (or the receiver's) own
words, explained as rsync's are (``transport.explain``).

A session found ended before a request (sshd restarted, the kept connection closed) is opened
again at once, without failing the request; so is one whose end the sender's ssh had not yet
noticed when the request went out (it ends before answering anything: the request is sent
once more, over a new session; both requests are idempotent). One that ends otherwise or
stalls during a request fails it, and is closed. Not thread-safe per peer: each peer has one
link thread, and a lock per peer keeps a ``close`` from another thread from racing it.

Blocking; for worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from lbwatch.events import Outcome
from lbwatch.services import CommandResult
from lbwatch.sync.sink import GREETING, MAX_STATUS, ONLY_OURS, PROTOCOL
from lbwatch.sync.transport import Peer, Transport, explain

log = logging.getLogger(__name__)

LEGACY = "does not run rsync"  # rrsync's answer to a command that is not rsync


ERRORS_KEPT = 64 * 1024  # ssh's stderr of a kept session, at most, between two requests

# ssh with ControlMaster=auto that finds no master yet connects on its own, and one that then
# loses the race for the control socket ("ControlSocket ... already exists, disabling
# multiplexing") keeps that TCP connection to itself for its session's life. The sync link
# and the cluster watch, each on its own channel, ask the same peer at once at the agent's
# start and whenever the peer answers again: so sessions through one control socket are
# opened one at a time in this process, and the second finds the first one's master.
_opening: dict[tuple[str, str, str, int], threading.Lock] = {}
_opening_guard = threading.Lock()


def _opening_lock(control_dir: Path, peer: Peer) -> threading.Lock:
    with _opening_guard:
        key = (str(control_dir), peer.user, peer.host, peer.port)
        return _opening.setdefault(key, threading.Lock())


def _ready(fd: int, event: int, timeout: float) -> bool:
    """Whether ``fd`` is ready for ``event`` (or hung up) within ``timeout`` seconds; poll, not
    select, which fails on descriptors past 1023."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(0.0, timeout) * 1000))


class Ended(Exception):
    """The session ended or stalled; the message says how. ``gone``: it ended (end of its
    output, or of its input), where a stall would not have."""

    def __init__(self, how: str, gone: bool = False) -> None:
        super().__init__(how)
        self.gone = gone


@dataclass
class _Session:
    proc: subprocess.Popen[bytes]
    errors: IO[bytes]  # ssh's stderr: a file, since the ssh master it forks would hold a pipe
    pending: bytearray = field(default_factory=bytearray)
    closed: bool = False  # ended by ``Channel.close``, not by the peer

    def alive(self) -> bool:
        """Still running, and nothing unasked for waiting (the receiver's last words)."""
        if self.proc.poll() is not None or self.pending:
            return False
        assert self.proc.stdout is not None
        return not _ready(self.proc.stdout.fileno(), select.POLLIN, 0.0)

    def send(self, data: bytes | memoryview, deadline: float) -> None:
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        while view:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise Ended("stalled while sending")
            if not _ready(fd, select.POLLOUT, wait):
                continue
            try:
                view = view[os.write(fd, view[: 1 << 16]) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise Ended("ended while sending", gone=True) from None

    def _fill(self, deadline: float) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        if not _ready(fd, select.POLLIN, deadline - time.monotonic()):
            raise Ended("stalled: no answer in time")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise Ended("ended", gone=True)
        self.pending += chunk

    def line(self, deadline: float, limit: int = 4096) -> str:
        while b"\n" not in self.pending:
            if len(self.pending) > limit:
                raise Ended("answered with garbage")
            self._fill(deadline)
        raw, _, rest = bytes(self.pending).partition(b"\n")
        self.pending = bytearray(rest)
        return raw.decode("ascii", "replace")

    def exact(self, size: int, deadline: float) -> bytes:
        while len(self.pending) < size:
            self._fill(deadline)
        data = bytes(self.pending[:size])
        del self.pending[:size]
        return data

    def said(self) -> str:
        """What ssh and the receiver wrote to stderr (the end of it)."""
        with contextlib.suppress(OSError, ValueError):
            self.errors.seek(0, os.SEEK_END)
            self.errors.seek(max(0, self.errors.tell() - 4096))
            return self.errors.read().decode("utf-8", "replace")
        return ""

    def trim(self) -> None:
        """Keep ssh's stderr file small over a long session: what it said before this request
        explains nothing about the next one."""
        with contextlib.suppress(OSError, ValueError):
            if os.fstat(self.errors.fileno()).st_size > ERRORS_KEPT:
                self.errors.truncate(0)
                self.errors.seek(0)  # ssh writes at the offset it shares with this file

    def kill(self) -> None:
        if self.proc.returncode is not None:
            return  # reaped: its process group id may belong to someone else by now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def end(self) -> None:
        self.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.errors):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Channel:
    """``Carrier`` over kept sessions to the peers' receivers, rsync for peers still on rrsync."""

    def __init__(self, rsync: Transport) -> None:
        self.rsync = rsync
        self.timeout = rsync.timeout
        self._sessions: dict[Peer, _Session] = {}
        self._legacy: set[Peer] = set()
        self._held: dict[tuple[Peer, str], bytes] = {}  # each peer's file as last read
        self._told: set[Peer] = set()
        self._locks: dict[Peer, threading.Lock] = {}
        self._guard = threading.Lock()
        # Set by ``close`` and ``end_sessions`` for a session being opened, which they cannot
        # kill yet (no ssh started, or not yet known): its opening ends at once.
        self._opening: dict[Peer, threading.Event] = {}

    def _lock(self, peer: Peer) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(peer, threading.Lock())

    def _open(self, peer: Peer, deadline: float) -> _Session | CommandResult:
        """A new session, the peer's from now on, or the reason there is none (a CommandResult:
        FAILED or TIMEOUT; OK means the peer runs rrsync)."""
        problem = self.rsync.control_problem()
        if problem is not None:
            return CommandResult(Outcome.FAILED, problem, 0.0)
        cancel = threading.Event()
        with self._guard:
            self._opening[peer] = cancel
        try:
            return self._open_alone(peer, deadline, cancel)
        finally:
            with self._guard:
                self._opening.pop(peer, None)

    def _open_alone(
        self, peer: Peer, deadline: float, cancel: threading.Event
    ) -> _Session | CommandResult:
        """``_open`` while no other session to the same control socket opens in this process
        (waited for in short steps, so that ``close`` ends the wait at once)."""
        opening = _opening_lock(self.rsync.control_dir, peer)
        while not opening.acquire(timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
            if cancel.is_set():
                return CommandResult(Outcome.FAILED, f"ssh to {peer.name}: closed", 0.0)
            if time.monotonic() >= deadline:
                why = f"ssh to {peer.name}: another session to it was still opening"
                return CommandResult(Outcome.TIMEOUT, why, 0.0)
        try:
            if cancel.is_set():
                return CommandResult(Outcome.FAILED, f"ssh to {peer.name}: closed", 0.0)
            return self._start(peer, deadline, cancel)
        finally:
            opening.release()

    def _start(
        self, peer: Peer, deadline: float, cancel: threading.Event
    ) -> _Session | CommandResult:
        self.rsync.control_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - the session's, closed by its end()
        try:
            proc = subprocess.Popen(
                [*self.rsync.ssh_argv(peer), peer.host, PROTOCOL],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            errors.close()
            return CommandResult(Outcome.FAILED, f"cannot run ssh: {exc.strerror}", 0.0)
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        # Known from now on, so that ``close`` can end it while it waits for the greeting; a
        # ``close`` that came before it was known said so through ``cancel``.
        session = self._sessions[peer] = _Session(proc, errors)
        if cancel.is_set():
            session.closed = True
            session.kill()
        try:
            hello = session.line(deadline)
        except Ended as exc:
            self._sessions.pop(peer, None)
            return self._fail(session, peer, f"session {exc}", deadline)
        if not hello.startswith(GREETING.decode() + " "):
            self._sessions.pop(peer, None)
            session.end()
            return CommandResult(Outcome.FAILED, f"not lbwatch's receiver: {hello[:80]!r}", 0.0)
        return session

    def _fail(self, session: _Session, peer: Peer, what: str, deadline: float) -> CommandResult:
        """End ``session`` and say why, in ssh's words where it gave any."""
        timed_out = time.monotonic() >= deadline and session.proc.poll() is None
        if not timed_out:
            with contextlib.suppress(subprocess.TimeoutExpired):
                session.proc.wait(0.5)  # let ssh finish saying why
        said = session.said()
        code = session.proc.poll()
        session.end()
        if timed_out:
            return CommandResult(Outcome.TIMEOUT, f"ssh to {peer.name}: {what}", 0.0, said)
        if LEGACY in said:
            return CommandResult(Outcome.OK, "rrsync", 0.0, said)
        lines = [ln.strip() for ln in said.splitlines() if ln.strip()]
        tail = lines[-1][:300] if lines else what
        how = f"exit {code}" if code is not None and code >= 0 else what
        failed = CommandResult(Outcome.FAILED, f"{how}: {tail}", 0.0, said)
        return explain(failed, peer, self.rsync.known_hosts)

    def _request(
        self, peer: Peer, request: bytes, again: bool = True, longer: float = 0.0
    ) -> tuple[str, bytes]:
        """Send one request; the answer's first line and, for DATA, its bytes. Raises
        ``_Answer`` with the result to return when there is no answer. ``again``: a kept
        session that turns out to have ended before answering anything is replaced and the
        request sent once more (every request is idempotent). ``longer``: the answer may take
        so much longer than the timeout (a WAIT)."""
        deadline = time.monotonic() + self.timeout + longer
        session = self._sessions.get(peer)
        if session is not None and not session.alive():
            session.end()  # ended while idle: a new one, without failing the request
            session = None
        if session is not None:
            session.trim()
        kept = session is not None
        if session is None:
            opened = self._open(peer, deadline)
            if isinstance(opened, CommandResult):
                raise _Answer(opened)
            session = opened
        answer = None
        try:
            session.send(request, deadline)
            answer = session.line(deadline)
            payload = b""
            if answer.startswith("DATA "):
                size = answer[5:]
                # Nothing it may read is larger: more is a broken or hostile peer, whose
                # answer is not kept reading into memory until the timeout.
                if not size.isdigit() or len(size) > 12 or int(size) > MAX_STATUS:
                    raise Ended(f"answered with garbage: {answer[:40]!r}")
                payload = session.exact(int(size), deadline)
            return answer, payload
        except Ended as exc:
            self._sessions.pop(peer, None)
            unasked = answer is None and not session.pending and not session.closed
            if again and kept and exc.gone and unasked:
                # It ended while idle, and its ssh had not noticed yet when this request was
                # sent (the receiver or sshd restarted a moment before).
                session.end()
                return self._request(peer, request, again=False, longer=longer)
            raise _Answer(self._fail(session, peer, f"session {exc}", deadline)) from None

    def _use_rsync(self, peer: Peer, result: CommandResult) -> bool:
        if result.outcome is not Outcome.OK:
            return False
        self._legacy.add(peer)
        if peer not in self._told:
            self._told.add(peer)
            log.warning(
                "peer %s: its sync key runs rrsync, so pushes go through rsync (about 0.1 s "
                "slower each); authorize the key with lbwatch's receiver instead (README, "
                "'The sync key')",
                peer.name,
            )
        return True

    def push(self, peer: Peer, local: Path, remote_name: str) -> CommandResult:
        """Put ``local`` into the peer's staging directory as ``remote_name``."""
        return self._either(
            peer,
            lambda: self._put(peer, local, remote_name),
            lambda: self.rsync.push(peer, local, remote_name),
        )

    def fetch(self, peer: Peer, remote_name: str, local: Path) -> CommandResult:
        """Copy ``remote_name`` (the status file) from the peer's staging to ``local``."""
        return self._either(
            peer,
            lambda: self._get(peer, remote_name, local),
            lambda: self.rsync.fetch(peer, remote_name, local),
        )

    def _either(
        self,
        peer: Peer,
        receiver: Callable[[], CommandResult | None],
        rsync: Callable[[], CommandResult],
    ) -> CommandResult:
        """Through the peer's receiver, or rsync for a peer whose key runs rrsync (``receiver``
        returns None when it finds that). A key moved from rrsync to the receiver while the
        connection was kept refuses rsync once a new one logs in: then the receiver at once."""
        started = time.monotonic()
        for _ in range(2):
            with self._lock(peer):
                done = receiver() if peer not in self._legacy else None
            if done is not None:
                return _took(done, started)
            result = rsync()
            if result.outcome is not Outcome.FAILED or ONLY_OURS not in result.output:
                return result
            with self._lock(peer):
                self._legacy.discard(peer)
            log.info("peer %s: its sync key now runs lbwatch's receiver", peer.name)
        return result

    def _put(self, peer: Peer, local: Path, remote_name: str) -> CommandResult | None:
        try:
            data = local.read_bytes()
        except OSError as exc:
            # Removed meanwhile (a newer version recorded): this push fails, as rsync's did.
            why = f"cannot read {local}: {exc.strerror or exc}"
            return CommandResult(Outcome.FAILED, why, 0.0)
        head = f"PUT {remote_name} {len(data)}\n".encode()
        try:
            answer, _ = self._request(peer, head + data)
        except _Answer as no:
            return None if self._use_rsync(peer, no.result) else no.result
        if answer == "OK":
            return CommandResult(Outcome.OK, "stored", 0.0)
        return self._refused(peer, answer)

    def _get(self, peer: Peer, remote_name: str, local: Path) -> CommandResult | None:
        # The content last read: a file unchanged since comes back as "SAME", as small as a
        # keepalive, so a settled link's look every retry_max costs no more.
        held = self._held.get((peer, remote_name))
        known = f" {hashlib.sha256(held).hexdigest()}" if held is not None else ""
        try:
            answer, data = self._request(peer, f"GET {remote_name}{known}\n".encode())
        except _Answer as no:
            return None if self._use_rsync(peer, no.result) else no.result
        if answer == "SAME" and held is not None:
            data = held
        elif not answer.startswith("DATA "):
            self._held.pop((peer, remote_name), None)
            return self._refused(peer, answer)
        self._held[(peer, remote_name)] = data
        local.write_bytes(data)
        return CommandResult(Outcome.OK, "read", 0.0)

    def wait(self, peer: Peer, name: str, held: str | None, seconds: int) -> Waited:
        """A long poll of the peer's ``name`` (``sink``'s WAIT): its content once its sha256 is
        not ``held``, or "same" after ``seconds``. Never through rsync: a peer whose key runs
        rrsync answers "rrsync", and is asked again on the next call (not remembered, as the
        sync side remembers it until ``close``: the key may have been moved to the receiver
        meanwhile, and the watch has no other way to learn it)."""
        with self._lock(peer):
            request = f"WAIT {name} {held or '-'} {seconds}\n".encode()
            try:
                answer, data = self._request(peer, request, longer=seconds)
            except _Answer as no:
                if no.result.outcome is Outcome.OK:
                    return Waited("rrsync", message="its sync key runs rrsync")
                return Waited("failed", message=no.result.detail, output=no.result.output)
        if answer == "SAME":
            return Waited("same")
        if answer.startswith("DATA "):
            return Waited("data", data)
        if answer.startswith("STALE "):  # the view is not current: what the peer said instead
            return Waited("stale", message=answer[6:])
        return Waited("refused", message=answer[4:] if answer.startswith("ERR ") else answer[:80])

    def end_sessions(self) -> None:
        """End every session of this channel, leaving the kept connections (ssh's masters,
        shared with other channels to the same peers) alone."""
        with self._guard:
            peers = {*self._sessions, *self._opening}
        for peer in peers:
            self._interrupt(peer)
            with self._lock(peer):
                session = self._sessions.pop(peer, None)
                if session is not None:
                    session.end()

    def _interrupt(self, peer: Peer) -> None:
        """Make a request in flight to ``peer`` on another thread fail at once: its session is
        killed, or its opening ended."""
        with self._guard:
            cancel = self._opening.get(peer)
        if cancel is not None:
            cancel.set()  # before the session is looked for: see ``_start``
        session = self._sessions.get(peer)
        if session is not None:
            session.closed = True
            session.kill()

    def _refused(self, peer: Peer, answer: str) -> CommandResult:
        """The failure an answer other than the request's success says (ERR, or one that does
        not belong to the request)."""
        why = answer[4:] if answer.startswith("ERR ") else f"answered {answer[:80]!r}"
        output = f"lbwatch receive: {why}"
        return explain(CommandResult(Outcome.FAILED, output, 0.0, output), peer, None)

    def close(self, peer: Peer) -> CommandResult:
        """End the session and the kept connection; a peer on rrsync is asked again next time
        (its key may have been moved to the receiver meanwhile). A request in flight on another
        thread fails at once rather than holding this up until its timeout."""
        self._interrupt(peer)
        with self._lock(peer):
            session = self._sessions.pop(peer, None)
            if session is not None:
                session.end()
            self._legacy.discard(peer)
            for key in [k for k in self._held if k[0] == peer]:
                del self._held[key]
        return self.rsync.close(peer)


@dataclass(frozen=True)
class Waited:
    """What a long poll (``Channel.wait``) came back with."""

    outcome: Literal["data", "same", "stale", "refused", "failed", "rrsync"]
    data: bytes = b""
    message: str = ""  # why, for refused, failed and rrsync; for stale, the rest of the answer
    output: str = ""  # for failed: what ssh and the receiver said (``transport.diagnose``)


class _Answer(Exception):
    def __init__(self, result: CommandResult) -> None:
        super().__init__(result.detail)
        self.result = result


def _took(result: CommandResult, started: float) -> CommandResult:
    return CommandResult(result.outcome, result.detail, time.monotonic() - started, result.output)
