"""Is config sync on this node fine? The verdict behind ``lbwatch sync --status``'s exit code
and its ``--json``, read from the sync part of the status document (``SyncService.snapshot``).
Pure: no I/O, no clock.

Fine means the live file is not known to be broken and every peer holds the current version,
as far as this node can know:

- the live file: its last local job found it invalid, its reload failed, or it was deleted or
  missing; unless a peer's version was installed over it since (the broken file is gone);
- the current version is this node's own: each peer must be in sync with that very version;
  pending, rejected, unreachable, a peer holding a newer edit of its own, or not yet checked
  are all problems;
- it came from another node: that node delivers it, and this node stops reading the peers'
  status (the digest last read from them is about an older version of this node's, so it
  proves nothing). The origin counts as in sync: it made the version, and a later one it
  makes comes here too. Any other peer is the origin's to check (its own ``sync --status``
  says), not a problem here: counting it as one would keep every node but the last editor
  failing. A peer still seen in a delivery state is judged on the digest it holds: one that
  holds another digest is not in sync.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Local job results that leave the live file broken or absent.
BROKEN = ("invalid", "reload-failed", "deleted", "missing")
NOT_CONFIGURED = "config sync is not configured ([sync] peers)"

PeerSync = Literal[
    "in-sync",
    "not-in-sync",
    "origin-delivers",  # the current version came from another node, which delivers it
]


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


def judge_peer(
    name: str, peer: Mapping[str, Any], current: Mapping[str, Any], node: str
) -> PeerVerdict:
    """One peer, about ``current`` (the version this node holds)."""
    state = peer.get("state")
    message = peer.get("message") or ""
    held = (peer.get("target") or {}).get("digest")
    mine = current.get("origin") == node
    if state == "idle":
        if mine:
            return PeerVerdict("not-in-sync", "idle: this node's version not delivered yet")
        if name == current.get("origin"):
            return PeerVerdict("in-sync", f"the current version came from {name}")
        return PeerVerdict(
            "origin-delivers",
            f"the current version came from {current.get('origin')}, which delivers it",
        )
    if state == "in-sync":
        if held == current.get("digest"):
            return PeerVerdict("in-sync", "holds the current version")
        return PeerVerdict("not-in-sync", "in-sync with an earlier version, not the current one")
    text = str(state).upper() + (f": {message}" if message else "")
    return PeerVerdict("not-in-sync", text)


def judge(sync: Mapping[str, Any] | None, node: str) -> Verdict:
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
    peers = {
        name: judge_peer(name, peer, current, node)
        for name, peer in (sync.get("peers") or {}).items()
    }
    problems += [f"{n}: {p.why}" for n, p in peers.items() if p.sync == "not-in-sync"]
    return Verdict(not problems, tuple(problems), peers)
