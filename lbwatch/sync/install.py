"""Check a haproxy config and put it live atomically, keeping backups.

Blocking helpers for a worker thread. ``validate`` runs the configured checker (``haproxy -c -f
FILE``): only exit 0 is valid, since haproxy 2.x exits 2 for a config that parses but has, for
example, no listener, and that must not go live either. ``install`` never writes over the live
file: it writes a temporary file beside it with the live file's owner and mode, fsyncs it, and
swaps it into place; the file it replaced becomes the backup. Given the content the decision was
based on (``was``), the swap is undone when the live file turned out to hold something else: an
operator's save that landed meanwhile is never overwritten (``LiveChanged``).

Every copy lbwatch keeps beside the live file (backups, versions that lost to a later edit,
configs a reload refused) has the live file's owner, group and mode, and ``keep`` of each kind
are kept.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lbwatch.events import Outcome
from lbwatch.fsutil import Owner, exchange, fsync_dir, write_atomic, write_temp
from lbwatch.services import CommandResult, run_command

BACKUP_SUFFIX = ".lbwatch-"
_STAMP = r"\d{8}T\d{6}\.\d{6}"
# The digest ``was`` takes for "no file at the live path".
ABSENT = ""


class Kept(str, enum.Enum):
    """The kinds of copies kept beside a live file; each is pruned to ``keep`` on its own."""

    BACKUP = "backup"  # the previous content, before an install: <name>.lbwatch-<stamp>
    LOST = "lost"  # a version that lost to a later edit: <name>.lbwatch-lost-<node>-<stamp>
    FAILED = "failed"  # a config haproxy's reload refused: <name>.lbwatch-failed-<stamp>

    def pattern(self, name: str) -> re.Pattern[str]:
        tag = "" if self is Kept.BACKUP else rf"{self.value}-(?:[A-Za-z0-9._-]+-)?"
        return re.compile(re.escape(name + BACKUP_SUFFIX) + tag + _STAMP + "$")


class LiveChanged(Exception):
    """The live file does not hold what the install was decided on (an operator saved it)."""

    def __init__(self, live: Path) -> None:
        super().__init__(f"{live} changed while a version was being installed")
        self.live = live


@dataclass(frozen=True)
class Validation:
    ok: bool
    message: str  # the checker's last line, or why it could not run


def validate(argv_template: list[str], path: Path, timeout: float) -> Validation:
    """Run the checker with ``{file}`` replaced by ``path``."""
    argv = [arg.replace("{file}", str(path)) for arg in argv_template]
    return verdict(run_command(argv, timeout))


# What the confining tools (sync/sandbox.py) print when they, not the checker, fail.
_TOOLS = re.compile(r"^(bwrap|setpriv|prlimit|choom): ", re.MULTILINE)


def verdict(result: CommandResult, confined: bool = False) -> Validation:
    """The checker's result as a validation; ``confined``: run by sync/sandbox.py, whose own
    failure (no user namespaces, a missing user) is said as such, not as an invalid config."""
    if result.outcome is Outcome.OK:
        return Validation(True, "valid")
    tool = _TOOLS.search(result.output) if confined else None
    if tool is not None:
        line = result.output[tool.start() :].splitlines()[0]
        return Validation(False, f"the confined check could not run ({line}); see lbwatch doctor")
    why = _why(result.detail, result.output)
    if confined and any(w in why for w in ("open", "ermission", "load")):
        why += " (received versions are checked as [sync.received] check_user)"
    return Validation(False, why)


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
    backup: Path | None  # where the previous content was kept, if it was (``keep``)
    content: bytes  # what was installed
    previous: bytes | None  # what it replaced; None: there was no file


def kept(live: Path, kind: Kept = Kept.BACKUP) -> list[Path]:
    """Copies of one kind kept beside ``live``, oldest first."""
    pattern = kind.pattern(live.name)
    found = [p for p in live.parent.glob(live.name + BACKUP_SUFFIX + "*") if pattern.match(p.name)]
    return sorted(found, key=lambda p: p.name[-22:])


def backups(live: Path) -> list[Path]:
    """Backups of ``live``, oldest first."""
    return kept(live, Kept.BACKUP)


def backup_stamp(now_wall: float) -> str:
    """UTC to the microsecond, sortable: the suffix of backup and kept files."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_wall)) + f".{int(now_wall % 1 * 1e6):06d}"


def _prune(live: Path, kind: Kept, keep: int) -> None:
    found = kept(live, kind)
    for old in found[:-keep] if keep > 0 else found:
        with contextlib.suppress(OSError):
            old.unlink()


def _owner(like: Path) -> Owner | None:
    try:
        return Owner.of(like.stat())
    except OSError:
        return None


def keep_copy(
    live: Path,
    content: bytes,
    kind: Kept,
    keep: int,
    node: str = "",
    like: Path | None = None,
    now_wall: float | None = None,
    private: bool = False,
) -> Path | None:
    """Keep ``content`` beside ``live`` as a copy of ``kind`` (``node``: where it came from),
    owned like ``like`` (default: ``live``), or 0600 and root's when that does not exist or
    ``private`` is set (a bundle: it may hold a private key beside a 0644 haproxy.cfg); the
    oldest copies beyond ``keep`` go. None when ``keep`` is 0."""
    if keep <= 0:
        _prune(live, kind, 0)
        return None
    stamp = backup_stamp(time.time() if now_wall is None else now_wall)
    tag = "" if kind is Kept.BACKUP else f"{kind.value}-" + (f"{node}-" if node else "")
    path = live.parent / f"{live.name}{BACKUP_SUFFIX}{tag}{stamp}"
    owner = None if private else _owner(like or live)
    write_atomic(path, content, mode=0o600, owner=owner)
    _prune(live, kind, keep)
    return path


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def install(
    content: bytes,
    live: Path,
    keep: int | None,
    now_wall: float | None = None,
    was: str | None = None,
) -> Installed:
    """Make ``content`` the live file, atomically; keep ``keep`` generations of backups (None:
    make no backup, prune none: a restore). ``was``: the sha256 the live file must hold at the
    instant it is replaced (``ABSENT``: no file); otherwise nothing changes and ``LiveChanged``
    is raised. None: not checked."""
    now_wall = time.time() if now_wall is None else now_wall
    # A symlinked config (configuration management writes the target) stays a link: the
    # target is what is replaced.
    target = Path(os.path.realpath(live)) if live.is_symlink() else live
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    tmp = write_temp(target, content, mode=0o644, owner=Owner.of(st) if st else None)
    try:
        previous = _swap_in(tmp, target, was)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(target.parent)
    backup = None
    if keep is not None and previous is not None:
        backup = keep_copy(live, previous, Kept.BACKUP, keep, like=target, now_wall=now_wall)
    elif keep is not None:
        _prune(live, Kept.BACKUP, keep)
    return Installed(live, backup, content, previous)


def _swap_in(tmp: Path, live: Path, was: str | None) -> bytes | None:
    """Put ``tmp`` at ``live``; the content it replaced (None: there was no file). With
    ``was``, exactly: a file the swap took out that is not ``was`` is swapped back."""
    if live.exists() and exchange(tmp, live):
        # ``tmp`` now holds the file that was live at the instant of the swap.
        previous = tmp.read_bytes()
        if was is not None and _sha(previous) != was:
            exchange(tmp, live)
            raise LiveChanged(live)
        return previous
    if was == ABSENT:
        try:
            os.link(tmp, live)  # fails if a file appeared meanwhile: never replaces one
        except FileExistsError:
            raise LiveChanged(live) from None
        return None
    # No exchange on this filesystem: compare, then rename. The window between the two is what
    # remains unguarded.
    try:
        old: bytes | None = live.read_bytes()
    except FileNotFoundError:
        old = None
    if was is not None and (ABSENT if old is None else _sha(old)) != was:
        raise LiveChanged(live)
    os.replace(tmp, live)
    return old


def restore(live: Path, previous: bytes, was: str | None = None) -> None:
    """Put the previous content back as the live file (after a reload with the new one
    failed); no backup is made of what it replaces."""
    install(previous, live, keep=None, was=was)
