"""The receiving side: a version a peer pushed into this node's staging directory is checked,
judged against the current one, validated, installed and reloaded, and the outcome written to
``status.json`` in staging, where the sender reads it back over the same restricted key.

Blocking; for a worker thread. A received version is never pushed on: ``accept`` tells the
local watcher its hash before the file goes live, so the change is not reported as an edit.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lbwatch.events import Outcome
from lbwatch.fsutil import write_atomic
from lbwatch.notify.message import one_line
from lbwatch.services import CommandResult
from lbwatch.sync.install import install, restore, validate
from lbwatch.sync.versions import Verdict, Version, judge, parse_staged_name

STATUS = "status.json"
OK = Outcome.OK


@dataclass(frozen=True)
class Received:
    file: str
    result: str  # applied, same, kept-local, rejected, reload-failed; local-edit for our own
    message: str
    version: Version | None  # what was received
    current: Version | None  # what this node holds afterwards


def write_status(staging: Path, rec: Received) -> None:
    """Record ``rec`` in the status file the senders read back (one entry per file)."""
    path = staging / STATUS
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[rec.file] = {
        "result": rec.result,
        "message": rec.message,
        "received": asdict(rec.version) if rec.version else None,
        "current": asdict(rec.current) if rec.current else None,
        "at": time.time(),
    }
    # Readable by the sync key (rrsync runs as the key's user), written only by lbwatch.
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode=0o644)


@dataclass(frozen=True)
class ApplySettings:
    check: list[str]  # checker argv, "{file}" replaced by the staged file
    reload: Callable[[], CommandResult]  # reload haproxy and confirm it took
    keep: int  # backup generations
    timeout: float  # per command


def receive(
    staged: Path,
    live: Path,
    current: Version | None,
    settings: ApplySettings,
    accept: Callable[[Path, str], None],
) -> Received:
    """Handle one staged file; it is removed afterwards whatever the result."""
    try:
        rec = _receive(staged, live, current, settings, accept)
    finally:
        staged.unlink(missing_ok=True)
    write_status(staged.parent, rec)
    return rec


def _receive(
    staged: Path,
    live: Path,
    current: Version | None,
    settings: ApplySettings,
    accept: Callable[[Path, str], None],
) -> Received:
    version = parse_staged_name(staged.name)
    name = live.name
    if version is None or version.file != name:
        return Received(
            name, "rejected", f"not a staged version of {name}: {staged.name}", None, current
        )
    content = staged.read_bytes()
    if hashlib.sha256(content).hexdigest() != version.digest:
        return Received(
            name,
            "rejected",
            "content does not match its hash (damaged in transit)",
            version,
            current,
        )
    verdict = judge(current, version)
    if verdict is Verdict.SAME:
        later = version if current is None or version.key() > current.key() else current
        return Received(name, "same", "already live", version, later)
    if verdict is Verdict.KEEP_LOCAL:
        # Ours is newer: theirs is kept beside the live file for the operator, and reported.
        lost = live.parent / f"{name}.lbwatch-lost-{version.origin}-{version.edited_ns}"
        lost.write_bytes(content)
        return Received(
            name,
            "kept-local",
            f"local version is newer; {version.origin}'s kept as {lost.name}",
            version,
            current,
        )
    checked = validate(settings.check, staged, settings.timeout)
    if not checked.ok:
        return Received(name, "rejected", one_line(checked.message, 500), version, current)
    accept(live, version.digest)
    done = install(content, live, settings.keep)
    reloaded = settings.reload()
    if reloaded.outcome is OK:
        kept = f"; the previous file kept as {done.backup.name}" if done.backup else ""
        return Received(
            name, "applied", f"installed and reloaded ({reloaded.detail}){kept}", version, version
        )
    # The new config does not run: put the previous one back (telling the watcher first, so
    # the restore is not taken for a local edit) and reload that.
    message = f"reload failed ({reloaded.detail})"
    if done.backup is not None:
        old = done.backup.read_bytes()
        accept(live, hashlib.sha256(old).hexdigest())
        restore(live, done.backup)
        again = settings.reload()
        message += "; previous config restored" + (
            " and reloaded" if again.outcome is OK else f", its reload failed too ({again.detail})"
        )
    return Received(name, "reload-failed", message, version, current)
