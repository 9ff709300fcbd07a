"""Is config sync on this node fine? The verdict behind ``lbwatch sync --status``'s exit code
and its ``--json``, read from the sync part of the status document (``SyncService.snapshot``).
Pure: no I/O, no clock.

Fine means the live file is not known to be broken and every peer holds the current version,
as far as this node can know:

- the live file: its last local job found it invalid, its reload failed, or it was deleted or
  missing; unless a peer's version was installed over it since (the broken file is gone);
- each peer: every node delivers the version it holds, whoever made it, so each peer link
  works on the current version and must have found the peer holding it; pending, rejected,
  unreachable, a peer holding a newer edit, or not yet checked are all problems.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from lbwatch.statusdoc import PeerDoc, PeerVerdictView, SyncReport, SyncView, VersionView

# Local job results that leave the live file broken or absent.
BROKEN = ("invalid", "reload-failed", "deleted", "missing")
NOT_CONFIGURED = "config sync is not configured ([sync] peers)"

PeerSync = Literal["in-sync", "not-in-sync"]


@dataclass(frozen=True)
class PeerVerdict:
    sync: PeerSync
    why: str


@dataclass(frozen=True)
class Verdict:
    ok: bool
    problems: tuple[str, ...]
    peers: Mapping[str, PeerVerdict] = field(default_factory=dict)

    def report(self, code: int, node: str | None, sync: SyncView | None) -> SyncReport:
        """The verdict as ``sync --json`` prints it."""
        return SyncReport(
            exit=code,
            ok=self.ok,
            problems=list(self.problems),
            peers={n: PeerVerdictView(sync=p.sync, why=p.why) for n, p in self.peers.items()},
            node=node,
            sync=sync,
        )


def local_problem(sync: SyncView) -> str | None:
    """What is wrong with the live file, or None."""
    local = sync.local
    if local is None or local.result not in BROKEN:
        return None
    received = sync.received
    # Both times are the same agent's wall clock, written as it handled each: a peer's
    # version installed after the failure replaced the broken (or absent) file.
    if received is not None and received.result == "applied" and received.at > local.at:
        return None
    return f"{sync.file or 'the live file'} {local.result.upper()}: {local.message}"


def judge_peer(peer: PeerDoc, current: VersionView) -> PeerVerdict:
    """One peer, about ``current`` (the version this node holds)."""
    state = peer.state
    message = peer.message
    held = peer.target.digest if peer.target is not None else None
    if state == "in-sync":
        if held == current.digest:
            return PeerVerdict("in-sync", "holds the current version")
        return PeerVerdict("not-in-sync", "in-sync with an earlier version, not the current one")
    if state == "idle":
        return PeerVerdict("not-in-sync", "idle: the current version not delivered yet")
    text = str(state).upper() + (f": {message}" if message else "")
    return PeerVerdict("not-in-sync", text)


def judge(sync: SyncView | None) -> Verdict:
    """The verdict on this node's sync part of the status (None: sync is off)."""
    if not sync:
        return Verdict(False, (NOT_CONFIGURED,))
    if sync.error:
        return Verdict(False, (f"config sync NOT RUNNING: {sync.error}",))
    if sync.file is None:
        return Verdict(False, (NOT_CONFIGURED,))
    problems = []
    local = local_problem(sync)
    if local is not None:
        problems.append(local)
    current = sync.current
    if current is None:
        state = sync.local
        problems.append(
            f"{sync.file}: no current version yet ({state.result if state else None}: "
            f"{state.message if state else ''})"
        )
        return Verdict(False, tuple(problems))
    peers = {name: judge_peer(peer, current) for name, peer in sync.peers.items()}
    problems += [f"{n}: {p.why}" for n, p in peers.items() if p.sync == "not-in-sync"]
    return Verdict(not problems, tuple(problems), peers)
