"""systemd integration without libsystemd: sd_notify over the AF_UNIX datagram socket in
``$NOTIFY_SOCKET`` (READY, WATCHDOG, STATUS, RELOADING, STOPPING), the watchdog period from
``$WATCHDOG_USEC``, and a log format journald understands.

See sd_notify(3) and sd_watchdog_enabled(3); the protocol is newline-separated KEY=VALUE pairs in
one datagram, the socket path may be abstract (a leading '@').

Also the start-up check that refuses, under systemd, start commands that would put haproxy or
keepalived into lbwatch's own cgroup (``cgroup_hazards``), and what to do about a path the
unit's sandbox does not let lbwatch write (``readwrite_fix``, said by ``lbwatch doctor`` and by
the agent when such a write fails).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from lbwatch.config import Config


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd with Type=notify."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if there is no socket or it failed."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a receiver that does not drain its queue: a
                # message that does not fit is dropped (the next watchdog ping follows).
                self._sock.setblocking(False)
            self._sock.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready="1", status=status)

    def watchdog(self) -> bool:
        return self.notify(watchdog="1")

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload; older ones
        # ignore it.
        return self.notify(
            reloading="1", monotonic_usec=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        )

    def stopping(self) -> bool:
        return self.notify(stopping="1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def booted() -> bool:
    """systemd is this host's init: sd_booted(3) checks that /run/systemd/system/ exists."""
    return os.path.isdir("/run/systemd/system")


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """Half the watchdog timeout, or None when the watchdog is off or meant for another PID."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2


# ---------------------------------------------------------------------------------------------
# Start commands and lbwatch's own cgroup

# These hand the start to the service manager: the daemon then runs in a unit of its own, with its
# own sandbox, and `systemctl stop lbwatch` does not touch it.
_VIA_MANAGER = frozenset({"systemctl", "systemd-run"})
# A reload may also just signal the running daemon: haproxy's master re-executes itself and
# keepalived re-reads its config, in the cgroup they already live in; nothing new is forked here.
_SIGNAL_ONLY = frozenset({"kill", "pkill"})


def started_by_systemd(environ: Mapping[str, str], pid: int, ppid: int) -> bool:
    """This process is one systemd started itself for a unit (its ExecStart=), so that whatever it
    forks stays in that unit's cgroup and is killed when the unit stops.

    systemd >= 248 says so exactly: ``$SYSTEMD_EXEC_PID`` is the PID it started (systemd.exec(5)).
    ``$INVOCATION_ID`` alone would not do: every descendant of any unit inherits it (a test run
    under a CI runner's service, a shell in a unit), and lbwatch run from there is no unit's
    process. Older systemd (Debian 11 has 247) sets only INVOCATION_ID; there the process systemd
    started for a system service is the one whose parent is PID 1, the manager.
    """
    exec_pid = environ.get("SYSTEMD_EXEC_PID", "")
    if exec_pid:
        return exec_pid == str(pid)
    return bool(environ.get("INVOCATION_ID")) and ppid == 1


def load_vetted(path: Path) -> tuple[Config | None, list[str]]:
    """The config at ``path`` as a reload takes it: valid, and with no start command that would
    fork a daemon into this unit (refused as at start-up); else None and the problems."""
    from lbwatch.config import ConfigError, load

    try:
        new = load(path)
    except ConfigError as exc:
        return None, exc.problems
    problems = own_cgroup_hazards(new, str(path))
    return (None, problems) if problems else (new, [])


def own_cgroup_hazards(cfg: Config, source: str) -> list[str]:
    """``cgroup_hazards`` for this process, at start-up and on reload alike."""
    return cgroup_hazards(cfg, started_by_systemd(os.environ, os.getpid(), os.getppid()), source)


def cgroup_hazards(cfg: Config, under_systemd: bool, source: str) -> list[str]:
    """One line per configured start, restart or reload command that would run haproxy or
    keepalived as a child of lbwatch, when lbwatch runs as a systemd unit's process.

    Such a daemon lands in lbwatch's cgroup: the unit's KillMode=mixed SIGKILLs it on `systemctl
    stop lbwatch`, and it inherits lbwatch's sandbox (no CAP_NET_ADMIN for keepalived, no
    CAP_NET_BIND_SERVICE for haproxy, lbwatch's syscall filter). Outside systemd (the lab, the
    tests) a direct command is fine: no unit stop takes the daemons down with lbwatch.
    """
    if not under_systemd:
        return []
    lines = []
    for name, svc in (("haproxy", cfg.haproxy), ("keepalived", cfg.keepalived)):
        for verb in ("start", "restart", "reload"):
            argv: list[str] | None = getattr(svc, verb)
            if argv is None:  # the default: systemctl VERB UNIT
                continue
            allowed = (_VIA_MANAGER | _SIGNAL_ONLY) if verb == "reload" else _VIA_MANAGER
            if os.path.basename(argv[0]) in allowed:
                continue
            instead = (
                "signal it with kill or pkill"
                if verb == "reload"
                else f"use `systemd-run --unit=NAME` with {name} in the foreground"
            )
            lines.append(
                f"{source}: {name}.{verb}: under systemd, {argv[0]!r} would run {name} in "
                f"lbwatch's own cgroup, killed by `systemctl stop lbwatch`; leave {name}.{verb} "
                f"out (`systemctl {verb} {svc.unit}`) or {instead}"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# Paths outside the unit's sandbox


def readwrite_fix(directory: str | os.PathLike[str]) -> str:
    """How to let lbwatch's unit write ``directory``: a drop-in, so the packaged unit stays as
    shipped. With '-', so that a node without that directory still starts lbwatch: a missing
    ReadWritePaths= path without it fails the unit's start (status 226/NAMESPACE)."""
    return (
        "`systemctl edit lbwatch`, add the lines `[Service]` and "
        f"`ReadWritePaths=-{directory}`, then `systemctl restart lbwatch`"
    )


def sandbox_hint(directory: str | os.PathLike[str], exc: OSError) -> str:
    """What to add to a failed write's message when the unit's sandbox is the likely cause: a
    unit's process told EROFS (ProtectSystem= and ReadOnlyPaths= remount read-only) or EACCES
    (InaccessiblePaths=, ProtectHome=yes); "" otherwise."""
    if exc.errno not in (errno.EROFS, errno.EACCES):
        return ""
    if not started_by_systemd(os.environ, os.getpid(), os.getppid()):
        return ""
    return (
        f"; if lbwatch's unit does not let it write {directory} (`lbwatch doctor` lists every "
        f"such path): {readwrite_fix(directory)}"
    )


# ---------------------------------------------------------------------------------------------
# Logging


def under_journald() -> bool:
    """stderr is connected to the journal: ``$JOURNAL_STREAM`` names its device and inode."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    dev, _, ino = stream.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<N>message`` lines: journald reads N as the syslog priority (sd-daemon(3)); each line
    of a multi-line message gets the prefix so a traceback stays at error level."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def setup_logging(level: str, journal: bool | None = None) -> None:
    """Install the one handler lbwatch uses: journald-style under systemd, timestamped otherwise."""
    if journal is None:
        journal = under_journald()
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_log_level(level)


def set_log_level(level: str) -> None:
    """lbwatch's level (``agent.log_level``), at start and at each reload."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # requests (webhook channels) logs every connection of urllib3's pool at debug level;
    # lbwatch logs each delivery's outcome itself.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))
