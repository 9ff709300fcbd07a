"""Check a haproxy config and put it live atomically, keeping backups.

Blocking helpers for a worker thread. ``validate`` runs the configured checker (``haproxy -c -f
FILE``): only exit 0 is valid, since haproxy 2.x exits 2 for a config that parses but has, for
example, no listener, and that must not go live either. ``install`` never writes over the live
file: it writes a temporary file beside it with the live file's owner and mode, fsyncs it, keeps
the previous content as a numbered backup and renames the new file into place.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lbwatch.events import Outcome
from lbwatch.fsutil import fsync_dir
from lbwatch.services import run_command

BACKUP_SUFFIX = ".lbwatch-"
_BACKUP = re.compile(r"\.lbwatch-(\d{8}T\d{6}\.\d{6})$")


@dataclass(frozen=True)
class Validation:
    ok: bool
    message: str  # the checker's last line, or why it could not run


def validate(argv_template: list[str], path: Path, timeout: float) -> Validation:
    """Run the checker with ``{file}`` replaced by ``path``."""
    argv = [arg.replace("{file}", str(path)) for arg in argv_template]
    result = run_command(argv, timeout)
    if result.outcome is Outcome.OK:
        return Validation(True, "valid")
    return Validation(False, _why(result.detail, result.output))


def _why(detail: str, output: str) -> str:
    """haproxy ends with "Fatal errors found in configuration."; the lines that say what is
    wrong are its [ALERT]s before that (file, line, problem)."""
    alerts = [
        re.sub(r"^\[ALERT\]\s*(\(\d+\)\s*)?:\s*(config\s*:\s*)?", "", line.strip())
        for line in output.splitlines()
        if line.startswith("[ALERT]")
        and not any(s in line for s in ("Fatal errors found", "Error(s) found in configuration"))
    ]
    if not alerts:
        return detail
    return detail.split(":", 1)[0] + ": " + " | ".join(alerts[:3])


@dataclass(frozen=True)
class Installed:
    live: Path
    backup: Path | None  # the previous content, None when there was no live file


def backups(live: Path) -> list[Path]:
    """Backups of ``live``, oldest first."""
    found = [p for p in live.parent.glob(live.name + BACKUP_SUFFIX + "*") if _BACKUP.search(p.name)]
    return sorted(found, key=lambda p: p.name)


def backup_stamp(now_wall: float) -> str:
    """UTC to the microsecond, sortable: the suffix of backup and kept files."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_wall)) + f".{int(now_wall % 1 * 1e6):06d}"


def install(content: bytes, live: Path, keep: int, now_wall: float | None = None) -> Installed:
    """Make ``content`` the live file, atomically; keep ``keep`` generations of backups."""
    now_wall = time.time() if now_wall is None else now_wall
    stamp = backup_stamp(now_wall)
    try:
        st: os.stat_result | None = live.stat()
    except FileNotFoundError:
        st = None
    tmp = live.parent / f".{live.name}.lbwatch-new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, content)
        if st is not None:
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, st.st_mode & 0o7777)
        else:
            os.fchmod(fd, 0o644)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    backup = None
    if st is not None:
        backup = live.parent / f"{live.name}{BACKUP_SUFFIX}{stamp}"
        shutil.copy2(live, backup)
    tmp.rename(live)
    fsync_dir(live.parent)
    for old in backups(live)[:-keep] if keep > 0 else backups(live):
        with contextlib.suppress(OSError):
            old.unlink()
    return Installed(live, backup)


def restore(live: Path, backup: Path) -> None:
    """Put a backup back as the live file (after a reload with the new one failed)."""
    install(backup.read_bytes(), live, keep=len(backups(live)) + 1)
