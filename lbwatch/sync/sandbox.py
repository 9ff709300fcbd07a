"""The check of a version received from a peer, confined: ``haproxy -c`` as an unprivileged user,
with no network, nothing writable but a small private /tmp, lbwatch's own files out of sight,
and limits on memory, CPU time and file size.

Who reaches this: the holder of a peer's sync key, through the content of a version. ``admit``
refuses the directives that run code before anything is checked; this is the second wall, for
whatever haproxy might do while it parses a config that ``admit`` let through (today's
directives and tomorrow's). The check runs as::

    prlimit --as --cpu --fsize --core=0      limits (util-linux; inherited by what follows)
    setpriv --reuid --regid --init-groups    the check user (``[sync.received] check_user``,
            --no-new-privs --inh-caps=-all   haproxy's own user by default), no privileges
    bwrap --unshare-user/net/ipc/pid         bubblewrap: new namespaces (an empty network, no
                                             other process in sight),
          --ro-bind / /                      the whole file system read-only,
          --tmpfs /tmp                       its own /tmp (16 MiB), the only place it may write
          --tmpfs STAGING, STATE, /run, ...  out of sight (empty, read-only): lbwatch's directories,
                                             and those where haproxy's sockets live
          --ro-bind COPY LIVE                the version's files where they will be live
          --ro-bind HOSTS /etc/hosts         the config's host names, resolved beforehand
          --die-with-parent
          --seccomp FD                       no user namespace of its own: a seccomp filter
                                             (``nouserns``) on a pipe the chain inherits
          haproxy -c -f LIVE

Why these tools: bubblewrap builds the view (read-only root, hidden directories, files bound
where they will live) in one audited step as an unprivileged user, through a user namespace,
without systemd (the lab and containers have none) and without giving lbwatch CAP_SYS_ADMIN;
setpriv and prlimit are in util-linux on every distribution. systemd-run would need PID 1, and
a transient unit per check costs more than the chain above (about 15 ms over the bare check).

The check user is haproxy's own by default, so what the live haproxy's user may reach must be
out of its reach: the live workers (another PID namespace: no signal reaches them) and their
sockets (a UNIX socket takes connections whatever the mount says, so the directories of
haproxy's stats sockets, /run and /var/lib/haproxy by default, are hidden).

The check user reads the version's own files through private copies it owns, so a synced
certificate kept 0600 checks as it will run; any other file the config loads must be readable
by that user (the real haproxy reads it as root), or the check fails and says so.

Without a network, host names (server, bind, log, peer addresses ...) would not resolve and a
valid config would fail: they are resolved here first, as this node resolves them (getaddrinfo,
so /etc/hosts and DNS as nsswitch.conf says), and the check sees them in its /etc/hosts.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import os
import platform
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lbwatch.events import Outcome
from lbwatch.services import CommandResult, run_command
from lbwatch.sync import nouserns
from lbwatch.sync.admit import unix_path
from lbwatch.sync.cfgscan import scan

log = logging.getLogger(__name__)

TOOLS = ("choom", "prlimit", "setpriv", "bwrap")
TMP_SIZE = 16 * 1024 * 1024  # the check's own /tmp (haproxy -c writes nothing there)
FILE_SIZE = 64 * 1024 * 1024  # any file it writes, its output included
MAX_NAMES = 64  # host names resolved for one check
RESOLVE_FOR = 2.0  # seconds the names may take, all at once (at most a third of the timeout)
SPARE_TASKS = 32  # processes the check may start beyond those its user already runs
OOM_FIRST = 1000  # the check is the first the kernel's OOM killer takes (lbwatch is at -500)
# Where a version's file with no live path yet is seen: in the sandbox's own /tmp.
INSIDE = "/tmp/lbwatch-check"  # noqa: S108
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}

# Hidden from every check beside lbwatch's own directories: where the live haproxy's stats
# sockets are (a socket file would take the check's connections); /var/run is a link to /run.
ALWAYS_HIDDEN = ("/run", "/var/lib/haproxy")

# Words whose next word is an address haproxy resolves while it parses.
_ADDRESS_AFTER = {"addr", "source", "socks4", "usesrc"}
_AT = {"server": 2, "peer": 2, "mailer": 2, "nameserver": 2, "bind": 1, "dgram-bind": 1, "log": 1}
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")  # linear: no nesting


@dataclass(frozen=True)
class Settings:
    user: str
    memory: int  # bytes of address space
    cpu: int  # seconds of CPU time
    hidden: tuple[Path, ...]  # directories the check must not see (those that exist)


def names(content: bytes) -> set[str]:
    """The host names a config makes haproxy resolve while it parses (its addresses)."""
    found: set[str] = set()
    for line in scan(content):
        t = line.texts
        if t[0:2] == ("stats", "socket"):
            t = t[1:]
        at = _AT.get(t[0], 0)
        words = [t[at]] if at and len(t) > at else []
        words += [t[i + 1] for i, w in enumerate(t[:-1]) if w in _ADDRESS_AFTER]
        for word in words:
            for address in word.split(","):
                host = host_of(address)
                if host is not None:
                    found.add(host)
    return found


def host_of(address: str) -> str | None:
    """The host name of an address (``name:80``, ``ipv4@name:80``), or None: an IP address, a
    socket path, a wildcard."""
    if unix_path(address) is not None:
        return None
    if "@" in address:
        prefix, _, address = address.partition("@")
        if prefix in ("abns", "fd", "sockpair"):
            return None
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    if not host or host == "*" or host.startswith("[") or address.count(":") > 1:
        return None
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    if len(host) > 253 or not any(c.isalpha() for c in host):
        return None
    labels = host.removesuffix(".").split(".")
    return host if all(_LABEL.match(label) for label in labels) else None


def resolve(hosts: Iterable[str], within: float = RESOLVE_FOR) -> list[tuple[str, str]]:
    """(address, name) for each name this node resolves within ``within`` seconds, all looked
    up at once (a name it cannot resolve in time is left out: the check then fails on it, as
    haproxy would here with a resolver that slow). A lookup still running is left to finish on
    its own daemon thread; getaddrinfo cannot be interrupted."""
    found: dict[str, list[str]] = {}

    def look(name: str) -> None:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return
        found[name] = list(dict.fromkeys(str(info[4][0]) for info in infos))

    names = sorted(hosts)[:MAX_NAMES]
    threads = [threading.Thread(target=look, args=(n,), daemon=True) for n in names]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + within
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    done = dict(found)  # the lookups that finished in time
    return [(address, name) for name in names for address in done.get(name, [])]


def hosts_file(base: str, resolved: Iterable[tuple[str, str]]) -> str:
    """This node's /etc/hosts with the resolved names after it."""
    lines = [base.rstrip("\n"), "# resolved by lbwatch for the check of a received version"]
    lines += [f"{address}\t{name}" for address, name in resolved]
    return "\n".join(lines) + "\n"


def argv(
    check: list[str],
    settings: Settings,
    binds: Mapping[str, str],
    hosts: str | None,
    tasks: int = SPARE_TASKS,
    bwrap: tuple[int, ...] = (0, 8),
    *,
    seccomp: int | None,
) -> list[str]:
    """The confined command: ``check`` (``{file}`` already replaced) under the limits, the user
    and the view; ``binds``: file seen in the sandbox -> the private copy shown there;
    ``tasks``: the processes its user may have in all (RLIMIT_NPROC counts the user's, the
    live haproxy's threads included); ``bwrap``: bubblewrap's version, for what it knows (a
    size for a tmpfs from 0.7: RHEL 9 and Debian 11 ship 0.4, Ubuntu 22.04 0.6, whose /tmp is
    then bounded by memory alone); ``seccomp``: the descriptor bubblewrap reads the filter of
    ``nouserns`` from (None: no filter, a machine it does not know)."""
    out = [
        "choom",
        "-n",
        str(OOM_FIRST),
        "--",
        "prlimit",
        f"--as={settings.memory}",
        f"--cpu={settings.cpu}",
        f"--fsize={FILE_SIZE}",
        f"--nproc={tasks}",
        "--core=0",
        "--",
        "setpriv",
        f"--reuid={settings.user}",
        f"--regid={settings.user}",
        "--init-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--",
        "bwrap",
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--die-with-parent",
        *(["--seccomp", str(seccomp)] if seccomp is not None else []),
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",  # then read-only: no /dev/shm to fill, memory --as does not count
        "--proc",
        "/proc",
        *(["--size", str(TMP_SIZE)] if bwrap >= (0, 7) else []),
        "--tmpfs",
        "/tmp",  # noqa: S108 (a new tmpfs of the sandbox's own)
    ]
    for hidden in settings.hidden:
        out += ["--tmpfs", str(hidden)]
    for seen, copy in binds.items():
        out += ["--ro-bind", copy, seen]
    if hosts is not None:
        out += ["--ro-bind", hosts, "/etc/hosts"]
    for ro in [*map(str, settings.hidden), "/dev"]:
        out += ["--remount-ro", ro]
    out += ["--chdir", "/", "--", *check]
    return out


@functools.lru_cache(maxsize=1)
def bwrap_version() -> tuple[int, ...]:
    """bubblewrap's version, as ``bwrap --version`` says it ("bubblewrap 0.8.0"); (0,) when it
    does not say (then only what every version knows is asked of it)."""
    try:
        out = subprocess.run(
            ["bwrap", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return (0,)
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in match.groups() if x is not None) if match else (0,)


def missing() -> str | None:
    """Why no check can be confined on this node, or None."""
    absent = [tool for tool in TOOLS if shutil.which(tool, path=ENV["PATH"]) is None]
    if absent:
        return f"{', '.join(absent)} not installed (bubblewrap, util-linux)"
    return None


def settings_for(
    user: str, memory_mib: int, timeout: float, hidden: Iterable[Path], needed: Iterable[Path]
) -> Settings:
    """The sandbox for one check: ``hidden`` directories that exist, except any that holds a
    file the check needs (a test's config under its state directory)."""
    need = [Path(os.path.realpath(p)) for p in needed]
    candidates = [*hidden, *map(Path, ALWAYS_HIDDEN)]
    out: list[Path] = []
    for real in sorted({Path(os.path.realpath(d)) for d in candidates}):
        inside_one = any(h == real or h in real.parents for h in out)  # hidden with it
        if (
            real.is_dir()
            and not inside_one
            and not any(real == n or real in n.parents for n in need)
        ):
            out.append(real)
    return Settings(user, memory_mib * 1024 * 1024, math.ceil(timeout) + 1, tuple(out))


def check(
    template: list[str],
    config: Path,
    files: Mapping[Path, bytes],
    settings: Settings,
    timeout: float,
) -> CommandResult:
    """Run the checker on ``config`` confined, each of ``files`` (live path -> the version's
    content) shown at its live path (or under ``INSIDE``, when there is no file there yet or the
    check user cannot walk to it: then whatever the config loads from beside it fails as it
    would for the user)."""
    absent = missing()
    if absent is not None:
        return _failed(f"the confined check cannot run: {absent}; see lbwatch doctor")
    try:
        owner = pwd.getpwnam(settings.user)
    except KeyError:
        return _failed(f"check_user {settings.user!r} does not exist on this node")
    ids = (owner.pw_uid, frozenset(os.getgrouplist(owner.pw_name, owner.pw_gid)))
    fresh = (Path("/tmp"), *settings.hidden)  # noqa: S108 (the sandbox's own tmpfs)
    with tempfile.TemporaryDirectory(prefix="lbwatch-check-") as private:
        os.chown(private, owner.pw_uid, owner.pw_gid)
        binds: dict[str, str] = {}
        target = str(config)
        for i, (live, content) in enumerate(sorted(files.items())):
            copy = os.path.join(private, f"{i}-{live.name}")
            _write(copy, content, owner)
            at_live = any(f in live.parents for f in fresh) or (
                os.path.exists(live) and reachable(live, *ids)
            )
            seen = str(live) if at_live else f"{INSIDE}/{i}-{live.name}"
            binds[seen] = copy
            if live == config:
                target = seen
        started = time.monotonic()
        hosts = None
        wanted = names(files.get(config, b""))
        if wanted:
            hosts = os.path.join(private, "hosts")
            resolved = resolve(wanted, min(RESOLVE_FOR, timeout / 3))
            _write(hosts, hosts_file(_read_hosts(), resolved).encode(), owner)
        command = [a.replace("{file}", target) for a in template]
        tasks = tasks_of(owner.pw_uid) + SPARE_TASKS
        left = max(0.1, timeout - (time.monotonic() - started))
        return confined(command, settings, binds, hosts, tasks, left)


def confined(
    command: list[str],
    settings: Settings,
    binds: Mapping[str, str],
    hosts: str | None,
    tasks: int,
    timeout: float,
) -> CommandResult:
    """Run ``command`` confined (``argv``'s chain), the filter of ``nouserns`` on a pipe the
    chain inherits: choom, prlimit and setpriv exec with their descriptors, bubblewrap reads it
    to its end and closes it; lbwatch's copy is closed once the chain has started."""
    program = nouserns.program(platform.machine())
    if program is None:
        chain = argv(command, settings, binds, hosts, tasks, bwrap_version(), seccomp=None)
        return run_command(chain, timeout, env=ENV)
    fd = _readable(program)
    chain = argv(command, settings, binds, hosts, tasks, bwrap_version(), seccomp=fd)
    return run_command(chain, timeout, env=ENV, give=(fd,))


def _readable(data: bytes) -> int:
    """The read end of a pipe holding ``data``, its write end closed: bubblewrap reads to EOF.
    ``data`` (a filter, a few hundred bytes) fits in a pipe and is written whole at once."""
    r, w = os.pipe()
    try:
        os.write(w, data)
    except OSError:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def tasks_of(uid: int) -> int:
    """The tasks (threads) running as ``uid`` now: what RLIMIT_NPROC counts against the check,
    which runs as the live haproxy's user."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read(4096)
        except OSError:
            continue  # gone meanwhile
        fields = dict(
            line.split(b":", 1)
            for line in status.splitlines()
            if line.startswith((b"Uid", b"Threads"))
        )
        uids = fields.get(b"Uid", b"").split()
        if uids and int(uids[0]) == uid:
            count += int(fields.get(b"Threads", b"1").strip() or 1)
    return count


def reachable(path: Path, uid: int, gids: frozenset[int]) -> bool:
    """Whether ``uid`` (with ``gids``) may walk the directories down to ``path``: bubblewrap,
    run as that user, can bind a file over it only then (mode bits; ACLs are not read)."""
    for directory in reversed(path.parents):
        try:
            st = os.stat(directory)
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _write(path: str, content: bytes, owner: pwd.struct_passwd) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        os.fchown(fd, owner.pw_uid, owner.pw_gid)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(content)
    finally:
        os.close(fd)


def _read_hosts() -> str:
    try:
        return Path("/etc/hosts").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "127.0.0.1\tlocalhost\n"


def _failed(why: str) -> CommandResult:
    return CommandResult(Outcome.FAILED, why, 0.0)
