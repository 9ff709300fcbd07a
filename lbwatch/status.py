"""What the agent publishes and what survives it: ``status.json`` under ``agent.run_dir``
(written atomically, read by ``lbwatch status``) and the maintenance-pause flag under
``agent.state_dir`` (set by ``lbwatch pause``, kept across agent restarts).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lbwatch import pstat
from lbwatch.agentlock import LOCK_FILE
from lbwatch.fsutil import write_atomic
from lbwatch.statusdoc import PauseInfo, StatusDoc

STATUS_FILE = "status.json"
PAUSE_FILE = "paused"


class AlreadyRunning(Exception):
    pass


def lock_run_dir(run_dir: Path) -> int:
    """One agent per node: a second one would fight the first over the services. Returns the
    descriptor that holds the lock for the agent's lifetime."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise AlreadyRunning(
            f"another lbwatch (PID {other or '?'}) holds {run_dir / LOCK_FILE}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def write_status(run_dir: Path, status: StatusDoc) -> None:
    write_atomic(run_dir / STATUS_FILE, status.to_json())


@dataclass(frozen=True)
class StatusRead:
    """The agent's last published status and whether the agent that wrote it still runs."""

    data: StatusDoc | None
    agent_running: bool
    problem: str  # why there is no usable status; "" when there is


def read_status(run_dir: Path) -> StatusRead:
    path = run_dir / STATUS_FILE
    try:
        data = StatusDoc.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return StatusRead(None, False, f"lbwatch is not running: no status at {path}")
    except OSError as exc:
        return StatusRead(None, False, f"cannot read {path}: {exc}")
    except ValueError as exc:  # pydantic's ValidationError too
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StatusRead(None, False, f"cannot read {path}: {first}")
    running = _same_process(data.agent.pid, data.agent.start_ticks)
    problem = ""
    if not running:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data.updated))
        problem = (
            f"lbwatch is not running (agent PID {data.agent.pid} is gone; "
            f"its last status is from {when})"
        )
    return StatusRead(data, running, problem)


def _same_process(pid: object, start_ticks: object) -> bool:
    """The agent that wrote the status still runs: same PID, same boot-relative start time."""
    if not isinstance(pid, int) or not isinstance(start_ticks, int):
        return False
    st = pstat.read_stat(pid)
    return st is not None and st.alive and st.start_ticks == start_ticks


# ---------------------------------------------------------------------------------------------
# Maintenance pause


SYNC_NOW_FLAG = "sync-now"  # dropped in state_dir by `lbwatch sync --now`


def pause_path(state_dir: Path) -> Path:
    return state_dir / PAUSE_FILE


def is_paused(state_dir: Path) -> bool:
    return pause_path(state_dir).exists()


def set_paused(state_dir: Path, paused: bool, reason: str = "") -> None:
    path = pause_path(state_dir)
    if paused:
        note = {"since": time.time(), "reason": reason, "by": os.environ.get("SUDO_USER", "")}
        write_atomic(path, json.dumps(note).encode(), mode=0o600)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def pause_info(state_dir: Path) -> PauseInfo:
    """What the pause flag says; a flag that cannot be read (edited by hand, cut short) still
    pauses, and says nothing more."""
    try:
        return PauseInfo.model_validate_json(pause_path(state_dir).read_bytes())
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return PauseInfo()
