"""``lbwatch sync --status`` and ``lbwatch sync --now``: read (and nudge) the running agent.

Both read the agent's status.json; ``--now`` drops a flag file in the state directory that the
agent's inotify watch picks up, then waits for the peers to settle. Exit 0 when the live file is
fine and every peer holds the current version as far as this node knows (``verdict.judge``), 1
otherwise, 3 when no agent runs. ``--json``: one document, the verdict and the sync part of the
status, with the same exit code.
"""

from __future__ import annotations

import sys
import time

from lbwatch.config import Config
from lbwatch.status import SYNC_NOW_FLAG, read_status
from lbwatch.statusdoc import JobView, SyncView
from lbwatch.sync.canary import status_line
from lbwatch.sync.verdict import NOT_CONFIGURED, Verdict, judge, local_problem

EXIT_OK, EXIT_FAILED, EXIT_NOT_RUNNING = 0, 1, 3
PLAIN = ("in-sync", "idle")  # peer states shown in lower case; the others are shouted
SETTLED = ("in-sync", "idle", "rejected", "peer-newer")


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def sync_lines(sync: SyncView | None, always_local: bool = False) -> list[str]:
    """The sync part of `lbwatch status`, also printed by `lbwatch sync --status`; the last
    local job's outcome when it left the file broken, or always (``sync --now``)."""
    if sync is None:
        return []
    if sync.error:
        return [f"  {'sync':<11} NOT RUNNING: {sync.error}"]
    if sync.file is None:
        return []
    cur = sync.current
    held = "-"
    if cur is not None:
        held = f"{cur.digest[:12]} (edit {cur.counter} made on {cur.origin} {_when(cur.edited)})"
    lines = [f"  {'sync':<11} {sync.file}: {held}"]
    local = sync.local
    if local is not None and local_problem(sync) is not None:
        lines.append(f"  {'  local':<11} {local.result.upper()}: {local.message}")
    elif always_local and local is not None:
        lines.append(f"  {'  local':<11} {local.result}: {local.message}")
    if sync.held is not None:
        lines.append(status_line(sync.held))
    rec = sync.received
    if rec is not None:
        lines.append(
            f"  {'  received':<11} from {rec.origin} at {_when(rec.at)}: {rec.result}"
            + (f" ({rec.message})" if rec.message else "")
        )
    for name, peer in sync.peers.items():
        text = peer.state if peer.state in PLAIN else peer.state.upper()
        if peer.state == "unreachable":
            text += f" since {_when(peer.since)}"
        if peer.message:
            text += f": {peer.message}"
        lines.append(f"  {'  ' + name:<11} {text} ({peer.pushes} push(es))")
    return lines


def _peers_settled(sync: SyncView, accept: tuple[str, ...]) -> bool:
    """Every peer is in one of the ``accept`` states about this node's current version itself
    (not an earlier one of the same content: each peer link delivers the current version)."""
    for peer in sync.peers.values():
        if peer.state not in accept:
            return False
        if sync.current is not None and peer.target != sync.current:
            return False
    return True


def _print_json(code: int, verdict: Verdict, node: str | None, sync: SyncView | None) -> None:
    print(verdict.report(code, node, sync).to_json())


def _no_agent(problem: str, as_json: bool) -> int:
    if as_json:
        _print_json(EXIT_NOT_RUNNING, Verdict(False, (problem,)), None, None)
    else:
        print(problem, file=sys.stderr)
    return EXIT_NOT_RUNNING


def sync_status(cfg: Config, as_json: bool = False) -> int:
    read = read_status(cfg.agent.run_dir)
    if not read.agent_running or read.data is None:
        return _no_agent(read.problem, as_json)
    sync = read.data.sync
    node = read.data.agent.node
    verdict = judge(sync)
    code = EXIT_OK if verdict.ok else EXIT_FAILED
    if as_json:
        _print_json(code, verdict, node, sync)
    else:
        print("\n".join(sync_lines(sync)) or NOT_CONFIGURED)
    return code


def sync_now(cfg: Config, wait: float, as_json: bool = False) -> int:
    read = read_status(cfg.agent.run_dir)
    if not read.agent_running or read.data is None:
        return _no_agent(read.problem, as_json)
    node = read.data.agent.node
    if read.data.sync is None or read.data.sync.file is None:
        verdict = judge(read.data.sync)
        if as_json:
            _print_json(EXIT_FAILED, verdict, node, read.data.sync)
        else:
            print("; ".join(verdict.problems), file=sys.stderr)
        return EXIT_FAILED
    asked = time.time()
    flag = cfg.agent.state_dir / SYNC_NOW_FLAG
    flag.write_text(f"{asked}\n")
    deadline = time.monotonic() + wait
    while True:
        time.sleep(0.1)
        read = read_status(cfg.agent.run_dir)
        sync = (read.data.sync if read.data else None) or SyncView()
        local = sync.local or JobView(result="none")
        done = local.at >= asked and not flag.exists()
        if done and (local.result != "applied" or _peers_settled(sync, SETTLED)):
            break
        if time.monotonic() >= deadline or not read.agent_running:
            print(f"not settled within {wait:g} s:", file=sys.stderr)
            break
    verdict = judge(sync) if read.agent_running else Verdict(False, (read.problem,))
    if local.result != "applied" and verdict.ok:
        # Fine as it stands, but what was asked did not happen (changed again meanwhile).
        said = f"sync --now: {local.result}: {local.message}"
        verdict = Verdict(False, (said,), verdict.peers)
    code = EXIT_OK if verdict.ok else EXIT_FAILED
    if as_json:
        _print_json(code, verdict, node, sync)
    else:
        print("\n".join(sync_lines(sync, always_local=True)))
    return code
