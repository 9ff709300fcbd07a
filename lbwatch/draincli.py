"""``lbwatch drain [--wait] [--force] [INSTANCE...]`` and ``lbwatch undrain [--wait]``: the
operator's request to move this node's VRRP instances to its peers without stopping keepalived
or haproxy (haproxy goes on serving what still reaches it; the node stays a healthy BACKUP),
and to take them back. The flag is written here (``drain``); the agent applies it through
keepalived's track files (``trackfile``) and the status says when it has.

Refused, with one line and exit 1, when a peer cannot be shown able to take each instance over
(from the peers' views in the agent's status: serving, keepalived running, that instance
BACKUP or MASTER there, not paused, not drained), when keepalived.conf does not track lbwatch's
file for an instance, while paused, or while the agent does not respond (its heartbeat stale:
its status shows the peers as they were): unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
import time

from lbwatch import drain, handover, heartbeat, kaconf, pstat, trackfile
from lbwatch.cluster import facts
from lbwatch.config import Config
from lbwatch.events import InstanceFacts, PeerFacts
from lbwatch.status import read_status
from lbwatch.statusdoc import StatusDoc

EXIT_OK, EXIT_FAILED = 0, 1
CONFIRM = 5.0  # seconds the agent has to apply the flag to the track files


def main(cfg: Config, args: argparse.Namespace) -> int:
    read = read_status(cfg.agent.run_dir)
    doc = read.data if read.agent_running else None
    if args.verb == "undrain":
        return _undrain(cfg, doc, args)
    if doc is None and not args.force:
        return _refuse("the agent is not running, so the peers cannot be asked; --force drains")
    mine = facts.instances(doc.vrrp, doc.keepalived_conf) if doc is not None else ()
    names = sorted(set(args.instances)) or [i.name for i in mine]
    unknown = [n for n in names if n not in {i.name for i in mine}]
    if doc is not None and (unknown or not names):
        what = ", ".join(unknown) or "any VRRP instance"
        return _refuse(f"this node does not know {what} (lbwatch status shows its instances)")
    if not args.force:
        problem = _problem(cfg, doc, [i for i in mine if i.name in names])
        if problem:
            return _refuse(f"{problem}; --force drains anyway")
    try:
        drain.write(cfg.agent.state_dir, list(args.instances), args.reason)
    except OSError as exc:
        return _refuse(f"cannot write the drain flag under {cfg.agent.state_dir}: {exc.strerror}")
    if doc is None:
        print("drained; the agent is not running and applies it when it starts")
        return EXIT_OK
    return _confirm(cfg, names, args, drained=True)


def _problem(cfg: Config, doc: StatusDoc | None, mine: list[InstanceFacts]) -> str:
    """Why the drain would not be safe, or ""."""
    assert doc is not None
    silent = heartbeat.silent_for(
        str(cfg.agent.run_dir / heartbeat.FILE),
        doc.agent.pid,
        doc.agent.start_ticks,
        pstat.since_boot(),
    )
    watched = doc.cluster is not None and bool(doc.cluster.peers)  # renewed by the watch
    if watched and silent > heartbeat.STALE_AFTER:
        # Its process exists, its loop does not turn (SIGSTOP, a hang): the status shows the
        # peers as they were, and the peers themselves hear this node's view as not current.
        return "the agent is not responding, so its view of the peers may be old"
    if doc.paused:
        return "lbwatch is paused and would not apply it: resume first (or drain, then pause)"
    try:
        conf = kaconf.read(cfg.keepalived.config)
    except (OSError, kaconf.ConfError) as exc:
        return f"cannot read {cfg.keepalived.config}: {exc}"
    for inst in mine:
        lever = trackfile.lever(conf, inst.name, cfg.keepalived.track_dir)
        if lever:
            return f"{lever} (lbwatch doctor shows what to add)"
        if not takers(doc, inst):
            return f"no peer can take {inst.name} over ({_why_not(doc, inst)})"
    return ""


def takers(doc: StatusDoc, inst: InstanceFacts) -> list[str]:
    """The peers whose current view shows them able to take ``inst`` over: serving,
    keepalived running, not paused or drained, the instance BACKUP or MASTER there."""
    out = []
    cluster = doc.cluster
    for name, node in sorted((cluster.peers if cluster is not None else {}).items()):
        if node.state != "up" or node.view is None:
            continue
        peer = facts.peer(name, node.view, 0.0)
        theirs = handover.match(peer, inst)
        if _cannot(peer, inst) or theirs is None:
            continue
        if theirs.state in ("BACKUP", "MASTER"):
            out.append(name)
    return out


def _cannot(peer: PeerFacts, inst: InstanceFacts) -> str:
    """Why ``peer`` cannot take ``inst`` over from a drain: what keeps it from taking it at
    all (``handover.unable``), or its own drain (two drained nodes: the VIP goes by address)."""
    why = handover.unable(peer, inst)
    theirs = handover.match(peer, inst)
    if not why and theirs is not None and theirs.name in peer.drained:
        why = f"{theirs.name} drained"
    return why


def _why_not(doc: StatusDoc, inst: InstanceFacts) -> str:
    cluster = doc.cluster
    if cluster is None or not cluster.peers:
        return "no peers are watched: [sync] peers and [cluster] watch"
    said = []
    for name, node in sorted(cluster.peers.items()):
        if node.state != "up" or node.view is None:
            said.append(f"{name}: {node.state}")
            continue
        peer = facts.peer(name, node.view, 0.0)
        theirs = handover.match(peer, inst)
        why = _cannot(peer, inst) or (
            f"{inst.name} {theirs.state} there" if theirs is not None else "reports no VRRP state"
        )
        said.append(f"{name}: {why}")
    return ", ".join(said)


def _undrain(cfg: Config, doc: StatusDoc | None, args: argparse.Namespace) -> int:
    try:
        drain.clear(cfg.agent.state_dir)
    except OSError as exc:
        return _refuse(f"cannot clear the drain flag under {cfg.agent.state_dir}: {exc.strerror}")
    if doc is None:
        print("undrained; the agent is not running and applies it when it starts")
        return EXIT_OK
    names = [n for n, v in doc.track.items() if v == trackfile.DRAINED]
    return _confirm(cfg, names, args, drained=False)


def _confirm(cfg: Config, names: list[str], args: argparse.Namespace, drained: bool) -> int:
    """Wait for the agent to have written the track files; with --wait, for the VIPs too: gone
    from this node (drain) or keepalived's choice made (undrain: the instance out of FAULT)."""
    word = "drained" if drained else "undrained"
    want = trackfile.DRAINED if drained else trackfile.OK
    deadline = time.monotonic() + CONFIRM
    while True:
        doc = read_status(cfg.agent.run_dir).data
        if doc is not None and all((doc.track.get(n) or 0) == want for n in names):
            break
        if time.monotonic() >= deadline:
            print(f"flag written, but the agent has not applied it within {CONFIRM:g} s",
                  file=sys.stderr)  # fmt: skip
            return EXIT_FAILED
        time.sleep(0.05)
    if not (args.wait and drained):
        print(f"{word}: {', '.join(names) or 'nothing to change'}")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while True:
        doc = read_status(cfg.agent.run_dir).data
        held = [n for n in names if doc is None or _holds(doc, n)]
        if not held:
            print(f"{word}: {', '.join(names)} now served by the peers")
            return EXIT_OK
        if time.monotonic() >= deadline:
            print(f"{word}, but this node still holds {', '.join(held)} after {args.timeout:g} s",
                  file=sys.stderr)  # fmt: skip
            return EXIT_FAILED
        time.sleep(0.05)


def _holds(doc: StatusDoc, name: str) -> bool:
    v = doc.vrrp.get(name)
    return v is not None and (bool(v.held) or v.state == "MASTER")


def _refuse(line: str) -> int:
    print(f"refused: {line}", file=sys.stderr)
    return EXIT_FAILED
