"""Find haproxy's master and keepalived's parent, and notice at once when they exit.

A PID is not an identity: a process counts as the service's main process only if the PID (from
the pidfile, or from a scan) names a live, non-zombie process with the configured name, and it is
remembered as (PID, create_time) so that a reused PID is a different process.

Death detection is event-driven where the kernel offers it: a pidfd per main process
(``os.pidfd_open``, Linux >= 5.3, Python >= 3.9) becomes readable when the process exits, zombie
or not, child of ours or not. Elsewhere the periodic rescan (``agent.scan_interval``) notices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from lbwatch.config import ServiceCfg
from lbwatch.events import Event, HaproxyReloaded, ProcessDown, ProcessUp, ProcId, Service

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class View:
    """What one scan saw of a service: its main process and that process's same-named children
    (haproxy's workers, keepalived's VRRP and checker processes)."""

    main: ProcId | None = None
    children: frozenset[int] = frozenset()


def read_pidfile(path: Path) -> int | None:
    """The PID in ``path``, or None when it is missing, unreadable or not a positive integer."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    first = text.strip().split("\n", 1)[0].strip()
    if not first.isdigit():
        return None
    pid = int(first)
    return pid if pid > 0 else None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _named(proc: psutil.Process, name: str) -> bool:
    try:
        if proc.name() == name:
            return True
        exe = proc.exe()
    except psutil.Error:
        return False
    # A replaced binary shows as "/usr/sbin/haproxy (deleted)" after a package upgrade.
    return os.path.basename(exe.removesuffix(" (deleted)")) == name


def to_procid(proc: psutil.Process, name: str) -> ProcId | None:
    """Freeze ``proc`` into an identity, or None if it is gone. The one place that converts the
    kernel's wall-clock start time into monotonic time."""
    try:
        created = proc.create_time()
    except psutil.Error:
        return None
    started = time.monotonic() - max(0.0, time.time() - created)
    return ProcId(pid=proc.pid, create_time_wall=created, name=name, started=started)


def _child_pids(proc: psutil.Process) -> list[int]:
    """Direct children. /proc/PID/task/TID/children (Linux >= 3.5) is read per thread, which
    costs a few reads instead of psutil's walk over every process on the host."""
    try:
        tasks = os.listdir(f"/proc/{proc.pid}/task")
        pids: list[int] = []
        for tid in tasks:
            with open(f"/proc/{proc.pid}/task/{tid}/children", encoding="ascii") as f:
                pids.extend(int(x) for x in f.read().split())
    except OSError:
        try:
            return [k.pid for k in proc.children()]
        except psutil.Error:
            return []
    return pids


def _children(proc: psutil.Process, name: str) -> frozenset[int]:
    kids = []
    for pid in _child_pids(proc):
        try:
            kids.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return frozenset(k.pid for k in kids if _alive(k) and _named(k, name))


def _from_pidfile(cfg: ServiceCfg) -> psutil.Process | None:
    pid = read_pidfile(cfg.pidfile)
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return None
    return proc if _alive(proc) and _named(proc, cfg.process_name) else None


def _from_scan(cfg: ServiceCfg, exclude: frozenset[int]) -> psutil.Process | None:
    """The oldest live process of that name whose parent is not of that name.

    ``exclude`` holds the children of the main process seen last: when haproxy's master is killed
    its workers are re-parented to PID 1 for a moment and must not pass for a new master.
    """
    best: psutil.Process | None = None
    for proc in psutil.process_iter(["name", "create_time"]):
        if proc.pid in exclude or proc.info["name"] != cfg.process_name or not _alive(proc):
            continue
        try:
            parent = proc.parent()
            if parent is not None and _named(parent, cfg.process_name):
                continue
            # A direct child of lbwatch is one of its start commands still daemonizing, not
            # the daemon itself: daemons detach before they write their pidfile.
            if parent is not None and parent.pid == os.getpid():
                continue
        except psutil.Error:
            continue
        if best is None or proc.info["create_time"] < best.info["create_time"]:
            best = proc
    return best


def identify(cfg: ServiceCfg, exclude: frozenset[int] = frozenset()) -> View:
    """One scan of one service."""
    proc = _from_pidfile(cfg)
    if proc is None and cfg.find_without_pidfile:
        proc = _from_scan(cfg, exclude)
    if proc is None:
        return View()
    ident = to_procid(proc, cfg.process_name)
    if ident is None:
        return View()
    return View(ident, _children(proc, cfg.process_name))


def diff(service: Service, old: View, new: View, last_seen: ProcId | None, how: str) -> list[Event]:
    """The events that explain going from ``old`` to ``new``."""
    events: list[Event] = []
    if old.main is not None and not old.main.same_process(new.main):
        events.append(ProcessDown(service, old.main, how))
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
    try:
        proc = psutil.Process(ident.pid)
        if _alive(proc) and abs(proc.create_time() - ident.create_time_wall) < 0.01:
            return fd
    except psutil.Error:
        pass
    os.close(fd)
    return None


class ProcessWatcher:
    """Tracks one service across scans and holds a pidfd on its main process."""

    def __init__(self, service: Service, cfg: ServiceCfg) -> None:
        self.service = service
        self.cfg = cfg
        self.view = View()
        self.last_seen: ProcId | None = None
        self.pidfd: int | None = None
        # The process the pidfd refers to. Users compare this, not the fd number: a closed
        # pidfd's number is usually handed straight to the next one.
        self.pidfd_owner: ProcId | None = None

    def rescan(self, how: str) -> list[Event]:
        new = identify(self.cfg, exclude=self.view.children)
        events = diff(self.service, self.view, new, self.last_seen, how)
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

    def pidfd_fired(self) -> list[Event]:
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

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None
            self.pidfd_owner = None

    def close(self) -> None:
        self._close_pidfd()
