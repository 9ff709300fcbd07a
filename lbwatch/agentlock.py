"""The agent's lock, ``<agent.run_dir>/lbwatch.lock``: the running agent holds an exclusive flock
on it (``status.lock_run_dir``), and ``lbwatch notify`` probes it to learn whether an agent will
read the FIFO. Standard library only: the probe runs in keepalived's notify script."""

from __future__ import annotations

import fcntl
import os

LOCK_FILE = "lbwatch.lock"


def agent_running(run_dir: str | os.PathLike[str]) -> bool:
    """Whether an agent holds the lock under ``run_dir`` now: a shared lock cannot be had."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
