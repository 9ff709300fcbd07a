"""The receiving side: a version a peer pushed into this node's staging directory is checked,
judged against the current one, validated, installed and reloaded, and the outcome written to
``status.json`` in staging, where the sender reads it back over the same restricted key.

Blocking; for a worker thread. A received version is not taken for a local edit: ``expect``
tells the local watcher its hashes before the files go live.
``guard`` holds what each live file held when the version was judged: an install that finds
anything else there (an operator saved meanwhile) is undone and ``LiveChanged`` raised, so the
caller decides again with the operator's edit as a version of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from lbwatch.events import Outcome
from lbwatch.fsutil import write_atomic
from lbwatch.notify.message import one_line
from lbwatch.services import CommandResult, with_reload
from lbwatch.sync import peerstatus
from lbwatch.sync.confine import Confine
from lbwatch.sync.fileset import Expect, FileSet, Guard, install_all, restore_all, sha256
from lbwatch.sync.install import Kept, LiveChanged, keep_copy
from lbwatch.sync.peerstatus import STATUS, Result
from lbwatch.sync.staging import KEPT
from lbwatch.sync.timing import step
from lbwatch.sync.versions import (
    Verdict,
    Version,
    current_after,
    implausible,
    judge,
    parse_staged_name,
)

log = logging.getLogger(__name__)

OK = Outcome.OK


@dataclass(frozen=True)
class Received:
    file: str
    result: Result
    message: str
    version: Version | None  # what was received
    current: Version | None  # what this node holds afterwards


def write_status(staging: Path, rec: Received) -> None:
    """Record ``rec`` in the status file the senders read (one entry per file). A disk
    with no room for it fails no job: the status only tells the peers what this node holds, and
    the next job's write (or their push of a version this node has already) brings it up to
    date; the job's own work, an install or a reload, must not be left half done for it."""
    path = staging / STATUS
    try:
        entries = peerstatus.parse(path.read_bytes())
    except OSError:
        entries = {}
    entries[rec.file] = peerstatus.FileStatus(
        result=rec.result,
        message=rec.message,
        received=peerstatus.Held.of(rec.version) if rec.version else None,
        current=peerstatus.Held.of(rec.current) if rec.current else None,
        at=time.time(),
    )
    # Readable by the sync key (its receiver runs as the key's user), written only by lbwatch.
    try:
        write_atomic(path, peerstatus.render(entries), mode=0o644)
    except OSError as exc:
        log.error("cannot write %s (the peers read it): %s", path, exc.strerror or exc)


@dataclass(frozen=True)
class ApplySettings:
    check: list[str]  # checker argv, "{file}" replaced by the file to check
    reload: Callable[[], CommandResult]  # reload haproxy and confirm it took
    keep: int  # backup generations
    timeout: float  # per command
    confine: Confine  # what a received version may use, and how it is checked


def receive(
    staged: Path,
    files: FileSet,
    current: Version | None,
    vouched: int,
    settings: ApplySettings,
    expect: Expect,
    guard: Guard | None = None,
) -> Received:
    """Handle one staged version (this node holds ``current`` and vouches for counters up to
    ``vouched``, see ``versions``); the staged file is removed afterwards, unless
    ``LiveChanged`` is raised (then nothing changed and it stays for the next decision)."""
    try:
        rec = _receive(staged, files, current, vouched, settings, expect, guard)
    except LiveChanged:
        raise
    except BaseException:
        staged.unlink(missing_ok=True)  # a version that breaks the job is not retried forever
        raise
    staged.unlink(missing_ok=True)
    write_status(staged.parent, rec)
    return rec


def _decided(
    files: FileSet, current: Version | None, vouched: int, version: Version
) -> Received | None:
    """The outcome when the version rule alone decides and nothing of the version is written
    anywhere, or None."""
    name = files.unit
    verdict = judge(current, version, vouched)
    if verdict is Verdict.IMPLAUSIBLE:
        why = str(implausible(version.counter, vouched))
        return Received(name, "implausible", why, version, current)
    if verdict is Verdict.SAME:
        later = current_after(current, version, vouched)
        return Received(name, "same", "already live", version, later)
    return None


def _keep_theirs(
    staging: Path, files: FileSet, keep: int, version: Version, content: bytes
) -> Received:
    """Ours is newer: theirs is kept for the operator, and reported. Kept in staging's
    ``KEPT``, never beside the live file: no later config can load a file of the sender's
    that no check has read (a received version may name nothing in staging)."""
    kept_dir = staging / KEPT
    kept_dir.mkdir(mode=0o700, exist_ok=True)
    lost = keep_copy(kept_dir / files.unit, content, Kept.LOST, keep, version.origin, private=True)
    kept = f"{version.origin}'s kept as {lost}" if lost else f"{version.origin}'s dropped"
    return Received(files.unit, "kept-local", f"local version is newer; {kept}", version, None)


def _receive(
    staged: Path,
    files: FileSet,
    current: Version | None,
    vouched: int,
    settings: ApplySettings,
    expect: Expect,
    guard: Guard | None,
) -> Received:
    version = parse_staged_name(staged.name)
    name, live = files.unit, files.config
    if version is None or version.file != name:
        return Received(
            name, "rejected", f"not a staged version of {name}: {staged.name}", None, current
        )
    content = staged.read_bytes()
    if sha256(content) != version.digest:
        return Received(
            name,
            "rejected",
            "content does not match its hash (damaged in transit)",
            version,
            current,
        )
    try:
        members = files.unpack(content)
    except ValueError as exc:
        return Received(name, "rejected", str(exc), version, current)
    decided = _decided(files, current, vouched, version)
    if decided is not None:
        return decided
    confine = settings.confine
    refused = confine.refused(members, live)
    if refused is not None:
        # Before anything reads it with haproxy, and before anything of it is kept: what runs
        # code must not run even in a check.
        return Received(name, "rejected", one_line(refused, 500), version, current)
    if judge(current, version, vouched) is Verdict.KEEP_LOCAL:
        theirs = _keep_theirs(staged.parent, files, settings.keep, version, content)
        return replace(theirs, current=current)
    if not files.bundled:
        # One file: checked before it is installed, so nothing invalid ever sits at the live
        # path (unconfined: the staged copy; confined: seen at the live path).
        with step("check"):
            target = staged if confine.sandbox is None else live
            checked = confine.check(settings.check, target, {target: content}, settings.timeout)
        if not checked.ok:
            return Received(name, "rejected", one_line(checked.message, 500), version, current)
    with step("install"):
        installed = install_all(members, settings.keep, expect, guard)
    if files.bundled:
        # The config names its maps and certificates by their live paths: check in place,
        # before any reload, and put everything back if the check fails.
        checked = confine.check(settings.check, live, members, settings.timeout)
        if not checked.ok:
            restore_all(installed, expect)
            return Received(name, "rejected", one_line(checked.message, 500), version, current)
    with step("reload"):
        reloaded = settings.reload()
    if reloaded.outcome is OK:
        kept = "; previous files kept as " + ", ".join(
            i.backup.name for i in installed if i.backup is not None
        )
        return Received(
            name,
            "applied",
            with_reload("installed", reloaded) + (kept if installed else ""),
            version,
            version,
        )
    # The new config does not run: put the previous files back (telling the watcher first, so
    # the restore is not taken for a local edit) and reload those.
    restore_all(installed, expect)
    again = settings.reload()
    message = f"reload failed ({reloaded.detail}); " + (
        with_reload("previous config restored", again)
        if again.outcome is OK
        else f"previous config restored, its reload failed too ({again.detail})"
    )
    return Received(name, "reload-failed", message, version, current)
