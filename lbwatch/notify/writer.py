"""Does keepalived really write the FIFO lbwatch reads?

keepalived opens its ``notify_fifo`` when it starts and when it reloads, and keeps that file
open. A FIFO removed or replaced since (by hand, by a cleanup of /run) leaves it writing into a
pipe nobody reads while lbwatch reads the new one at the same path; a keepalived started before
``notify_fifo`` was added to its config never writes it at all. Either way no transition reaches
lbwatch, no failover is mailed, and nothing else says so: only keepalived's open files tell.
The agent looks (``WriterWatch``), and so does ``lbwatch doctor``.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Literal, Optional

from lbwatch.events import ProcId

log = logging.getLogger(__name__)

DELETED = " (deleted)"
# keepalived's VRRP process opens the FIFO a moment after it starts (keepalived's own start, or
# its parent's restart of a VRRP process that died), and a reload closes and opens it again: a
# bad answer is said only once it has held this many seconds.
GRACE = 5.0
FIX = "reload keepalived (`systemctl reload keepalived`; the VIP stays where it is)"

Verdict = Literal["writes", "old", "none"]


Ident = tuple[int, int]  # (device, inode) of a file


def held(pids: list[int], path: str) -> list[Ident]:
    """The FIFOs named ``path`` (as it is now, or since removed) that ``pids`` have open, by
    identity. Raises PermissionError when their open files cannot be read (not root)."""
    # /proc/PID/fd shows the name the kernel resolved when the file was opened: a FIFO opened
    # as /var/run/x (Debian: /var/run -> /run) reads /run/x there. Either name is this FIFO.
    names = {path, os.path.realpath(path)}
    out: list[Ident] = []
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            raise
        except OSError:  # it ended meanwhile (ENOENT, ESRCH)
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                # A name that itself ends in " (deleted)" is the file there now.
                gone = target.endswith(DELETED) and target not in names
                if (target[: -len(DELETED)] if gone else target) not in names:
                    continue  # not stat()ed: keepalived's other files may be on a hung mount
                st = os.stat(f"{fd_dir}/{fd}")  # the open file itself, even when removed
            except PermissionError:
                raise
            except OSError:  # closed meanwhile, or its process ended
                continue
            if stat.S_ISFIFO(st.st_mode):
                out.append((st.st_dev, st.st_ino))
    return out


def names_fifo(name: Optional[str], path: str) -> bool:
    """keepalived's ``notify_fifo`` ``name`` is the FIFO at ``path``, however either is spelt
    (/var/run/x and /run/x on Debian, where /var/run is a symlink)."""
    if name is None:
        return False
    return name == path or os.path.realpath(name) == os.path.realpath(path)


def judge(there: Optional[Ident], found: list[Ident]) -> Verdict:
    """``there``: the FIFO at the path now, None if there is none."""
    if there is not None and there in found:
        return "writes"
    return "old" if found else "none"


def problem(verdict: Verdict, pid: int, path: str) -> Optional[str]:
    """What is wrong, in one line without the fix; None when keepalived writes the FIFO."""
    if verdict == "old":
        return (
            f"keepalived (pid {pid}) writes a FIFO at {path} that has been removed or replaced "
            "since it opened it: its transitions reach nobody (no mail on failover)"
        )
    if verdict == "none":
        return (
            f"keepalived (pid {pid}) does not have {path} open: it started before its "
            "notify_fifo was set, or could not open it; its transitions reach nobody"
        )
    return None


class WriterWatch:
    """The agent's running look. keepalived's open files are read again only when something
    that can change the answer changed (keepalived's identity or processes, the FIFO at the
    path), or each scan while the answer is bad: nothing is read while all is well."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._key: object = None
        self._verdict: Verdict | None = None
        self._bad_since: float | None = None
        self.problem: str | None = None  # said once in the log and as an alert
        # The keepalived (pid, start ticks) whose problem was said, until it writes the FIFO:
        # a scan with the check off (keepalived.conf unreadable mid-edit) hides the problem
        # but does not make the same keepalived's same fault news again.
        self._said: tuple[int, int] | None = None
        self._no_access_said = False

    def check(
        self,
        path: str,
        there: Optional[tuple[int, int]],
        keepalived: ProcId | None,
        pids: list[int],
    ) -> str | None:
        """``pids``: keepalived's main process and its children. Returns the problem when it
        is new (to be alerted)."""
        if keepalived is None:
            self._key, self._verdict, self._bad_since, self.problem = None, None, None, None
            return None
        who = (keepalived.pid, keepalived.start_ticks)
        key = (*who, tuple(sorted(pids)), there)
        if key == self._key and self._verdict == "writes":
            return None
        try:
            verdict = judge(there, held(pids, path))
        except PermissionError:
            if not self._no_access_said:
                self._no_access_said = True
                log.warning(
                    "cannot read keepalived's open files (/proc/%d/fd): whether it writes the "
                    "FIFO %s is not checked (lbwatch runs as root in its shipped unit)",
                    keepalived.pid,
                    path,
                )
            return None
        self._key, self._verdict = key, verdict
        if verdict == "writes":
            self._bad_since, self._said = None, None
        else:
            now = self.clock()
            self._bad_since = now if self._bad_since is None else self._bad_since
            if now - self._bad_since < GRACE:
                return None  # a VRRP process starting, or keepalived reloading
        found = problem(verdict, keepalived.pid, path)
        new = found if found is not None and self.problem is None and self._said != who else None
        if new is not None:
            log.error("%s; %s", new, FIX)
            self._said = who
        elif found is None and self.problem is not None:
            log.info("keepalived (pid %d) writes the FIFO %s lbwatch reads again", keepalived.pid,
                     path)  # fmt: skip
        self.problem = found
        return new
