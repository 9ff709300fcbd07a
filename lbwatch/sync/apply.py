"""The sync jobs, run one at a time on the sync worker thread (so installs and reloads never
interleave): a local edit, the versions peers staged here, and the start-up reconcile.

A local edit: check the live file (only exit 0 passes), reload and confirm, record the version;
the loop then hands it to the peers (with ``push_after = "check"`` it is recorded and handed
over once checked, during the reload: ``apply_local``). Invalid: nothing reloaded, nothing
pushed, the running haproxy keeps its config. Reload failed: the previous recorded version goes
back (the refused file is kept beside it) and is reloaded.

A version a peer staged is never installed over an operator's edit that lbwatch has not taken
yet (the live files differ from the recorded version): that edit is taken first, as a version
of its own. It counts every version already staged here as seen, so it wins over them, by the
rule, on every node; the staged one is then kept beside the live file and the conflict
reported. An edit that cannot win (invalid, or refused by the reload) is kept beside the live
file instead when the staged version is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lbwatch.events import Outcome
from lbwatch.fsutil import being_written
from lbwatch.notify.message import one_line
from lbwatch.services import with_reload
from lbwatch.sync.fileset import Expect, FileSet, guard_for, install_all, sha256
from lbwatch.sync.install import Kept, LiveChanged, keep_copy, validate
from lbwatch.sync.ledger import Ledger
from lbwatch.sync.peerstatus import Result
from lbwatch.sync.receive import ApplySettings, Received, receive, write_status
from lbwatch.sync.timing import step
from lbwatch.sync.versions import (
    Version,
    edit,
    implausible,
    parse_staged_name,
    seen_after,
    vouched_by,
    wall_ns,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    node: str
    files: FileSet
    staging: Path
    ledger: Ledger
    settings: ApplySettings
    expect: Expect  # the watcher, told about files lbwatch itself writes
    # The highest edit counter the peers' status files showed, as the links last read them
    # (the service keeps it; see ``versions.vouched_by``).
    peers_seen: Callable[[], int] = lambda: 0
    # Reads the peers' status files at once (blocking) and gives the highest edit counter one
    # of them holds, 0 if none answers: asked only for a staged version that claims more than
    # this node vouches for, before it is refused (see ``vouched``).
    ask_peers: Callable[[], int] = lambda: 0


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
class Checked:
    """A local edit passed the check and is recorded; haproxy reloads it now (``apply_local``'s
    ``on_checked``)."""

    version: Version


@dataclass(frozen=True)
class StagedOutcome:
    received: Received | None  # None: deferred, the live file is being edited right now
    superseded: int  # older staged versions dropped unapplied
    # An operator's edit found in the live files and taken first (see the module's text).
    local: LocalOutcome | None = None
    lost_local: str | None = None  # where that edit was kept when the staged version won
    # Versions refused on their own first, for claiming too much (see ``apply_staged``).
    refused: tuple[Received, ...] = ()


def record(ctx: Context, version: Version, content: bytes, result: Result, message: str) -> None:
    """Make ``version``, an edit made here, this node's current one, in the ledger (vouched
    for) and in the peers' status."""
    name = version.file
    ctx.ledger.record(version, content, vouched_by(ctx.ledger.vouched(name), version.counter))
    write_status(ctx.staging, Received(version.file, result, message, None, version))


def _staged(ctx: Context) -> list[tuple[Version, Path]]:
    """The versions staged for the live files, oldest first by the rule."""
    found = []
    for path in ctx.staging.iterdir():
        v = parse_staged_name(path.name)
        if v is not None and v.file == ctx.files.unit:
            found.append((v, path))
    return sorted(found, key=lambda vp: vp[0].key())


def known(ctx: Context) -> int:
    """The highest counter this node has seen recorded: its ledger's, and what its peers'
    status files showed (``Context.peers_seen``)."""
    return max(ctx.ledger.seen(ctx.files.unit), ctx.peers_seen())


def vouched(ctx: Context) -> int:
    """The highest counter this node vouches for, which claims are judged against: its own
    edits' and what its peers' status files showed they hold, never a claim it received (see
    ``versions``)."""
    return max(ctx.ledger.vouched(ctx.files.unit), ctx.peers_seen())


def seen(ctx: Context) -> int:
    """The highest counter this node has seen, versions waiting in staging and the peers'
    current versions included: an edit made here now is made after them. A staged version
    that claims too much counts for nothing."""
    high, bound = known(ctx), vouched(ctx)
    for v, _ in _staged(ctx):
        if implausible(v.counter, bound) is None:
            high = max(high, v.counter)
    return high


def _ask(ctx: Context) -> None:
    """A staged version claims more than this node vouches for: before it is refused, the
    peers are asked what they hold. A version a peer holds (its own edit, or one it took) is
    in its status file, which the sync key cannot write; what no peer holds stays refused."""
    name = ctx.files.unit
    ctx.ledger.vouch(name, vouched_by(ctx.ledger.vouched(name), ctx.ask_peers()))


def apply_local(
    ctx: Context, seen_ns: int, on_checked: Callable[[Version], None] | None = None
) -> LocalOutcome:
    """The live files changed here (seen at wall-clock ``seen_ns``). ``on_checked``: an edit
    that passed the check is recorded and told to it before haproxy reloads it, so that the
    peers get it meanwhile (``push_after = "check"``: the local reload is not on their critical
    path, they check it again); should the reload fail, what is restored here becomes a version
    of its own, newer, and goes to the peers too. Only for an operator's edit seen while
    lbwatch runs: at start-up and beside a peer's staged version, speed matters less than
    leaving a peer's newer version its chance."""
    name, live = ctx.files.unit, ctx.files.config
    current = ctx.ledger.current(name)
    try:
        content = ctx.files.read_live()
    except OSError as exc:
        return LocalOutcome("missing", f"{live}: {exc.strerror}", current)
    digest = sha256(content)
    if current is not None and current.digest == digest:
        return LocalOutcome("unchanged", "same content as the current version", current)
    with step("check"):
        checked = validate(ctx.settings.check, live, ctx.settings.timeout)
    try:
        again = ctx.files.read_live()
    except OSError:
        again = b""
    if sha256(again) != digest:
        return LocalOutcome("superseded", "changed again while being checked", current)
    if not checked.ok:
        return LocalOutcome("invalid", one_line(checked.message, 500), current)
    version = edit(name, ctx.node, seen(ctx), seen_ns, digest)
    good = ctx.ledger.content(name)  # what a failed reload goes back to
    if on_checked is not None:
        try:
            record(ctx, version, content, "local-edit", "valid; reloading")
        except OSError as exc:
            # The early hand-over only saves time; the reload goes on, and the record is
            # tried again after it, as without the hand-over.
            log.error("cannot record %s before its reload: %s", live, exc.strerror or exc)
            on_checked = None
        else:
            on_checked(version)
    with step("reload"):
        reloaded = ctx.settings.reload()
    if reloaded.outcome is not Outcome.OK:
        message = _roll_back(ctx, content, good, reloaded.detail)
        if on_checked is None:
            return LocalOutcome("reload-failed", message, current)
        return _revert(ctx, good, message, version)
    if on_checked is None:
        record(ctx, version, content, "local-edit", with_reload("valid", reloaded))
    else:
        write_status(
            ctx.staging, Received(name, "local-edit", with_reload("valid", reloaded), None, version)
        )
    return LocalOutcome("applied", with_reload("valid", reloaded), version)


def _revert(ctx: Context, good: bytes | None, message: str, failed: Version) -> LocalOutcome:
    """The edit whose reload failed went to the peers before the reload: what was restored
    here becomes a version of its own, newer than that edit, so that every peer goes back
    too. Without a previous version, or with the file saved again meanwhile (its own version
    follows), nothing was restored: the failed edit stays the current version."""
    live = ctx.files.config
    try:
        restored = good is not None and sha256(ctx.files.read_live()) == sha256(good)
    except OSError:
        restored = False
    if good is None or not restored:
        return LocalOutcome("reload-failed", message, failed)
    back = edit(ctx.files.unit, ctx.node, seen(ctx), wall_ns(), sha256(good))
    said = f"{message}; the peers given it back too"
    record(ctx, back, good, "local-edit", said)
    log.debug("%s: version %s reverts %s", live, back.staged_name(), failed.staged_name())
    return LocalOutcome("reload-failed", said, back)


def _roll_back(ctx: Context, refused: bytes, good: bytes | None, why: str) -> str:
    message = f"reload failed ({why})"
    if good is None:
        return message + "; no earlier version recorded to go back to"
    live = ctx.files.config
    kept = keep_copy(
        live.parent / ctx.files.unit,
        refused,
        Kept.FAILED,
        ctx.settings.keep,
        like=live,
        private=ctx.files.bundled,
    )
    try:
        install_all(
            ctx.files.unpack(good),
            ctx.settings.keep,
            ctx.expect,
            {p: sha256(c) for p, c in ctx.files.unpack(refused).items()},
        )
    except LiveChanged:
        return message + "; not rolled back: the file was saved again meanwhile"
    again = ctx.settings.reload()
    where = f", the refused config kept as {kept.name}" if kept else ""
    return message + (
        "; " + with_reload("previous version restored", again) + where
        if again.outcome is Outcome.OK
        else f"; previous version restored, its reload failed too ({again.detail})"
    )


# How often one staged job decides again when the operator keeps saving during it.
ATTEMPTS = 3


def apply_staged(ctx: Context, now_ns: int) -> StagedOutcome | None:
    """Take the newest version staged for the live files; older ones are dropped unapplied
    (the newest wins, stale versions are never replayed). None when nothing is staged.
    ``now_ns``: the wall clock, for an operator's edit found on the way."""
    staged, refused = _sort_out(ctx)
    if not staged:
        return StagedOutcome(refused[-1], 0, refused=tuple(refused[:-1])) if refused else None
    for _, old in staged[:-1]:
        log.info("dropping %s: a newer version is staged", old.name)
        old.unlink(missing_ok=True)
    version, path = staged[-1]
    local: LocalOutcome | None = None
    taken: set[str] = set()  # the operator's edits already decided on in this job
    lost_local = None
    for _ in range(ATTEMPTS):
        try:
            content = path.read_bytes()
        except OSError:
            return None  # taken by a job before this one
        live = _read_live(ctx)
        edit = _unrecorded(ctx, live)
        if edit is not None and being_written(ctx.files.config):
            # A save in progress (changed, and still open for writing): the watcher takes it
            # when it is whole, then this is asked again. A file held open but unchanged is
            # no edit: the install's guard covers a save that lands during it.
            return StagedOutcome(None, len(staged) - 1, local, refused=tuple(refused))
        if edit is not None and sha256(edit) not in taken:
            taken.add(sha256(edit))
            local = apply_local(ctx, now_ns)
            if local.result == "superseded":
                # Still being edited.
                return StagedOutcome(None, len(staged) - 1, local, refused=tuple(refused))
            live = _read_live(ctx)
            edit = _unrecorded(ctx, live)  # None now if it won (or was rolled back)
        try:
            rec = _receive(ctx, path, content, version, live)
        except LiveChanged:
            continue  # saved during the install: decide again with that edit
        if edit is not None and rec.result == "applied":
            lost_local = _keep_lost_local(ctx, edit)
        return StagedOutcome(rec, len(staged) - 1, local, lost_local, tuple(refused))
    return StagedOutcome(None, len(staged) - 1, local, refused=tuple(refused))


def _sort_out(ctx: Context) -> tuple[list[tuple[Version, Path]], list[Received]]:
    """The staged versions to decide between, oldest first, and those refused on their own
    for claiming too much: a forged counter never makes a real version look older than it and
    be dropped. The peers are asked once, before the first refusal: a hundred claims cost one
    look at them."""
    staged, refused = [], []
    asked = False
    for v, path in _staged(ctx):
        if not asked and implausible(v.counter, vouched(ctx)) is not None:
            asked = True
            _ask(ctx)
        if implausible(v.counter, vouched(ctx)) is None:
            staged.append((v, path))
        else:
            refused.append(_receive(ctx, path, path.read_bytes(), v, _read_live(ctx)))
    return staged, refused


def _read_live(ctx: Context) -> bytes | None:
    """The live files' content, packed as a version holds it; None: the main config is
    missing."""
    try:
        return ctx.files.read_live()
    except OSError:
        return None


def _unrecorded(ctx: Context, live: bytes | None) -> bytes | None:
    """``live`` when it is an edit lbwatch has not taken yet (not the recorded version's
    content), else None. A deleted file is not an edit: a deletion is not a version, and the
    install puts the file back."""
    recorded = ctx.ledger.content(ctx.files.unit)
    if recorded is None or live is None or live == recorded:
        return None
    return live


def _receive(
    ctx: Context, path: Path, content: bytes, version: Version, live: bytes | None
) -> Received:
    """Judge and maybe install one staged version; the install may replace exactly what the
    live files held when they were read (``live``) and nothing else."""
    name = ctx.files.unit
    current = ctx.ledger.current(name)
    high, bound = known(ctx), vouched(ctx)
    guard = guard_for(ctx.files, live)
    rec = receive(path, ctx.files, current, bound, ctx.settings, ctx.expect, guard)
    ctx.ledger.see(name, seen_after(high, version, bound))
    if rec.current is not None and rec.current != current:
        ctx.ledger.record(rec.current, content)
    return rec


def _keep_lost_local(ctx: Context, content: bytes) -> str | None:
    """Keep an operator's edit that a received version replaced (it could not win)."""
    live = ctx.files.config
    kept = keep_copy(
        live.parent / ctx.files.unit,
        content,
        Kept.LOST,
        ctx.settings.keep,
        ctx.node,
        like=live,
        private=ctx.files.bundled,
    )
    return kept.name if kept else None


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
        # First start: of two nodes starting with different files, the one edited last wins
        # (equal counters: the files' modification times decide); a node that joins a running
        # group loses to the group's versions, which have higher counters.
        version = edit(name, ctx.node, ctx.ledger.seen(name), edited_ns, sha256(content))
        record(ctx, version, content, "local-edit", "recorded at first start")
        return LocalOutcome("adopted", "recorded at first start", version)
    if current.digest != sha256(content):
        return apply_local(ctx, edited_ns)
    write_status(ctx.staging, Received(name, "current", "current at start-up", None, current))
    return LocalOutcome("unchanged", "as recorded", current)
