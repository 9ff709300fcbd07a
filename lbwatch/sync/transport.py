"""Moving files to and from peers with rsync over ssh, argv only, with timeouts, over one
persistent ssh connection per peer (ControlMaster/ControlPersist), so a transfer after the
first costs no new handshake. ``channel`` sends over the same kept connection to lbwatch's
receiver, and uses this for peers whose key still runs rrsync, and for the ssh options.

On the peer the sync key is forced into lbwatch's receiver (``authorized_keys_line``), or, as
authorized before lbwatch had one, into rrsync confined to its staging directory: either way
the key can put files into staging and read the status file back, and nothing else.

When a transfer fails, ``explain`` finds ssh's (or rrsync's, or the receiver's) own reason in
the output: rsync itself only says "unexplained error (code 255)", or "error in rsync protocol
data stream (code 12)" when it noticed the closed pipe before ssh exited.

Blocking; for worker threads.
"""

from __future__ import annotations

import enum
import re
import shlex
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from lbwatch.events import Outcome
from lbwatch.services import CommandResult, run_command
from lbwatch.sync import unready


@dataclass(frozen=True)
class Peer:
    name: str
    host: str
    port: int = 22
    user: str = "root"


def authorized_keys_line(
    staging: Path, public_key: str, program: str = "lbwatch", peer: str | None = None
) -> str:
    """The peer's authorized_keys entry for the sync key of the node named ``peer``.

    ``restrict`` turns off forwarding, pty and user rc; the forced command is lbwatch's
    receiver (``sink``), which takes nothing but staged versions into ``staging`` and gives
    nothing but the status file back. ``program``: the lbwatch command, by its absolute path
    where sshd's PATH does not find it. ``--peer`` tells the receiver whose key it serves, so
    that each key has its own sessions at most (``slots``); without it (None, an entry from
    before there was one) every such key shares one pool.
    """
    named = f" --peer {shlex.quote(peer)}" if peer is not None else ""
    command = f"{shlex.quote(program)} receive{named} {shlex.quote(str(staging))}"
    # sshd's option parser unescapes \" and nothing else (auth-options.c, opt_dequote).
    escaped = command.replace('"', '\\"')
    return f'restrict,command="{escaped}" {public_key.strip()}'


def known_hosts_name(host: str, port: int) -> str:
    """How ssh names a host in known_hosts: bare on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def rrsync_authorized_keys_line(staging: Path, public_key: str) -> str:
    """The entry peers had before lbwatch had a receiver, still served (by rsync): rrsync
    (from rsync >= 3.2.4) refuses anything but an rsync server confined to ``staging``;
    ``-munge`` keeps symlinks from leading out of it, ``-no-del`` forbids deletions."""
    return f'restrict,command="rrsync -munge -no-del {staging}" {public_key.strip()}'


class Failure(str, enum.Enum):
    """Why a transfer failed, as ssh, rrsync or rsync said it; the value is the phrase shown."""

    REFUSED = "connection refused"
    TIMED_OUT = "connection timed out"
    NO_ROUTE = "no route to host"
    NET_UNREACHABLE = "network unreachable"
    UNRESOLVED = "cannot resolve the host name"
    GREETING = "no ssh greeting in time"  # TCP connected, sshd said nothing
    CLOSED = "connection closed by the peer"
    RESET = "connection reset by the peer"
    HOST_KEY_CHANGED = "host key mismatch"
    HOST_KEY_UNKNOWN = "host key unknown"
    HOST_KEY_FAILED = "host key verification failed"
    DENIED = "permission denied"
    MASTER_LOST = "the kept connection broke"  # the ControlMaster went away under the request
    STALLED = "the connection stalled"  # no data for rsync's --timeout, or ServerAlive gave up
    RRSYNC = "refused by rrsync"
    RECEIVER = "refused by lbwatch's receiver"
    UNREADY = "lbwatch's receiver cannot serve"  # no staging it can use there (``unready``)
    NO_COMMAND = "the forced command is not found"  # not installed there, or not on its PATH
    MISSING = "no such file on the peer"
    OTHER = "other"  # none of the above: rsync's own line stays the message


# Ordered: the first that matches anywhere in the output wins. The host key warning also says
# "Host key verification failed", and every ssh failure ends in rsync's own "connection
# unexpectedly closed", so the specific reasons come first.
_SIGNS: tuple[tuple[Failure, re.Pattern[str]], ...] = tuple(
    (failure, re.compile(pattern, re.IGNORECASE | re.MULTILINE))
    for failure, pattern in (
        (
            Failure.HOST_KEY_CHANGED,
            r"REMOTE HOST IDENTIFICATION HAS CHANGED|^Host key for .* has changed",
        ),
        (Failure.HOST_KEY_UNKNOWN, r"^No \S+ host key is known for"),
        (Failure.HOST_KEY_FAILED, r"^Host key verification failed"),
        (Failure.DENIED, r"Permission denied \((?P<said>[^)]*)\)"),
        (Failure.UNRESOLVED, r"Could not resolve hostname"),
        (Failure.GREETING, r"timed out during banner exchange"),
        # ssh: connect to host 192.0.2.12 port 22: Connection refused (Linux, BSD wording)
        (Failure.REFUSED, r"connect to host .* port \d+: Connection refused"),
        (Failure.TIMED_OUT, r"connect to host .* port \d+: (Connection|Operation) timed out"),
        (Failure.NO_ROUTE, r"connect to host .* port \d+: No route to host"),
        (Failure.NET_UNREACHABLE, r"connect to host .* port \d+: Network is unreachable"),
        (Failure.MASTER_LOST, r"mux_client_\w+: (?P<said>.*)"),
        (Failure.STALLED, r"^Timeout, server .* not responding|io timeout after \d+ seconds"),
        (Failure.RESET, r"Connection reset by"),
        # "Connection closed by 192.0.2.12 port 22", "Connection to 192.0.2.12 closed by
        # remote host."
        (Failure.CLOSED, r"Connection (to \S+ )?closed by"),
        # The peer's shell (sshd runs a forced command with the user's shell) found no such
        # command, exit 127: dash "sh: 1: lbwatch: not found", bash "bash: line 1: lbwatch:
        # command not found" (or "...: /usr/bin/lbwatch: No such file or directory"), busybox
        # "sh: lbwatch: not found", zsh "zsh:1: command not found: lbwatch". Not ssh's own.
        (
            Failure.NO_COMMAND,
            r"^(?!ssh:)\S*sh: (?:line \d+: |\d+: )?(?P<said>[^:\s]+): "
            r"(?:command not found|not found|No such file or directory)$",
        ),
        (
            Failure.NO_COMMAND,
            r"^zsh:\d+: (?:command not found|no such file or directory): (?P<said>\S+)$",
        ),
        (Failure.UNREADY, rf"^{re.escape(unready.PREFIX)} (?P<said>.*)"),
        # rrsync from rsync 3.4 on pins paths through /proc/self/fd and says a missing file
        # is a "post-realpath open failed (race detected): NAME No such file or directory"
        # (exit 12); plain rsync says 'link_stat "NAME" failed: No such file or directory'.
        (Failure.MISSING, r"race detected\): (?P<said>\S+) No such file or directory"),
        (Failure.MISSING, r'link_stat "(?P<said>[^"]*)" failed: No such file or directory'),
        # rrsync 3.2.4+ (Python): "/usr/bin/rrsync error: ..."; the older Perl one: "rrsync: ...".
        (Failure.RRSYNC, r"^\S*rrsync(?: error)?: (?P<said>.*)"),
        # lbwatch's own receiver (sink): "lbwatch receive: no such file: status.json", or why
        # it refused a version or the connection.
        (Failure.MISSING, r"^lbwatch receive: no such file: (?P<said>\S+)"),
        (Failure.RECEIVER, r"^lbwatch receive: (?P<said>.*)"),
    )
)

# ssh never got an answer from the peer's port, or the connection went quiet: the peer may be
# down, so it is worth watching for its return (``knock``). Not a name that does not resolve:
# knocking would ask DNS every second, and a resolver that is down would hold the link's thread.
UNANSWERED = frozenset(
    {
        Failure.REFUSED,
        Failure.TIMED_OUT,
        Failure.NO_ROUTE,
        Failure.NET_UNREACHABLE,
        Failure.MASTER_LOST,
        Failure.STALLED,
    }
)


def diagnose(output: str) -> tuple[Failure, str]:
    """The reason a failed transfer's output gives, and the words that said it where they add
    something (rrsync's refusal, the authentication methods ssh tried)."""
    for failure, sign in _SIGNS:
        found = sign.search(output)
        if found is not None:
            said = found.groupdict().get("said") or ""
            return failure, said.strip()[:200]
    return Failure.OTHER, ""


def explain(result: CommandResult, peer: Peer, known_hosts: Path | None) -> CommandResult:
    """``result`` with ssh's reason as its detail, one line that says what to check, e.g.
    "ssh: connection refused (192.0.2.12:22)"; unchanged when the output gives none."""
    if result.outcome is not Outcome.FAILED:
        return result
    failure, said = diagnose(result.output)
    where = f"{peer.host}:{peer.port}"
    hosts = str(known_hosts) if known_hosts is not None else "ssh's known_hosts"
    if failure is Failure.OTHER:
        return result
    if failure is Failure.RRSYNC:
        detail = f"rrsync on {peer.host} refused: {said}"
    elif failure is Failure.RECEIVER:
        detail = f"lbwatch's receiver on {peer.host} refused: {said}"
    elif failure is Failure.UNREADY:
        found = unready.parse(result.output)
        detail = found.fact(peer.host) if found else f"lbwatch's receiver on {peer.host}: {said}"
    elif failure is Failure.NO_COMMAND:
        detail = (
            f"{said} is not found on {peer.host} (the sync key's forced command): not "
            "installed there, or not on sshd's PATH"
        )
    elif failure is Failure.HOST_KEY_CHANGED:
        detail = f"ssh: host key mismatch ({where}): the key it offers is not the one in {hosts}"
    elif failure in (Failure.HOST_KEY_UNKNOWN, Failure.HOST_KEY_FAILED):
        detail = f"ssh: {failure.value} ({where}): is its host key in {hosts}?"
    elif failure is Failure.DENIED:
        detail = (
            f"ssh: permission denied ({said or 'publickey'}) for {peer.user}@{where}: "
            "is this node's sync key in the peer's authorized_keys?"
        )
    elif failure is Failure.MISSING:
        detail = f"rsync: no {said or 'such file'} on {peer.host}"
    elif failure is Failure.MASTER_LOST:
        detail = f"ssh: the kept connection broke ({where}): {said}"
    else:
        detail = f"ssh: {failure.value} ({where})"
    return replace(result, detail=detail)


def unanswered(result: CommandResult) -> bool:
    """The peer's ssh port did not answer, or the connection went quiet: the peer may be down."""
    if result.outcome is Outcome.TIMEOUT:
        return True
    return result.outcome is Outcome.FAILED and diagnose(result.output)[0] in UNANSWERED


def knock(peer: Peer, timeout: float) -> CommandResult:
    """Whether the peer's ssh port accepts a TCP connection, closed at once: no processes, no
    handshake, so a peer that is down costs a SYN. A peer's sshd logs a connection that ends
    before its greeting ("kex_exchange_identification: Connection closed by remote host"), so
    this is for watching a port that did not answer, not one that does."""
    started = time.monotonic()
    try:
        socket.create_connection((peer.host, peer.port), timeout=timeout).close()
    except socket.timeout:  # an alias of TimeoutError from Python 3.10 on
        return CommandResult(
            Outcome.TIMEOUT, f"no answer within {timeout:g} s", time.monotonic() - started
        )
    except OSError as exc:
        why = exc.strerror or str(exc)
        return CommandResult(Outcome.FAILED, why.lower(), time.monotonic() - started)
    return CommandResult(Outcome.OK, "connected", time.monotonic() - started)


class Carrier(Protocol):
    """What peer delivery needs from a transport (the real one below; a fake in the tests)."""

    def push(self, peer: Peer, local: Path, remote_name: str) -> CommandResult: ...

    def fetch(self, peer: Peer, remote_name: str, local: Path) -> CommandResult: ...

    def close(self, peer: Peer) -> CommandResult: ...


class Transport:
    def __init__(
        self,
        key: Path,
        control_dir: Path,
        known_hosts: Path | None = None,
        timeout: float = 10.0,
        persist: float = 300.0,
    ) -> None:
        self.key = key
        self.control_dir = control_dir
        self.known_hosts = known_hosts
        self.timeout = timeout
        self.persist = persist

    def ssh_argv(self, peer: Peer) -> list[str]:
        argv = [
            "ssh",
            "-i",
            str(self.key),
            "-p",
            str(peer.port),
            "-l",
            peer.user,
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"ConnectTimeout={max(1, int(self.timeout))}",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=2",
            "-o",
            "ControlMaster=auto",
            # %C: a hash of host, port and user, short enough for a socket path.
            "-o",
            f"ControlPath={self.control_dir}/%C",
            "-o",
            f"ControlPersist={int(self.persist)}",
        ]
        if self.known_hosts is not None:
            argv += [
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                "-o",
                "StrictHostKeyChecking=yes",
            ]
        return argv

    def control_problem(self) -> str | None:
        """Why ssh could not keep a connection in ``control_dir``, if it could not."""
        # %C expands to 40 hex digits, and ssh adds a temporary suffix while it binds; a unix
        # socket path holds at most 107 bytes, and past that ssh only says exit 255.
        if len(str(self.control_dir)) + 1 + 40 + 17 > 107:
            return (
                f"control_dir {self.control_dir} is too long for ssh's control socket "
                "(keep it under 50 characters)"
            )
        return None

    def _rsync(self, peer: Peer, *args: str) -> CommandResult:
        problem = self.control_problem()
        if problem is not None:
            return CommandResult(Outcome.FAILED, problem, 0.0)
        self.control_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        rsh = " ".join(shlex.quote(a) for a in self.ssh_argv(peer))
        argv = ["rsync", "--timeout", str(max(1, int(self.timeout))), "-e", rsh, *args]
        # The command's own timeout covers connecting too; rsync's --timeout only idle I/O.
        return explain(run_command(argv, self.timeout * 2), peer, self.known_hosts)

    def push(self, peer: Peer, local: Path, remote_name: str) -> CommandResult:
        """Copy ``local`` to ``remote_name`` inside the peer's staging directory. rsync writes
        a temporary file and renames it, so the peer never sees half a file. Give every version
        a new name: rrsync from rsync 3.4 on pins paths through /proc/self/fd and refuses to
        replace an existing file."""
        return self._rsync(
            peer, "--checksum", "--chmod=F600", str(local), f"{peer.host}:{remote_name}"
        )

    def fetch(self, peer: Peer, remote_name: str, local: Path) -> CommandResult:
        """Copy ``remote_name`` from the peer's staging directory to ``local``."""
        return self._rsync(peer, f"{peer.host}:{remote_name}", str(local))

    def close(self, peer: Peer) -> CommandResult:
        """End the persistent connection to ``peer`` (exit 255 when there is none). Its master
        may hold a connection that died without a word (the peer's host went away): requests
        through it wait for ServerAlive to notice, about 10 s."""
        return run_command([*self.ssh_argv(peer), "-O", "exit", peer.host], self.timeout)
