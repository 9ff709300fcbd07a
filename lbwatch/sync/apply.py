"""The sync jobs, run one at a time on the sync worker thread (so installs and reloads never
interleave): a local edit, the versions peers staged here, and the start-up reconcile.

A local edit: check the live file (only exit 0 passes), reload and confirm, record the version;
the loop then hands it to the peers. Invalid: nothing reloaded, nothing pushed, the running
haproxy keeps its config. Reload failed: the previous recorded version goes back (the refused
file is kept beside it) and is reloaded.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lbwatch.events import Outcome
from lbwatch.notify.message import one_line
from lbwatch.services import with_reload
from lbwatch.sync.fileset import Expect, FileSet, install_all, sha256
from lbwatch.sync.install import backup_stamp, validate
from lbwatch.sync.ledger import Ledger
from lbwatch.sync.receive import ApplySettings, Received, Result, receive, write_status
from lbwatch.sync.versions import Version, parse_staged_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    node: str
    files: FileSet
    staging: Path
    ledger: Ledger
    settings: ApplySettings
    expect: Expect  # the watcher, told about files lbwatch itself writes


LocalResult = Literal[
    "applied",
    "adopted",  # recorded as it is, at first start
    "unchanged",
    "invalid",
    "reload-failed",
    "superseded",  # changed again while being checked
    "missing",
]


@dataclass(frozen=True)
class LocalOutcome:
    result: LocalResult
    message: str
    version: Version | None  # the current version afterwards


@dataclass(frozen=True)
class StagedOutcome:
    received: Received
    superseded: int  # older staged versions dropped unapplied


def record(ctx: Context, version: Version, content: bytes, result: Result, message: str) -> None:
    """Make ``version`` this node's current one, in the ledger and in the peers' status."""
    ctx.ledger.record(version, content)
    write_status(ctx.staging, Received(version.file, result, message, None, version))


def apply_local(ctx: Context, seen_ns: int) -> LocalOutcome:
    """The live files changed here (seen at wall-clock ``seen_ns``)."""
    name, live = ctx.files.unit, ctx.files.config
    current = ctx.ledger.current(name)
    try:
        content = ctx.files.read_live()
    except OSError as exc:
        return LocalOutcome("missing", f"{live}: {exc.strerror}", current)
    digest = sha256(content)
    if current is not None and current.digest == digest:
        return LocalOutcome("unchanged", "same content as the current version", current)
    checked = validate(ctx.settings.check, live, ctx.settings.timeout)
    try:
        again = ctx.files.read_live()
    except OSError:
        again = b""
    if sha256(again) != digest:
        return LocalOutcome("superseded", "changed again while being checked", current)
    if not checked.ok:
        return LocalOutcome("invalid", one_line(checked.message, 500), current)
    reloaded = ctx.settings.reload()
    if reloaded.outcome is not Outcome.OK:
        return LocalOutcome("reload-failed", _roll_back(ctx, reloaded.detail), current)
    version = Version(name, ctx.node, seen_ns, digest)
    record(ctx, version, content, "local-edit", with_reload("valid", reloaded))
    return LocalOutcome("applied", with_reload("valid", reloaded), version)


def _roll_back(ctx: Context, why: str) -> str:
    message = f"reload failed ({why})"
    good = ctx.ledger.content(ctx.files.unit)
    if good is None:
        return message + "; no earlier version recorded to go back to"
    live = ctx.files.config
    kept = live.parent / f"{live.name}.lbwatch-failed-{backup_stamp(time.time())}"
    shutil.copyfile(live, kept)
    install_all(ctx.files.unpack(good), ctx.settings.keep, ctx.expect)
    again = ctx.settings.reload()
    return message + (
        f"; previous version restored and reloaded, the refused config kept as {kept.name}"
        if again.outcome is Outcome.OK
        else f"; previous version restored, its reload failed too ({again.detail})"
    )


def apply_staged(ctx: Context) -> StagedOutcome | None:
    """Take the newest version staged for the live file; older ones are dropped unapplied (the
    newest wins, stale versions are never replayed). None when nothing is staged."""
    name = ctx.files.unit
    staged = []
    for path in ctx.staging.iterdir():
        v = parse_staged_name(path.name)
        if v is not None and v.file == name:
            staged.append((v.key(), path))
    if not staged:
        return None
    staged.sort()
    for _, old in staged[:-1]:
        log.info("dropping %s: a newer version is staged", old.name)
        old.unlink(missing_ok=True)
    path = staged[-1][1]
    try:
        content = path.read_bytes()
    except OSError:
        return None  # taken by a job before this one
    current = ctx.ledger.current(name)
    rec = receive(path, ctx.files, current, ctx.settings, ctx.expect)
    if rec.current is not None and rec.current != current:
        ctx.ledger.record(rec.current, content)
    return StagedOutcome(rec, len(staged) - 1)


def reconcile(ctx: Context) -> LocalOutcome:
    """At start-up: adopt the live file when nothing is recorded yet, or treat it as a local
    edit when it changed while lbwatch was not running."""
    name = ctx.files.unit
    current = ctx.ledger.current(name)
    try:
        content = ctx.files.read_live()
        edited_ns = max(p.stat().st_mtime_ns for p in ctx.files.members())
    except OSError as exc:
        return LocalOutcome("missing", f"{ctx.files.config}: {exc.strerror}", current)
    if current is None:
        # First start: the file's own modification time is the edit time, so that of two
        # nodes starting with different files, the one edited last wins.
        version = Version(name, ctx.node, edited_ns, sha256(content))
        record(ctx, version, content, "local-edit", "recorded at first start")
        return LocalOutcome("adopted", "recorded at first start", version)
    if current.digest != sha256(content):
        return apply_local(ctx, edited_ns)
    write_status(ctx.staging, Received(name, "current", "current at start-up", None, current))
    return LocalOutcome("unchanged", "as recorded", current)
