"""``lbwatch sync --status`` and ``lbwatch sync --now``: read (and nudge) the running agent.

Both read the agent's status.json; ``--now`` drops a flag file in the state directory that the
agent's inotify watch picks up, then waits for the peers to settle. Exit 0 when every peer holds
this node's version (or has nothing to take from it), 1 otherwise, 3 when no agent runs.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lbwatch.config import Config
from lbwatch.status import SYNC_NOW_FLAG, read_status
from lbwatch.sync.canary import status_line

EXIT_OK, EXIT_FAILED, EXIT_NOT_RUNNING = 0, 1, 3
FINE = ("in-sync", "idle")
SETTLED = ("in-sync", "idle", "rejected", "peer-newer")


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def sync_lines(sync: dict[str, Any] | None) -> list[str]:
    """The sync part of `lbwatch status`, also printed by `lbwatch sync --status`."""
    if not sync:
        return []
    if sync.get("error"):
        return [f"  {'sync':<11} NOT RUNNING: {sync['error']}"]
    if "file" not in sync:
        return []
    cur = sync.get("current")
    held = "-"
    if cur:
        held = f"{cur['digest'][:12]} (edited on {cur['origin']} {_when(cur['edited'])})"
    lines = [f"  {'sync':<11} {sync['file']}: {held}"]
    local = sync.get("local") or {}
    if local.get("result") in ("invalid", "reload-failed", "deleted", "missing"):
        lines.append(f"  {'  local':<11} {local['result'].upper()}: {local['message']}")
    if sync.get("held"):
        lines.append(status_line(sync["held"]))
    rec = sync.get("received")
    if rec:
        lines.append(
            f"  {'  received':<11} from {rec['from']} at {_when(rec['at'])}: {rec['result']}"
            + (f" ({rec['message']})" if rec["result"] != "applied" else "")
        )
    for name, peer in (sync.get("peers") or {}).items():
        state = peer["state"]
        text = state if state in FINE else state.upper()
        if state == "unreachable":
            text += f" since {_when(peer['since'])}"
        if peer.get("message"):
            text += f": {peer['message']}"
        lines.append(f"  {'  ' + name:<11} {text} ({peer['pushes']} push(es))")
    return lines


def _peers_settled(sync: dict[str, Any], node: str, accept: tuple[str, ...]) -> bool:
    """Every peer is in one of the ``accept`` states about the current version; when that
    version is this node's own, about that very version (not an earlier one)."""
    cur = sync.get("current") or {}
    mine = cur.get("origin") == node
    for peer in (sync.get("peers") or {}).values():
        if peer["state"] not in accept:
            return False
        if mine and (peer.get("target") or {}).get("digest") != cur.get("digest"):
            return False
    return True


def sync_status(cfg: Config) -> int:
    read = read_status(cfg.agent.run_dir)
    if not read.agent_running or read.data is None:
        print(read.problem, file=sys.stderr)
        return EXIT_NOT_RUNNING
    sync = read.data.get("sync")
    if not sync or "file" not in sync:
        print("\n".join(sync_lines(sync)) or "config sync is not configured ([sync] peers)")
        return EXIT_FAILED
    print("\n".join(sync_lines(sync)))
    node = read.data["agent"].get("node", "")
    return EXIT_OK if _peers_settled(sync, node, FINE) else EXIT_FAILED


def sync_now(cfg: Config, wait: float) -> int:
    read = read_status(cfg.agent.run_dir)
    if not read.agent_running or read.data is None:
        print(read.problem, file=sys.stderr)
        return EXIT_NOT_RUNNING
    if not (read.data.get("sync") or {}).get("file"):
        print("config sync is not configured ([sync] peers)", file=sys.stderr)
        return EXIT_FAILED
    node = read.data["agent"].get("node", "")
    asked = time.time()
    flag = cfg.agent.state_dir / SYNC_NOW_FLAG
    flag.write_text(f"{asked}\n")
    deadline = time.monotonic() + wait
    while True:
        time.sleep(0.1)
        read = read_status(cfg.agent.run_dir)
        sync = (read.data or {}).get("sync") or {}
        local = sync.get("local") or {}
        done = local.get("at", 0) >= asked and not flag.exists()
        if done and (local.get("result") != "applied" or _peers_settled(sync, node, SETTLED)):
            break
        if time.monotonic() >= deadline or not read.agent_running:
            print(f"not settled within {wait:g} s:", file=sys.stderr)
            break
    print("\n".join(sync_lines(sync)))
    ok = local.get("result") == "applied" and _peers_settled(sync, node, FINE)
    return EXIT_OK if ok else EXIT_FAILED
