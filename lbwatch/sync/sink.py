"""The peer's end of a sync connection: ``lbwatch receive STAGING``, the forced command of the
sync key in the peer's authorized_keys (see ``transport.authorized_keys_line``).

It stays running for as long as the sender keeps its ssh session open and reads framed requests
from it, so a push costs a round trip over the kept connection instead of starting rrsync and
an rsync server per push (about 110 ms on a 2-core machine). It does less than rrsync, on
purpose: the key can put a version into staging and read the status file and the node view,
nothing else.

    sender's requested command    lbwatch-sync 1        (anything else: refused, exit 1)
    receiver, once                LBWATCH-SYNC 1 <max bytes>\\n
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

- A name is a staged version's (``versions.parse_staged_name``): no path, no dot file, never
  the status file, which only lbwatch writes (a stolen key cannot forge what a peer holds).
- The content must match the hash in its name, so a damaged or forged body never lands.
- It lands as a temporary dot file (created exclusively, never through a symlink) renamed into
  place; a name already present is never replaced (the same version pushed twice is fine).
- Every file access is relative to the staging directory's descriptor, with O_NOFOLLOW.
- A request that cannot be framed (garbage, a header over 512 bytes, a size over the limit, a
  body cut short) ends the connection; a refused version (bad name, hash, a name taken) is
  answered with ERR and the connection goes on.
Each connection is independent: two at once (a sender restarted while its old session lingers)
each land their files atomically under their own temporary names.

Imported by ``cli.main`` before anything heavy: stdlib, ``pstat``, ``heartbeat`` and
``versions`` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import select
import stat
import sys
import time
from typing import BinaryIO

from lbwatch import heartbeat, pstat
from lbwatch.sync.versions import parse_staged_name

PROTOCOL = "lbwatch-sync 1"  # the command the sender asks for
GREETING = b"LBWATCH-SYNC 1"
STATUS = "status.json"  # the same name as peerstatus.STATUS, which imports pydantic
NODE = "node.json"  # the agent's view of its node, for its peers (cluster.nodeview)
READABLE = (STATUS, NODE)
MAX_WAIT = 60  # seconds a WAIT may last
WAIT_STEP = 0.1  # how often a WAIT looks at the file
ALIVE_STEP = 1.0  # and at the agent that wrote it
MAX_BYTES = 64 * 1024 * 1024  # a pushed version: haproxy.cfg with its maps and certificates
MAX_STATUS = 1024 * 1024
MAX_HEADER = 512  # "PUT " + a staged name (at most 370 bytes by its pattern) + a size
CHUNK = 256 * 1024
# Said to any other command (an older lbwatch's rsync, an operator's ssh): the sender looks for it.
ONLY_OURS = "this key only takes lbwatch's own sync connections"


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


def _put(dirfd: int, stream: BinaryIO, name: str, size: int) -> None:
    """Land ``size`` bytes from ``stream`` as ``name`` in staging. The body is read whatever is
    wrong with the name or the disk, so the stream stays framed; a body cut short is Broken."""
    version = parse_staged_name(name) if not name.startswith(".") else None
    tmp = f".{name[:200]}.recv-{os.getpid()}-{secrets.token_hex(4)}" if version else None
    fd = -1
    failed: OSError | None = None  # the disk refused it: the rest of the body is only read
    if tmp is not None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dirfd)
        except OSError as exc:
            failed, tmp = exc, None
    try:
        digest, wrote = _body(stream, size, fd)
        failed = failed or wrote
        if failed is not None:
            raise failed
        if version is None or tmp is None:
            raise Refused(f"not a staged version's name: {name[:80]!r}")
        if digest != version.digest:
            raise Refused("content does not match the hash in its name")
        os.close(fd)
        fd = -1
        if _present(dirfd, name):
            return  # the same name is the same content (its hash), pushed again
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        tmp = None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dirfd)


def _body(stream: BinaryIO, size: int, fd: int) -> tuple[str, OSError | None]:
    """Read a body of ``size`` bytes, writing it to ``fd`` (unless -1); its sha256, and the
    error of a write that failed (the rest of the body is then only read, to stay framed)."""
    digest = hashlib.sha256()
    failed: OSError | None = None
    left = size
    while left:
        chunk = stream.read(min(CHUNK, left))
        if not chunk:
            raise Broken(f"body cut short: {size - left} of {size} bytes")
        left -= len(chunk)
        if fd >= 0 and failed is None:
            digest.update(chunk)
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


def serve(dirfd: int, stream: BinaryIO, out: BinaryIO, limit: int = MAX_BYTES) -> str:
    """Answer requests until the stream ends (returns "") or cannot be framed (returns why)."""
    out.write(GREETING + b" %d\n" % limit)
    out.flush()
    while True:
        try:
            line = _header(stream)
            if line is None:
                return ""
            words = line.split(" ")
            reply = b"OK\n"
            try:
                if len(words) == 3 and words[0] == "PUT":
                    _put(dirfd, stream, words[1], _size(words[2], limit))
                elif len(words) in (2, 3) and words[0] == "GET":
                    data = _get(dirfd, words[1])
                    if words[2:] == [hashlib.sha256(data).hexdigest()]:
                        reply = b"SAME\n"  # the sender holds it already: a keepalive's worth
                    else:
                        reply = b"DATA %d\n" % len(data) + data
                elif len(words) == 4 and words[0] == "WAIT":
                    seconds = _size(words[3], MAX_WAIT, "seconds")
                    changed = _wait(dirfd, stream, words[1], words[2], seconds)
                    reply = b"SAME\n" if changed is None else b"DATA %d\n" % len(changed) + changed
                else:
                    raise Broken(f"not a request: {line[:40]!r}")
            except NotCurrent as exc:
                reply = exc.answer.encode("ascii", "backslashreplace")
            except Refused as exc:
                reply = f"ERR {exc}\n".encode("ascii", "backslashreplace")
            except OSError as exc:  # a full disk, a vanished directory: this one fails
                reply = f"ERR {exc.strerror or exc}\n".encode("ascii", "backslashreplace")
            out.write(reply)
            out.flush()
        except Broken as exc:
            out.write(f"ERR {exc}\n".encode("ascii", "backslashreplace"))
            out.flush()
            return str(exc)


def main(argv: list[str]) -> int:
    """``lbwatch receive STAGING``, run by sshd as the sync key's forced command."""
    if len(argv) != 1:
        print("usage: lbwatch receive STAGING (the sync key's forced command)", file=sys.stderr)
        return 2
    asked = os.environ.get("SSH_ORIGINAL_COMMAND")
    if asked != PROTOCOL:
        # An older lbwatch (rsync), an operator's ssh, or a command someone tries with the key.
        said = f"refused {asked[:60]!r}" if asked else "refused"
        older = " (is lbwatch on the sending node older than this one?)" if asked else ""
        print(f"lbwatch receive: {said}: {ONLY_OURS}{older}", file=sys.stderr)
        return 1
    try:
        dirfd = os.open(argv[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        print(f"lbwatch receive: cannot open {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        why = serve(dirfd, sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        return 0  # the sender went away before its answer: nothing of it was half done
    if why:
        print(f"lbwatch receive: {why}", file=sys.stderr)
        return 1
    return 0
