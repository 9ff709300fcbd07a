"""The peer's end of a sync connection: ``lbwatch receive [--peer NAME] STAGING``, the forced
command of each peer's sync key in this node's authorized_keys (``transport.authorized_keys_line``).

**Trust boundary.** Whoever holds a peer's sync key reaches this code, as root (the key's user),
one process per ssh session; sshd's ``restrict`` takes away forwarding, pty and rc files, and
the forced command is this and nothing else. Such a holder may:
- put versions of the file this node syncs into STAGING (``PUT``): named as versions, each at
  most 64 MiB, the content matching the hash in its name, never replacing a name, within the
  staging quota (``[sync] staging_max_bytes``, ``staging_max_files``, bodies in flight in other
  sessions counted); a name of any other file is refused before its body is stored;
- read ``status.json`` and ``node.json`` (``GET``, ``WAIT``), nothing else;
- hold at most ``[sync] receiver_sessions`` sessions of that key at once (slots under ``flock``,
  ``slots``), each ending once it has neither sent nor read anything for ``idle`` seconds;
and nothing more: no command, no other path, no other name, nothing of a body left behind when
a session ends, however it ends. Everything it puts still passes the version rule and the
checker before it goes live (``receive``). What the node allows is ``limits``'s document in
``STAGING/.receiver``, which only lbwatch writes: no request can name it.

It stays running for as long as the sender keeps its ssh session open and reads framed requests
from it, so a push costs a round trip over the kept connection instead of starting rrsync and
an rsync server per push (about 110 ms on a 2-core machine).

    sender's requested command    lbwatch-sync 1        (anything else: refused, exit 1)
    receiver, once                LBWATCH-SYNC 1 <max bytes>\\n
                                  (or, with every slot of the key's pool held: "lbwatch
                                  receive: busy: ..." on stderr, exit 1, before the greeting;
                                  with no staging it can use, "lbwatch receive: unready
                                  (KIND, as USER): STAGING: ...", the same way: ``unready``)
    PUT <name> <size>\\n<size bytes>   ->  OK\\n  |  ERR <reason>\\n
    GET <file> [<sha256>]\\n            ->  DATA <size>\\n<size bytes>  |  ERR <reason>\\n
                                         |  SAME\\n: the file's sha256 is the one given
    WAIT node.json <sha256|-> <secs>\\n  ->  the same answers, once the file differs from the
                                         sha256 given, or SAME after <secs> (at most 60)
    either read of node.json            ->  STALE <ended|silent> <VIPs held|-> <why>\\n: the
                                         view is not current (below)

``<file>`` is ``status.json`` (what this node holds, for the sync sender) or ``node.json`` (this
node's view for ``status --cluster`` and split-brain detection, see ``cluster.nodeview``). A
WAIT is a long poll: the sender's cluster watch learns of a change within a tenth of a second
and an idle pair exchanges one small answer per <secs>. Either read of ``node.json`` answers
``STALE`` instead of the view when the agent that wrote it has ended (its PID and boot-relative
start time, in the file, are checked against /proc) or is silent (running, but stopped or hung:
its heartbeat is older than ``heartbeat.STALE_AFTER``), so a peer never takes the last words of
an agent that cannot speak for its current view. What it answers then is not the agent's word
but the kernel's, read by this process at that moment: which of the view's VIPs sit on this
node's interfaces, comma-separated.

- A name is a staged version's (``versions.parse_staged_name``) of this node's unit (``haproxy.cfg``
  or ``haproxy.cfg.bundle``, as the agent wrote in ``limits``; before it has written that, no
  version is taken): no path, no dot file, never the status file, which only lbwatch writes (a
  stolen key cannot forge what a peer holds).
- The content must match the hash in its name, so a damaged or forged body never lands.
- The quota is taken before the first byte of a body is stored, and given back once the
  version is in staging (``slots``).
- A body is stored in an unnamed file (``O_TMPFILE``) linked under its name once it is whole
  and its hash checked: a receiver that ends mid-body, even by SIGKILL, leaves nothing. Where
  the filesystem has no ``O_TMPFILE`` (or /proc is not mounted), a temporary dot file created
  exclusively, removed at any end but SIGKILL; one a killed receiver left is swept after
  ``staging_grace``. Either way the link never replaces a name (the same version pushed twice
  is fine).
- Every file access is relative to the staging directory's descriptor, with O_NOFOLLOW.
- A request that cannot be framed (garbage, a header over 512 bytes, a size over the limit, a
  body cut short) ends the connection, and so does one that does not come, or stalls in its
  body, for ``idle`` seconds (a sender that went away without closing: its sshd session would
  otherwise linger, holding a slot, until TCP keepalive after two hours); a refused version
  (bad name, hash, a name taken, no room) is answered with ERR and the connection goes on.
Each connection is independent: two at once (the sync link's and the cluster watch's, or a
sender restarted while its old session lingers) each store their bodies in files of their own,
within the key's sessions and the one quota.

Imported by ``cli.main`` before anything heavy: stdlib, ``pstat``, ``heartbeat``, ``versions``,
``limits``, ``slots`` and ``unready`` only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import pwd
import secrets
import select
import signal
import stat
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import BinaryIO, NoReturn

from lbwatch import heartbeat, pstat
from lbwatch.sync import limits, slots, unready
from lbwatch.sync.limits import MAX_VERSION
from lbwatch.sync.versions import parse_staged_name

PROTOCOL = "lbwatch-sync 1"  # the command the sender asks for
GREETING = b"LBWATCH-SYNC 1"
STATUS = "status.json"  # the same name as peerstatus.STATUS, which imports pydantic
NODE = "node.json"  # the agent's view of its node, for its peers (cluster.nodeview)
READABLE = (STATUS, NODE)
MAX_WAIT = 60  # seconds a WAIT may last
WAIT_STEP = 0.1  # how often a WAIT looks at the file
ALIVE_STEP = 1.0  # and at the agent that wrote it
MAX_BYTES = MAX_VERSION  # a pushed version: haproxy.cfg with its maps and certificates
MAX_STATUS = 1024 * 1024
MAX_HEADER = 512  # "PUT " + a staged name (at most 370 bytes by its pattern) + a size
CHUNK = 256 * 1024
# Said to any other command (an older lbwatch's rsync, an operator's ssh): the sender looks for it.
ONLY_OURS = "this key only takes lbwatch's own sync connections"
# Until this node's agent has said what it syncs (``limits``), no version is taken.
NOT_STARTED = (
    "this node's lbwatch has not started config sync yet: it takes no versions until it has"
)
# A body is stored in an unnamed file, linked into staging through /proc once it is whole
# (open(2), O_TMPFILE; linkat(2) with AT_SYMLINK_FOLLOW on /proc/self/fd/N, which needs no
# privilege, where AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


class Refused(Exception):
    """A version this connection will not take; answered, and the connection goes on."""


class NotCurrent(Refused):
    """The node view's agent cannot speak for it (``heartbeat.Verdict``): answered with what the
    kernel holds instead, and the connection goes on."""

    def __init__(self, verdict: heartbeat.Verdict, held: list[str]) -> None:
        super().__init__(verdict.why)
        why = " ".join(verdict.why.split())  # one line, whatever path it names
        self.answer = f"STALE {verdict.state} {','.join(held) or '-'} {why}\n"


class Broken(Exception):
    """A request that cannot be framed; the connection ends."""


class Idle(Broken):
    """Nothing came from the sender for the idle time; the connection ends."""


@dataclass(frozen=True)
class Session:
    """One connection's hold on this node: staging's descriptor, the session's slot (its
    receivers' directory, its share of the quota) and how long it may be idle (0: for ever)."""

    staging: int
    slot: slots.Slot
    idle: int

    def wait_at_most(self, active: bool) -> None:
        """From now on the sender must send within ``idle`` seconds (``active``), or has
        nothing to send for a while (a WAIT being answered)."""
        signal.alarm(self.idle if active else 0)


def _header(stream: BinaryIO) -> str | None:
    """One request line, or None at a clean end of the stream."""
    line = stream.readline(MAX_HEADER + 1)
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise Broken(
            "request line too long or cut short" if len(line) > MAX_HEADER else "cut short"
        )
    try:
        return line[:-1].decode("ascii")
    except UnicodeDecodeError:
        raise Broken("request line is not ASCII") from None


def _size(word: str, limit: int, unit: str = "bytes") -> int:
    if not word.isdigit() or len(word) > 12:
        raise Broken(f"not a number: {word[:20]!r}")
    size = int(word)
    if size > limit:
        raise Broken(f"{size} {unit} is over the limit of {limit}")
    return size


def _put(session: Session, stream: BinaryIO, name: str, size: int) -> None:
    """Land ``size`` bytes from ``stream`` as ``name`` in staging. The body is read whatever is
    wrong with the name, the quota or the disk, so the stream stays framed; a body cut short is
    Broken. Everything that can be refused without the body is, before a byte is stored."""
    version = parse_staged_name(name) if not name.startswith(".") else None
    if version is None:
        _refuse(session, stream, size, f"not a staged version's name: {name[:80]!r}")
    allowed = limits.read(session.slot.ctl)
    if allowed is None:
        _refuse(session, stream, size, NOT_STARTED)
    if version.file != allowed.unit:
        # Kept out before it is stored: a file of any other name in staging is nothing this
        # node syncs, and would only be there for something to refer to (issue 23, finding 1).
        why = f"this node does not sync {version.file} (it takes versions of {allowed.unit})"
        _refuse(session, stream, size, why)
    try:
        present = _present(session.staging, name)
    except Refused as exc:
        _refuse(session, stream, size, str(exc))
    if present:
        # The same name is the same content (its hash), pushed again: nothing more is stored.
        digest, _ = _body(session, stream, size, -1)
        if digest != version.digest:
            raise Refused("content does not match the hash in its name")
        return
    full = session.slot.reserve(session.staging, size, allowed)
    if full is not None:
        _refuse(session, stream, size, full)
    try:
        _store(session, stream, name, size, version.digest)
    finally:
        session.slot.release()


def _refuse(session: Session, stream: BinaryIO, size: int, why: str) -> NoReturn:
    """Read the body without storing it (the stream stays framed), then refuse it."""
    _body(session, stream, size, -1, hashing=False)
    raise Refused(why)


def _store(session: Session, stream: BinaryIO, name: str, size: int, digest: str) -> None:
    fd, tmp = -1, None
    try:
        try:
            fd, tmp = _create(session.staging, name)
        except OSError:
            _body(session, stream, size, -1, hashing=False)
            raise
        got, failed = _body(session, stream, size, fd)
        if failed is not None:
            raise failed
        if got != digest:
            raise Refused("content does not match the hash in its name")
        _link(session.staging, fd, tmp, name)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=session.staging)


def _create(dirfd: int, name: str) -> tuple[int, str | None]:
    """A new file in staging for a body: unnamed, or where the filesystem cannot make one
    (O_TMPFILE needs Linux 3.11 and ext4, xfs, btrfs, tmpfs ...), a temporary dot file
    created exclusively, never through a symlink; its descriptor, and its name if it has one."""
    if _TMPFILE:
        try:
            return os.open(
                ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dirfd
            ), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    tmp = f".{name[:200]}.recv-{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(tmp, flags, 0o600, dir_fd=dirfd), tmp


def _link(dirfd: int, fd: int, tmp: str | None, name: str) -> None:
    """Give the whole, checked body its name in staging; a name already there is never replaced
    (linkat(2) fails with EEXIST), and is fine if it is a file: its hash is this one's."""
    try:
        if tmp is None:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dirfd)
        else:
            os.link(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
    except FileExistsError:
        _present(dirfd, name)


def _body(
    session: Session, stream: BinaryIO, size: int, fd: int, hashing: bool = True
) -> tuple[str, OSError | None]:
    """Read a body of ``size`` bytes, writing it to ``fd`` (unless -1); its sha256, and the
    error of a write that failed (the rest of the body is then only read, to stay framed).
    Each piece must come within the session's idle time."""
    digest = hashlib.sha256()
    failed: OSError | None = None
    left = size
    while left:
        session.wait_at_most(active=True)
        chunk = stream.read(min(CHUNK, left))
        if not chunk:
            raise Broken(f"body cut short: {size - left} of {size} bytes")
        left -= len(chunk)
        if failed is not None:
            continue
        if hashing:
            digest.update(chunk)
        if fd >= 0:
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                failed = exc
    return digest.hexdigest(), failed


def _present(dirfd: int, name: str) -> bool:
    """Whether ``name`` is already in staging; anything but a regular file there is Refused,
    never replaced."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{name[:80]} is taken by something that is not a file")
    return True


def _get(dirfd: int, name: str) -> bytes:
    data = _read(dirfd, name)
    if name == NODE:
        _writer_alive(data)
    return data


def _read(dirfd: int, name: str) -> bytes:
    if name not in READABLE:
        raise Refused(f"only {' and '.join(READABLE)} can be read")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        raise Refused(f"no such file: {name}") from None
    except OSError as exc:  # ELOOP: a symlink
        raise Refused(f"cannot read {name}: {exc.strerror}") from None
    # Checked before fdopen, which refuses a directory without closing the descriptor.
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"{name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_STATUS + 1)
    if len(data) > MAX_STATUS:
        raise Refused(f"{name} is over {MAX_STATUS} bytes")
    return data


def _writer_alive(data: bytes) -> float:
    """How long this node view stays current; NotCurrent when the agent that wrote it has ended
    or is silent: the view would say what that agent last saw, not what the node is now."""
    try:
        view = json.loads(data)
        verdict = heartbeat.judge(view, pstat.since_boot())
        if verdict.state == "current":
            return verdict.current_for
        held = heartbeat.kernel_holds(view)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise Refused(f"{NODE} is not a node view") from None
    raise NotCurrent(verdict, held)


def _changed(dirfd: int, name: str) -> tuple[int, int, int, int] | None:
    """What tells a rewritten file from the one read before (the agent renames a new one in)."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _wait(dirfd: int, stream: BinaryIO, name: str, held: str, seconds: int) -> bytes | None:
    """The file once its sha256 is not ``held`` (Refused as GET is), or None (SAME) after
    ``seconds``, or as soon as the sender writes or hangs up: the wait is over for it."""
    if name != NODE:
        raise Refused(f"only {NODE} can be waited for")
    deadline = time.monotonic() + seconds
    poller = select.poll()  # the sender writing or hanging up ends the wait
    poller.register(stream.fileno(), select.POLLIN)
    seen: tuple[int, int, int, int] | None = None
    alive_at = 0.0
    while True:
        now = time.monotonic()
        stamp = _changed(dirfd, name)
        if stamp is None or stamp != seen or now >= alive_at:
            data = _read(dirfd, name)
            # Whether its writer still runs and speaks; looked at again the moment it would go
            # stale, not up to a step later.
            seen, alive_at = stamp, now + min(ALIVE_STEP, _writer_alive(data))
            if hashlib.sha256(data).hexdigest() != held:
                return data
        if now >= deadline:
            return None
        if poller.poll(min(WAIT_STEP, deadline - now) * 1000):
            return None


def serve(session: Session, stream: BinaryIO, out: BinaryIO, limit: int = MAX_BYTES) -> str:
    """Answer requests until the stream ends (returns "") or cannot be framed, or the sender
    stops sending or reading for the idle time (returns why). Each step that waits for the
    sender (a request, a piece of a body, the room to answer) must end within the idle time."""
    try:
        session.wait_at_most(active=True)
        out.write(GREETING + b" %d\n" % limit)
        out.flush()
        while True:
            session.wait_at_most(active=True)
            try:
                line = _header(stream)
                if line is None:
                    return ""
                reply = _answer(session, stream, line, limit)
            except Broken as exc:
                session.wait_at_most(active=True)
                out.write(f"ERR {exc}\n".encode("ascii", "backslashreplace"))
                out.flush()
                return str(exc)
            session.wait_at_most(active=True)
            out.write(reply)
            out.flush()
    except Idle as exc:  # while sending: the sender no longer reads
        return str(exc)
    finally:
        session.wait_at_most(active=False)


def _answer(session: Session, stream: BinaryIO, line: str, limit: int) -> bytes:
    """The answer to one request (Broken: none, the connection ends)."""
    dirfd = session.staging
    words = line.split(" ")
    try:
        if len(words) == 3 and words[0] == "PUT":
            _put(session, stream, words[1], _size(words[2], limit))
            return b"OK\n"
        if len(words) in (2, 3) and words[0] == "GET":
            data = _get(dirfd, words[1])
            if words[2:] == [hashlib.sha256(data).hexdigest()]:
                return b"SAME\n"  # the sender holds it already: a keepalive's worth
            return b"DATA %d\n" % len(data) + data
        if len(words) == 4 and words[0] == "WAIT":
            seconds = _size(words[3], MAX_WAIT, "seconds")
            session.wait_at_most(active=False)  # the sender waits for the answer: not idle
            changed = _wait(dirfd, stream, words[1], words[2], seconds)
            return b"SAME\n" if changed is None else b"DATA %d\n" % len(changed) + changed
        raise Broken(f"not a request: {line[:40]!r}")
    except NotCurrent as exc:
        return exc.answer.encode("ascii", "backslashreplace")
    except Refused as exc:
        return f"ERR {exc}\n".encode("ascii", "backslashreplace")
    except OSError as exc:  # a full disk, a vanished directory: this one fails
        return f"ERR {exc.strerror or exc}\n".encode("ascii", "backslashreplace")


USAGE = "usage: lbwatch receive [--peer NAME] STAGING (the sync key's forced command)"


def _arguments(argv: list[str]) -> tuple[str | None, str] | None:
    """The peer whose key this session serves (None: a key line without ``--peer``, written
    before there was one) and the staging directory; None when they are not that."""
    if len(argv) == 1 and not argv[0].startswith("-"):
        return None, argv[0]
    named = len(argv) == 3 and argv[0] == "--peer" and limits.peer_named(argv[1])
    if named and not argv[2].startswith("-"):
        return argv[1], argv[2]
    return None


def main(argv: list[str]) -> int:
    """``lbwatch receive [--peer NAME] STAGING``, run by sshd as the sync key's forced command."""
    parsed = _arguments(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    peer, staging = parsed
    asked = os.environ.get("SSH_ORIGINAL_COMMAND")
    if asked != PROTOCOL:
        # An older lbwatch (rsync), an operator's ssh, or a command someone tries with the key.
        said = f"refused {asked[:60]!r}" if asked else "refused"
        older = " (is lbwatch on the sending node older than this one?)" if asked else ""
        print(f"lbwatch receive: {said}: {ONLY_OURS}{older}", file=sys.stderr)
        return 1
    try:
        dirfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return _unready(staging, exc.errno, True, exc.strerror or str(exc))
    try:
        control = slots.control(dirfd)
        allowed = limits.read(control) or limits.UNSAID
        pool = allowed.pool(peer)
        slot = slots.Slot.take(control, peer, pool)
    except slots.Unusable as exc:
        return _unready(staging, exc.errno, False, str(exc))
    except OSError as exc:
        why = f"cannot take a session slot in {limits.DIR} in it: {exc.strerror or exc}"
        return _unready(staging, exc.errno, False, why)
    if slot is None:
        whose = f"{peer}'s sync key" if peer is not None else "the sync keys without --peer"
        print(
            f"lbwatch receive: busy: {pool} sessions of {whose} are open here, the most this "
            "node takes ([sync] receiver_sessions); another is taken once one of them ends",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGALRM, functools.partial(_idle, allowed.idle))
    try:
        why = serve(Session(dirfd, slot, allowed.idle), sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        return 0  # the sender went away before its answer: nothing of it was half done
    if why:
        print(f"lbwatch receive: {why}", file=sys.stderr)
        return 1
    return 0


def _unready(staging: str, code: int | None, opening: bool, error: str) -> int:
    """Say why this node cannot serve the connection at all, in the line its sender reads
    (``unready``), and end."""
    kind = unready.kind_of(code, opening)
    print(unready.Unready(kind, _user(), staging, error).line(), file=sys.stderr)
    return 1


def _user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # no name in the passwd database
        return str(uid)


def _idle(seconds: int, signum: int, frame: FrameType | None) -> NoReturn:
    """SIGALRM: the sender sent nothing (or stalled in a body, or read no answer) for
    ``seconds``. Raised from the read or write it interrupts (PEP 475 retries a system call
    only when the handler returns)."""
    raise Idle(f"idle: the sender neither sent nor read anything for {seconds} s")
