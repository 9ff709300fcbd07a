"""Does keepalived really write the FIFO lbwatch reads?

keepalived opens its ``notify_fifo`` once, when it starts (and again when it reloads), and keeps
that file open. A FIFO removed or replaced since (by hand, by a cleanup of /run) leaves it
writing into a pipe nobody reads, while lbwatch reads the new one at the same path: no
transition reaches lbwatch, no mail is sent, and nothing else says so. The same holds for a
keepalived started before ``notify_fifo`` was in its config. Only keepalived's open files tell.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from lbwatch import kaconf, procs
from lbwatch.config import Config
from lbwatch.doctor.checks import Finding, Where, error, ok, warn
from lbwatch.notify.fifo import fifo_ident
from lbwatch.status import read_status

AREA = "keepalived"
DELETED = " (deleted)"


@dataclass(frozen=True)
class Held:
    """A FIFO of that path a process has open: the file it is now, or one since removed."""

    pid: int
    ident: tuple[int, int]  # (device, inode) of the open file
    removed: bool


def held(pids: list[int], path: str) -> list[Held]:
    """The FIFOs named ``path`` that ``pids`` have open. Raises PermissionError when their
    open files cannot be read (not root)."""
    out: list[Held] = []
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:  # it ended meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                st = os.stat(f"{fd_dir}/{fd}")  # the open file itself, even when removed
            except FileNotFoundError:  # closed meanwhile
                continue
            name = target[: -len(DELETED)] if target.endswith(DELETED) else target
            if name == path and stat.S_ISFIFO(st.st_mode):
                out.append(Held(pid, (st.st_dev, st.st_ino), target.endswith(DELETED)))
    return out


def check(cfg: Config, where: Where) -> Iterator[Finding]:
    """The FIFO at lbwatch's path, lbwatch reading it, and keepalived writing that same file;
    only when keepalived's config names that FIFO (anything else is the keepalived check's)."""
    path = str(cfg.notify.fifo)
    try:
        if kaconf.read(where.keepalived_conf, where.config_id).notify_fifo != path:
            return
    except kaconf.ConfError:
        return
    there = fifo_ident(cfg.notify.fifo)
    if there is None and os.path.lexists(path):
        yield error(
            AREA,
            f"{path} is not a FIFO: neither keepalived nor lbwatch can use it",
            f"remove {path} (lbwatch creates the FIFO when it starts), then restart keepalived",
        )
        return
    status = read_status(cfg.agent.run_dir)
    notify = status.data.notify if status.agent_running and status.data else None
    if notify is not None and notify.fifo_error:
        yield error(AREA, f"lbwatch cannot read its FIFO: {notify.fifo_error}", "fix the path")
    view = procs.identify(cfg.keepalived)
    if view.main is None:
        yield ok(AREA, "keepalived is not running: it opens the FIFO when it starts")
        return
    pids = [view.main.pid, *sorted(view.children)]
    try:
        found = held(pids, path)
    except PermissionError:
        yield warn(
            AREA,
            f"cannot see keepalived's open files (pid {view.main.pid}): whether it writes "
            f"{path} is not checked",
            "run doctor as root",
        )
        return
    yield from _judge(path, there, view.main.pid, found)


def _judge(
    path: str, there: tuple[int, int] | None, pid: int, found: list[Held]
) -> Iterator[Finding]:
    restart = (
        f"reload keepalived (`systemctl reload keepalived`) so it opens {path} again; "
        "check that lbwatch is running first, it creates the FIFO"
    )
    if there is not None and any(h.ident == there for h in found):
        yield ok(AREA, f"keepalived (pid {pid}) writes the FIFO lbwatch reads")
    elif found:
        yield error(
            AREA,
            f"keepalived (pid {pid}) writes a FIFO at {path} that has been removed or "
            "replaced since it opened it: its transitions reach nobody (no mail on failover)",
            restart,
        )
    else:
        yield error(
            AREA,
            f"keepalived (pid {pid}) does not have {path} open: it started before its "
            "notify_fifo was set, or could not open it; its transitions reach nobody",
            restart,
        )
