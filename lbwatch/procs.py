"""Find haproxy's master and keepalived's parent, and notice at once when they exit.

A PID is not an identity: a process counts as the service's main process only if the PID (from
the pidfile, or from a scan) names a live, non-zombie process with the configured name whose
parent is not of that name, and it is remembered as (PID, start time in clock ticks since boot)
so that a reused PID is a different process and no wall-clock step changes anything (``pstat``).

Children outlive their parent for a moment: when haproxy's master or keepalived's parent is
killed, its workers (haproxy) or VRRP and checker children (keepalived 2.2: a second or more)
are re-parented to PID 1 and still carry the name. Every child seen under a main process is
remembered until it is gone and is never taken for the main process, through the pidfile or a
scan, unless it has become a session leader: a daemon's launcher that was briefly taken for the
main process forks the real one, which detaches with setsid() (haproxy -D, keepalived), while
orphaned workers and children stay in their dead parent's session.

Death detection is event-driven where the kernel offers it: a pidfd per main process
(``os.pidfd_open``, Linux >= 5.3, Python >= 3.9) becomes readable when the process exits, zombie
or not, child of ours or not. Elsewhere the periodic rescan (``agent.scan_interval``) notices.

A scan that cannot look (no descriptor or memory left to open /proc or the pidfile,
``pstat.SHORT_OF``) learns nothing: the main process stays as last seen, never "gone" for want
of a file, unless what needs no new descriptor says it died (its pidfd fired, or its PID
names no process at all). See ``ProcessWatcher._unseen``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from lbwatch import pstat
from lbwatch.config import ServiceCfg
from lbwatch.events import (
    Change,
    HaproxyReloaded,
    LeftoversGone,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
)
from lbwatch.pstat import Stat

log = logging.getLogger(__name__)

# (PID, start ticks) of processes that were children of a main process.
Known = frozenset[tuple[int, int]]


@dataclass(frozen=True)
class View:
    """What one scan saw of a service: its main process and that process's same-named children
    (haproxy's workers, keepalived's VRRP and checker processes), by PID and by identity."""

    main: ProcId | None = None
    children: frozenset[int] = frozenset()
    child_ids: Known = frozenset()


def read_pidfile(path: Path) -> int | None:
    """The PID in ``path``, or None when it is missing, unreadable or not a positive integer.
    Raises the OSError when there was no descriptor or memory to read it (``pstat.SHORT_OF``):
    then the file says nothing."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        if exc.errno in pstat.SHORT_OF:
            raise
        return None
    first = text.strip().split("\n", 1)[0].strip()
    if not first.isdigit():
        return None
    pid = int(first)
    return pid if pid > 0 else None


def _named(pid: int, comm: str, name: str) -> bool:
    if comm == name:
        return True
    try:
        # The kernel keeps 15 characters of the name; psutil completes it from the command line.
        proc = psutil.Process(pid)
        if proc.name() == name:
            return True
        exe = proc.exe()
    except psutil.Error:
        return False
    # A replaced binary shows as "/usr/sbin/haproxy (deleted)" after a package upgrade.
    return os.path.basename(exe.removesuffix(" (deleted)")) == name


def to_procid(st: Stat, name: str) -> ProcId:
    """Freeze a stat reading into an identity. The one place that turns the kernel's start time
    into the monotonic and wall clocks, both from the process's age on the boot clock."""
    age = pstat.age(st.start_ticks, pstat.since_boot())
    return ProcId(
        pid=st.pid,
        start_ticks=st.start_ticks,
        name=name,
        started=time.monotonic() - age,
        started_wall=time.time() - age,
    )


def _child_pids(pid: int) -> list[int]:
    """Direct children. /proc/PID/task/TID/children (Linux >= 3.5) is read per thread, which
    costs a few reads instead of psutil's walk over every process on the host."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        pids: list[int] = []
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                pids.extend(int(x) for x in f.read().split())
    except OSError as exc:
        if exc.errno in pstat.SHORT_OF:
            raise
        try:
            return [k.pid for k in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    return pids


def _children(pid: int, name: str) -> list[Stat]:
    kids = (pstat.lookup(k) for k in _child_pids(pid))
    return [k for k in kids if k is not None and k.alive and _named(k.pid, k.comm, name)]


def _is_main(st: Stat | None, name: str, known: Known) -> bool:
    """``st`` can be the service's main process: alive, of that name, not a child of a process
    of that name (a haproxy worker, a keepalived child) and not a child that outlived its
    parent (see the module's comment)."""
    if st is None or not st.alive:
        return False
    if (st.pid, st.start_ticks) in known and st.session != st.pid:
        return False
    if not _named(st.pid, st.comm, name):
        return False
    parent = pstat.lookup(st.ppid) if st.ppid > 0 else None
    return parent is None or not _named(parent.pid, parent.comm, name)


def _from_pidfile(cfg: ServiceCfg, known: Known) -> Stat | None:
    pid = read_pidfile(cfg.pidfile)
    st = pstat.lookup(pid) if pid is not None else None
    return st if _is_main(st, cfg.process_name, known) else None


def _ours(st: Stat) -> bool:
    """``st`` belongs to a command lbwatch is running: lbwatch starts each in a session of its
    own (``services.run_command``), so the command is the session's leader and lbwatch its
    parent. A daemon's launcher (``haproxy -W -D`` parsing its config, perhaps behind a shell
    or an init script) is in that session until the daemon it forks detaches with setsid()."""
    if st.ppid == os.getpid():
        return True
    leader = pstat.lookup(st.session) if st.session != st.pid else None
    return leader is not None and leader.ppid == os.getpid()


def _from_scan(cfg: ServiceCfg, known: Known) -> Stat | None:
    """The oldest process that can be the main process, other than one of lbwatch's own start
    commands still daemonizing (daemons detach before they write their pidfile)."""
    best: Stat | None = None
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != cfg.process_name:
            continue
        st = pstat.lookup(proc.pid)
        if st is None or _ours(st) or not _is_main(st, cfg.process_name, known):
            continue
        if best is None or st.start_ticks < best.start_ticks:
            best = st
    return best


def identify(cfg: ServiceCfg, known: Known = frozenset()) -> View:
    """One scan of one service; ``known``: children seen before, never the main process."""
    st = _from_pidfile(cfg, known)
    if st is None and cfg.find_without_pidfile:
        st = _from_scan(cfg, known)
    if st is None:
        return View()
    kids = _children(st.pid, cfg.process_name)
    return View(
        to_procid(st, cfg.process_name),
        frozenset(k.pid for k in kids),
        frozenset((k.pid, k.start_ticks) for k in kids),
    )


def still_running(known: Known) -> Known:
    """The entries of ``known`` that still name the same live process."""
    out = set()
    for pid, ticks in known:
        st = pstat.lookup(pid)
        if st is not None and st.alive and st.start_ticks == ticks:
            out.add((pid, ticks))
    return frozenset(out)


def diff(
    service: Service,
    old: View,
    new: View,
    last_seen: ProcId | None,
    how: str,
    leftovers: int = 0,
) -> list[Change]:
    """The changes that explain going from ``old`` to ``new``; ``leftovers``: how many of the
    old main process's children still run."""
    events: list[Change] = []
    if old.main is not None and not old.main.same_process(new.main):
        events.append(ProcessDown(service, old.main, how, leftovers))
    if new.main is not None and not new.main.same_process(old.main):
        events.append(ProcessUp(service, new.main, previous=old.main or last_seen))
    elif (
        service is Service.HAPROXY
        and new.main is not None
        and old.children
        and new.children - old.children
    ):
        # Same master, new workers: haproxy's master-worker reload (SIGUSR2), not a restart.
        events.append(HaproxyReloaded(new.main, old.children, new.children))
    return events


def _exists(pid: int) -> bool:
    """A process with this PID exists, any process: kill(2) with signal 0 needs no descriptor."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_pidfd(ident: ProcId) -> int | None:
    """A pidfd for ``ident``, or None where the kernel or Python lacks pidfds, or the process is
    already gone. The identity is checked again after opening, so the fd cannot be aimed at a
    process that reused the PID in between."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(ident.pid)
    except OSError:
        return None
    st = pstat.read_stat(ident.pid)
    if st is not None and st.alive and st.start_ticks == ident.start_ticks:
        return fd
    os.close(fd)
    return None


class ProcessWatcher:
    """Tracks one service across scans and holds a pidfd on its main process."""

    def __init__(self, service: Service, cfg: ServiceCfg) -> None:
        self.service = service
        self.cfg = cfg
        self.view = View()
        self.last_seen: ProcId | None = None
        # Every child seen under a main process, until it is gone (see the module's comment).
        self.known_children: Known = frozenset()
        # The children the last main process left running when it died, with a pidfd each.
        self.leftovers: Known = frozenset()
        self.leftovers_of: ProcId | None = None
        self.leftover_fds: dict[int, int] = {}
        self.blind = False  # the last scan could not read /proc (said once per episode)
        self.pidfd: int | None = None
        # The process the pidfd refers to. Users compare this, not the fd number: a closed
        # pidfd's number is usually handed straight to the next one.
        self.pidfd_owner: ProcId | None = None

    def rescan(self, how: str) -> list[Change]:
        try:
            known = still_running(self.known_children | self.view.child_ids)
            new = identify(self.cfg, known)
        except OSError as exc:
            if exc.errno not in pstat.SHORT_OF:
                raise
            return self._unseen(how, exc)
        if self.blind:
            self.blind = False
            log.info("%s can be looked for again", self.service.value)
        self.known_children = known | new.child_ids
        old = self.view.main
        died = old is not None and not old.same_process(new.main)
        left = self.view.child_ids & known if died else frozenset()
        events = diff(self.service, self.view, new, self.last_seen, how, len(left))
        events += self._follow_leftovers(old if died else None, left, known)
        if not (new.main is not None and new.main.same_process(self.view.main)):
            self._close_pidfd()
            if new.main is not None:
                self.pidfd = open_pidfd(new.main)
                self.pidfd_owner = new.main if self.pidfd is not None else None
                if self.pidfd is None:
                    # Died between the scan and the open: the next rescan reports it.
                    log.debug("no pidfd for %s; relying on rescans", new.main)
        if new.main is not None:
            self.last_seen = new.main
        self.view = new
        return events

    def _unseen(self, how: str, exc: OSError) -> list[Change]:
        """The scan could not look: no descriptor or memory for /proc or the pidfile. Nothing
        is learnt from that, so the main process stays as last seen, unless what needs no new
        descriptor says it is gone: its pidfd fired (``how`` "pidfd": the kernel says it
        exited), or, without a pidfd, its PID names no process at all. Taking "could not
        look" for "gone" would report a live daemon dead (and stop keepalived); ignoring the
        pidfd would leave a dead one up in the status, its pidfd waking the loop for ever."""
        if not self.blind:
            self.blind = True
            log.warning(
                "cannot look for %s (%s); keeping what was last seen", self.service.value, exc
            )
        old = self.view.main
        if old is None or not (how == "pidfd" or (self.pidfd is None and not _exists(old.pid))):
            return []
        self._close_pidfd()
        # Its children as last seen: never to be taken for the main process, and counted as
        # still running (the policy waits a bounded time for them).
        left = self.view.child_ids
        self.known_children |= left
        self.view = View()
        return [ProcessDown(self.service, old, how, len(left))]

    def leftover_fired(self, pid: int) -> list[Change]:
        """The pidfd on ``pid``, a child a dead main process left, became readable: it exited.
        Its pidfd is closed even when the rescan could not look, or it would wake the loop for
        ever."""
        events = self.rescan("scan")
        fd = self.leftover_fds.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        return events

    def pidfd_fired(self) -> list[Change]:
        """The pidfd became readable: the main process exited."""
        before = self.view.main
        events = self.rescan("pidfd")
        if (
            before is not None
            and self.view.main is not None
            and before.same_process(self.view.main)
        ):
            # Readable yet the process looks alive (should not happen); drop the fd rather than
            # spin on it, and let rescans decide.
            self._close_pidfd()
        return events

    def _follow_leftovers(self, dead: ProcId | None, left: Known, known: Known) -> list[Change]:
        """Keep a pidfd on each child a dead main process left running, so that the loop wakes
        when they exit, and say when the last one has."""
        if dead is not None and left:
            self._close_leftover_fds()
            self.leftovers_of = dead
            for pid, ticks in left:
                fd = open_pidfd(ProcId(pid, ticks, self.cfg.process_name, 0.0))
                if fd is not None:
                    self.leftover_fds[pid] = fd
            self.leftovers = left
            return []
        if not self.leftovers:
            return []
        self.leftovers &= known
        for pid in [p for p in self.leftover_fds if p not in {p for p, _ in self.leftovers}]:
            with contextlib.suppress(OSError):
                os.close(self.leftover_fds.pop(pid))
        if self.leftovers or self.leftovers_of is None:
            return []
        dead, self.leftovers_of = self.leftovers_of, None
        return [LeftoversGone(self.service, dead)]

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None
            self.pidfd_owner = None

    def _close_leftover_fds(self) -> None:
        for fd in self.leftover_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.leftover_fds.clear()

    def close(self) -> None:
        self._close_pidfd()
        self._close_leftover_fds()
