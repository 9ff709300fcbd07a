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
from typing import Any, Literal

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "peers": {n: {"sync": p.sync, "why": p.why} for n, p in self.peers.items()},
        }


def local_problem(sync: Mapping[str, Any]) -> str | None:
    """What is wrong with the live file, or None."""
    local = sync.get("local") or {}
    result = local.get("result")
    if result not in BROKEN:
        return None
    received = sync.get("received") or {}
    # Both times are the same agent's wall clock, written as it handled each: a peer's
    # version installed after the failure replaced the broken (or absent) file.
    if received.get("result") == "applied" and received.get("at", 0) > local.get("at", 0):
        return None
    return f"{sync.get('file', 'the live file')} {str(result).upper()}: {local.get('message', '')}"


def judge_peer(peer: Mapping[str, Any], current: Mapping[str, Any]) -> PeerVerdict:
    """One peer, about ``current`` (the version this node holds)."""
    state = peer.get("state")
    message = peer.get("message") or ""
    held = (peer.get("target") or {}).get("digest")
    if state == "in-sync":
        if held == current.get("digest"):
            return PeerVerdict("in-sync", "holds the current version")
        return PeerVerdict("not-in-sync", "in-sync with an earlier version, not the current one")
    if state == "idle":
        return PeerVerdict("not-in-sync", "idle: the current version not delivered yet")
    text = str(state).upper() + (f": {message}" if message else "")
    return PeerVerdict("not-in-sync", text)


def judge(sync: Mapping[str, Any] | None) -> Verdict:
    """The verdict on this node's sync part of the status (None: sync is off)."""
    if not sync:
        return Verdict(False, (NOT_CONFIGURED,))
    if sync.get("error"):
        return Verdict(False, (f"config sync NOT RUNNING: {sync['error']}",))
    if "file" not in sync:
        return Verdict(False, (NOT_CONFIGURED,))
    problems = []
    local = local_problem(sync)
    if local is not None:
        problems.append(local)
    current = sync.get("current")
    if not current:
        state = sync.get("local") or {}
        problems.append(
            f"{sync['file']}: no current version yet ({state.get('result')}: "
            f"{state.get('message', '')})"
        )
        return Verdict(False, tuple(problems))
    peers = {name: judge_peer(peer, current) for name, peer in (sync.get("peers") or {}).items()}
    problems += [f"{n}: {p.why}" for n, p in peers.items() if p.sync == "not-in-sync"]
    return Verdict(not problems, tuple(problems), peers)
