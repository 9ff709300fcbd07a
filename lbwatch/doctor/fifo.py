"""Does keepalived really write the FIFO lbwatch reads? (``lbwatch.notify.writer`` says why it
matters; the agent looks too, and says it in its status.)"""

from __future__ import annotations

import os
from collections.abc import Iterator

from lbwatch import kaconf, procs
from lbwatch.config import Config
from lbwatch.doctor.checks import Finding, Where, error, ok, warn
from lbwatch.notify import writer
from lbwatch.notify.fifo import fifo_ident
from lbwatch.status import read_status

AREA = "keepalived"


def check(cfg: Config, where: Where) -> Iterator[Finding]:
    """The FIFO at lbwatch's path, lbwatch reading it, and keepalived writing that same file;
    only when keepalived's config names that FIFO (anything else is the keepalived check's)."""
    path = str(cfg.notify.fifo)
    try:
        named = kaconf.read(where.keepalived_conf, where.config_id).notify_fifo
    except kaconf.ConfError:
        return
    if not writer.names_fifo(named, path):
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
    pid = view.main.pid
    try:
        verdict = writer.judge(there, writer.held([pid, *sorted(view.children)], path))
    except PermissionError:
        yield warn(
            AREA,
            f"cannot see keepalived's open files (pid {pid}): whether it writes {path} is not "
            "checked",
            "run doctor as root",
        )
        return
    found = writer.problem(verdict, pid, path)
    if found is None:
        yield ok(AREA, f"keepalived (pid {pid}) writes the FIFO lbwatch reads")
    else:
        yield error(AREA, found, f"{writer.FIX}; check first that lbwatch runs (it makes the FIFO)")
