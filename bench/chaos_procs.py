"""A lab node's haproxy and keepalived as /proc shows them, read directly (no psutil) so the
observer can look every 50 ms: PID, parent, state (R/S/T/Z...) and name of each process in the
node's PID namespace."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tests.lab.netlab import Node


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # /proc/PID/stat's: "Z" zombie, "T" stopped
    name: str
    # `haproxy -c` (a config check), or a haproxy whose command line is gone (it is exiting:
    # the check ExecReload= runs is, for a moment, a PID 1 child without one): never a daemon
    check: bool = False


@dataclass(frozen=True)
class NodeProcs:
    procs: tuple[Proc, ...]
    init: int  # host PID of the node's PID 1: daemons (haproxy -D, keepalived) are its children

    def named(self, name: str) -> list[Proc]:
        return [p for p in self.procs if p.name == name]

    def _masters(self, name: str) -> list[Proc]:
        # Not `haproxy -c` run by lbwatch to check a config (lbwatch's child), nor the one
        # haproxy.service's ExecReload= runs (PID 1's child, like the master), nor one exiting.
        return [
            p for p in self.named(name) if p.ppid == self.init and p.state != "Z" and not p.check
        ]

    def haproxy_masters(self) -> list[int]:
        """Live (not zombie) daemonized haproxy processes: the master."""
        return [p.pid for p in self._masters("haproxy")]

    def haproxy_master_state(self) -> str:
        """ "" none alive, else the state of the (first) master: "T" when stopped."""
        masters = self._masters("haproxy")
        return masters[0].state if masters else ""

    def haproxy_workers(self) -> list[int]:
        masters = set(self.haproxy_masters())
        return [p.pid for p in self.named("haproxy") if p.ppid in masters and p.state != "Z"]

    def keepalived_parents(self) -> list[int]:
        return [p.pid for p in self._masters("keepalived")]

    def keepalived_children(self) -> list[int]:
        parents = set(self.keepalived_parents())
        return [p.pid for p in self.named("keepalived") if p.ppid in parents and p.state != "Z"]

    def keepalived_up(self) -> bool:
        """Any keepalived process alive: while one is, it may hold or claim the VIP."""
        return any(p.state != "Z" for p in self.named("keepalived"))

    def stopped(self, name: str) -> list[int]:
        return [p.pid for p in self.named(name) if p.state == "T"]


def _stat(pid: str) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces: split after the last ")".
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    check = False
    if name == "haproxy":
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            check = b"-c" in argv or argv == [b""]
        except OSError:
            return None
    return Proc(int(pid), int(rest[1]), rest[0], name, check)


def scan(
    nodes: list[Node], names: tuple[str, ...] = ("haproxy", "keepalived")
) -> dict[str, NodeProcs]:
    """One pass over /proc for all ``nodes``: their processes called one of ``names``."""
    ns_of: dict[str, str] = {}
    init = {n.name: n.init_pid for n in nodes}
    for node in nodes:
        try:
            ns_of[os.readlink(f"/proc/{node.init_pid}/ns/pid")] = node.name
        except OSError:
            continue
    found: dict[str, list[Proc]] = {n.name: [] for n in nodes}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm not in names:
            continue
        try:
            node = ns_of.get(os.readlink(f"/proc/{pid}/ns/pid"))
        except OSError:
            continue
        if node is None:
            continue
        proc = _stat(pid)
        if proc is not None:
            found[node].append(proc)
    return {k: NodeProcs(tuple(v), init[k]) for k, v in found.items()}


def node_procs(node: Node) -> NodeProcs:
    return scan([node])[node.name]
