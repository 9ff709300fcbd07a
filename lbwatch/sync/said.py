"""What config sync says: about each outcome, the log line, its level and the alert, if any;
about itself, the sync part of the status document. Pure: the service (``service.py``) logs,
alerts and publishes what these return, so which outcome raises which alert is a table
(tests/test_sync_said.py), not a branch buried in the event loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from lbwatch.config import Config
from lbwatch.events import ProbeResult
from lbwatch.statusdoc import (
    HeldView,
    JobView,
    PeerDoc,
    ReceivedView,
    SyncView,
    VersionView,
)
from lbwatch.sync import canary
from lbwatch.sync.apply import LocalOutcome, StagedOutcome
from lbwatch.sync.fileset import FileSet
from lbwatch.sync.peers import PeerView
from lbwatch.sync.receive import Received
from lbwatch.sync.versions import Version

# What the jobs and the peer links hand back to the loop. None: nothing was staged after all.
Report = Union[LocalOutcome, StagedOutcome, PeerView, None]
REFUSED = ("rejected", "implausible", "reload-failed")


@dataclass(frozen=True)
class Said:
    level: int  # logging level of the line
    text: str
    alert: str | None = None  # the alert kind; its text is ``text`` (or ``alert_text``)
    alert_text: str | None = None


def then(cfg: Config) -> str:
    """What becomes of this node's new version."""
    health = cfg.haproxy.health
    if cfg.sync.push_after == "healthy" and health is not None:
        return f"pushing to peers once its health probe passes {health.rise} time(s) on it"
    return "pushing to peers"


def local(out: LocalOutcome, where: Path, then: str) -> Said:
    """A local job's outcome; ``then``: what becomes of a new version (pushed, or held)."""
    if out.result == "applied":
        # The message says what happened: "valid and reloaded (...)", "valid; haproxy not
        # running, ...", or a `sync --now` that reloaded nothing.
        return Said(logging.INFO, f"{where}: {out.message}; {then}")
    if out.result == "adopted":
        return Said(logging.INFO, f"{where}: recorded as the current version")
    if out.result == "invalid":
        text = f"{where} is invalid, not reloaded and not pushed: {out.message}"
        alert = f"{where} is invalid, not reloaded: {out.message}"
        return Said(logging.ERROR, text, "config_invalid", alert)
    if out.result == "reload-failed":
        return Said(logging.ERROR, f"{where}: {out.message}", "reload_failed")
    if out.result == "missing":
        return Said(logging.ERROR, f"{where}: {out.message}")
    return Said(logging.DEBUG, f"{where}: {out.result} ({out.message})")


def canary_step(
    step: canary.Step, where: Path, gate: canary.Gate, probe: ProbeResult, rise: int, now: float
) -> Said | None:
    """What a health probe did to a version held back from the peers (``canary``)."""
    held = f"{where} version {gate.version.digest[:12]}"
    if step is canary.Step.HEALTHY:
        took = now - gate.opens + canary.SETTLE
        text = (
            f"{held} passed its health probe {rise} time(s) (held {took:.2f} s); pushing to peers"
        )
        return Said(logging.INFO, text)
    if step is canary.Step.UNHEALTHY:
        text = (
            f"{held} reloaded here but not pushed: its health probe fails ({probe.detail}); "
            "the peers keep the previous version"
        )
        return Said(logging.ERROR, text, "config_unhealthy")
    if step is canary.Step.IGNORED:
        return None
    return Said(logging.DEBUG, f"{held}: canary probe {step.value} ({probe.detail})")


def refused(rec: Received) -> Said:
    """A version from a peer that this node refused."""
    origin = rec.version.origin if rec.version else "?"
    return Said(
        logging.ERROR,
        f"version from {origin} refused: {rec.message}",
        "config_rejected",
        f"version of {rec.file} from {origin}: {rec.message}",
    )


def staged(out: StagedOutcome, where: Path, ours_undelivered: bool) -> list[Said]:
    """A staged job's outcome (its received version); ``ours_undelivered``: the version this
    node held was its own edit and had not reached every peer yet."""
    rec = out.received
    assert rec is not None
    origin = rec.version.origin if rec.version else "?"
    said = []
    if rec.result == "applied":
        said.append(Said(logging.INFO, f"version from {origin}: {rec.message}"))
        if out.lost_local is not None:
            # An operator's edit that had not gone live here could not win (invalid).
            text = (
                f"this node's unapplied edit of {where} was replaced by {origin}'s version; "
                f"the edit is kept as {out.lost_local}"
            )
            said.append(Said(logging.WARNING, text, "config_conflict"))
        elif ours_undelivered:
            # Simultaneous edits: ours lost to a later one before reaching every peer.
            text = f"this node's edit of {where} lost to a later edit on {origin}: {rec.message}"
            said.append(Said(logging.WARNING, text, "config_conflict"))
    elif rec.result in REFUSED:
        said.append(refused(rec))
    elif rec.result == "kept-local":
        text = f"edit of {rec.file} on {origin} lost to this node's later edit: {rec.message}"
        said.append(Said(logging.WARNING, text, "config_conflict"))
    else:
        said.append(Said(logging.INFO, f"version from {origin}: {rec.message}"))
    if out.superseded:
        said.append(Said(logging.INFO, f"{out.superseded} older staged version(s) dropped"))
    return said


def action(report: Report) -> str:
    """One line for the SYNC action's result: what the job concluded."""
    if report is None:
        return "nothing staged"
    if isinstance(report, LocalOutcome):
        return f"{report.result}: {report.message}" if report.message else report.result
    if isinstance(report, StagedOutcome):
        if report.received is None:
            return "staged version deferred: the live file is being edited"
        return f"{report.received.result}: {report.received.message}"
    return report.state.value


def version_view(v: Version | None) -> VersionView | None:
    """A version as the status document shows it."""
    if v is None:
        return None
    return VersionView(
        origin=v.origin, counter=v.counter, edited=v.edited_ns / 1e9, digest=v.digest
    )


def snapshot(
    files: FileSet,
    staging: Path,
    current: Version | None,
    outcomes: Outcomes,
    views: dict[str, PeerView],
) -> SyncView:
    """The sync part of the status document: what this node holds, the last outcomes
    (``local``, ``received``, ``held``) and each peer as its link sees it."""
    peers = {
        name: PeerDoc(
            state=v.state.value,
            since=v.since,
            message=v.message,
            target=version_view(v.target),
            peer_digest=v.peer_digest,
            pushes=v.pushes,
            failures=v.failures,
            last_in_sync=v.left_in_sync,
        )
        for name, v in views.items()
    }
    return SyncView(
        file=str(files.config),
        extra_files=[str(x) for x in files.extra],
        staging=str(staging),
        current=version_view(current),
        local=outcomes.local,
        received=outcomes.received,
        held=outcomes.held,
        peers=peers,
    )


@dataclass(frozen=True)
class Outcomes:
    """The last outcomes the sync part of the status shows."""

    local: JobView | None
    received: ReceivedView | None
    held: HeldView | None
