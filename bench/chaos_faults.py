"""Injecting and healing the chaos soak's faults in the two-node lab, bare or systemd's.

Every fault is done the way it happens in production: signals to the daemons' own PIDs, an
operator's restart or reload of haproxy, sshd and the SMTP server gone, an operator's edit of
haproxy.cfg (written and renamed into place), VRRP multicast dropped on the lab's bridge while
unicast flows, a node's link down, lbwatch killed or its wall clock stepped, and the disk under
lbwatch's spool and staging directories full (each a small tmpfs of its own,
``prepare_disks``). What differs between the labs (how haproxy is restarted, how lbwatch is
killed and comes back, where the files are, what a drain is) is the rig's (bench/chaos_rig.py).

The pair's faults (``--overlap``): a BOTH fault is done on its node at injection and on the
other node at ``second`` (haproxy's master and workers frozen by SIGSTOP through the pidfile,
thawed on both nodes at the heal; haproxy's master or keepalived's parent killed); a drain is
the rig's (``lbwatch drain``, or the seed's scripts' equivalent) and its heal the undrain;
``vrrp_deaf`` turns multicast flooding off on the node's bridge port alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from bench.chaos_plan import BOTH, Fault
from bench.chaos_procs import node_procs
from tests.lab.netlab import Node, haproxy_cfg, sh

if TYPE_CHECKING:
    from bench.chaos_rig import Rig

SMTP_PORT = 2525
INVALID_MARK = "no-such-keyword-chaos"
FILL = ".chaos-fill"
AGENT_FAULTS = ("lbwatch_kill", "lbwatch_stop", "clock_step")  # lbwatch's own
BY_RIG = (*AGENT_FAULTS, "sshd_down", "smtp_down", "haproxy_restart", "haproxy_reload")
SIGNALS = (
    "haproxy_master_kill",
    "haproxy_worker_kill",
    "haproxy_master_stop",
    "keepalived_parent_kill",
    "keepalived_child_kill",
)
# A BOTH fault is, on each of its nodes, this single-node fault (the freeze stops the workers
# too: nothing of haproxy answers).
BOTH_AS = {
    "both_haproxy_kill": "haproxy_master_kill",
    "both_keepalived_kill": "keepalived_parent_kill",
}


def prepare_disks(node: Node, paths: list[Path]) -> None:
    """Before lbwatch starts: its spool and staging directory (``paths``) on a 1 MB tmpfs
    each, in the node's mount namespace, so that ``disk_full`` fills them and nothing else."""
    spool, staging = paths
    node.small_fs(spool, "1m", "0700")
    node.small_fs(staging, "1m", "0755")


def signal_pids(pids: list[int], sig: int) -> list[int]:
    """Signal each of ``pids`` (host PIDs of the lab's own processes); those signalled."""
    done = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            done.append(pid)
    return done


class Injector:
    """Does what a fault says; the lab's daemons are left to heal what they should heal."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.lab = rig.lab
        self.lock = threading.Lock()  # the observer reads `valid`/`invalid` while we write
        self.valid: list[tuple[float, str, str]] = []  # (wall time, node, content) of edits
        self.invalid: list[tuple[str, str]] = []  # (node, content) of invalid edits
        self._before: dict[int, str] = {}  # fault number -> config before an invalid edit
        self._edits = 0

    # -- helpers --------------------------------------------------------------------------------

    def _cfg_path(self, node: Node) -> Path:
        return self.rig.cfg_path(node)

    def _edit(self, node: Node, content: str, wall: float, valid: bool) -> None:
        # As an editor that writes a new file and renames it over the old one.
        path = self._cfg_path(node)
        tmp = path.with_name(".haproxy.cfg.chaos-tmp")
        tmp.write_text(content)
        with self.lock:
            if valid:
                self.valid.append((wall, node.name, content))
            else:
                self.invalid.append((node.name, content))
        os.rename(tmp, path)

    def _new_content(self, tag: str) -> str:
        self._edits += 1
        return haproxy_cfg(f"chaos-{self._edits}-{tag}")

    def _fill(self, node: Node) -> str:
        for path in self.rig.disks(node):
            # Fills the tmpfs; head fails when it is full, which is the point.
            node.run("sh", "-c", f"head -c 64M /dev/zero > {path / FILL} 2>/dev/null; true")
        free = [
            node.run("df", "-B1", "--output=avail", str(p)).split()[-1]
            for p in self.rig.disks(node)
        ]
        return f"spool and staging disks filled (bytes free: {', '.join(free)})"

    # -- faults ---------------------------------------------------------------------------------

    def _signal_fault(self, kind: str, node: Node) -> str:
        """Signal one of the node's daemons: a master, a worker, a parent or a child."""
        procs = node_procs(node)
        what, pids, sig = {
            "haproxy_master_kill": ("haproxy master", procs.haproxy_masters(), signal.SIGKILL),
            "haproxy_worker_kill": ("haproxy worker", procs.haproxy_workers()[:1], signal.SIGKILL),
            "haproxy_master_stop": ("haproxy master", procs.haproxy_masters(), signal.SIGSTOP),
            "keepalived_parent_kill": (
                "keepalived parent",
                procs.keepalived_parents(),
                signal.SIGKILL,
            ),
            "keepalived_child_kill": (
                "keepalived child",
                procs.keepalived_children()[:1],
                signal.SIGKILL,
            ),
        }[kind]
        return f"{signal.Signals(sig).name} {what} {signal_pids(pids, sig)}"

    def _freeze(self, node: Node) -> str:
        """haproxy's master and its workers SIGSTOPped, by the pidfile's PID and its children."""
        try:
            pids = node.signal_haproxy(signal.SIGSTOP)
        except LookupError:
            return f"{node.name}: no haproxy master to freeze"
        return f"{node.name}: SIGSTOP haproxy master and workers {pids}"

    def _thaw(self, node: Node) -> str:
        # Every stopped haproxy of the node: a master started meanwhile included.
        stopped = node_procs(node).stopped("haproxy")
        return f"SIGCONT haproxy {signal_pids(stopped, signal.SIGCONT)}"

    def _both(self, f: Fault, node: Node) -> str:
        if f.kind == "both_haproxy_stop":
            return self._freeze(node)
        return f"{node.name}: {self._signal_fault(BOTH_AS[f.kind], node)}"

    def _deaf(self, node: str, deaf: bool) -> str:
        # As Lab.set_vrrp, for one port: the node hears no VRRP, and still sends its own.
        sh("bridge", "-n", self.lab.ns("sw"), "link", "set", "dev", f"p-{node}",
           "mcast_flood", "off" if deaf else "on")  # fmt: skip
        return f"multicast flooding {'off' if deaf else 'on again'} on p-{node}"

    def _heal_pair(self, f: Fault) -> str:
        if f.kind == "both_haproxy_stop":
            return ", ".join(f"{n.name}: {self._thaw(n)}" for n in self.lab.nodes.values())
        if f.kind == "drain":
            return self.rig.drain(self.lab.nodes[f.node], on=False)
        return self._deaf(f.node, deaf=False)

    def second(self, f: Fault) -> str:
        """A BOTH fault on its second node."""
        return self._both(f, self.lab.nodes[f.other])

    def _by_rig(self, f: Fault, node: Node | None) -> str:
        """The faults each lab does its own way (systemctl under systemd)."""
        if f.kind == "smtp_down":
            return self.rig.smtp(up=False)
        assert node
        if f.kind in AGENT_FAULTS:
            return self.rig.agent_fault(f, node)
        if f.kind == "sshd_down":
            return self.rig.sshd(node, up=False)
        if f.kind == "haproxy_restart":
            return self.rig.haproxy_restart(node)
        return self.rig.haproxy_reload(node)

    def inject(self, f: Fault, wall: float) -> str:
        """Inject ``f`` at wall time ``wall``; a one-line detail for the timeline."""
        node = self.lab.nodes[f.node] if f.node else None
        if f.kind in SIGNALS:
            assert node
            return self._signal_fault(f.kind, node)
        if f.kind in BY_RIG:
            return self._by_rig(f, node)
        if f.kind in BOTH:
            assert node
            return self._both(f, node)
        if f.kind == "drain":
            assert node
            return self.rig.drain(node, on=True)
        if f.kind == "vrrp_deaf":
            return self._deaf(f.node, deaf=True)
        if f.kind == "disk_full":
            assert node
            return self._fill(node)
        if f.kind == "edit_valid":
            assert node
            self._edit(node, self._new_content(node.name), wall, True)
            return f"valid edit of haproxy.cfg ({self._edits})"
        if f.kind == "edit_invalid":
            assert node
            self._before[f.n] = self._cfg_path(node).read_text()
            bad = self._new_content(node.name).replace(
                "global\n", f"global\n    {INVALID_MARK}-{self._edits}\n", 1
            )
            self._edit(node, bad, wall, False)
            return f"invalid edit of haproxy.cfg ({self._edits})"
        if f.kind == "edit_both":
            a, b = self.lab.nodes["lb1"], self.lab.nodes["lb2"]
            ca, cb = self._new_content("lb1"), self._new_content("lb2")
            self._edit(a, ca, wall, True)
            self._edit(b, cb, wall, True)
            return f"valid edits on both nodes ({self._edits - 1}, {self._edits})"
        if f.kind == "vrrp_cut":
            self.lab.set_vrrp(False)
            return "multicast flooding off on p-lb1 and p-lb2"
        if f.kind == "link_flap":
            assert node
            self.lab.ip(node.name, "link", "set", "eth0", "down")
            return "eth0 down"
        raise ValueError(f"unknown fault kind {f.kind}")

    def heal(self, f: Fault, wall: float) -> str:
        """Undo what ``inject`` did (for the faults that have a heal)."""
        node = self.lab.nodes[f.node] if f.node else None
        if f.kind == "haproxy_master_stop":
            assert node
            return self._thaw(node)  # a master lbwatch replaced meanwhile included
        if f.kind in ("both_haproxy_stop", "drain", "vrrp_deaf"):
            return self._heal_pair(f)
        if f.kind in AGENT_FAULTS:
            assert node
            return self.rig.agent_heal(f, node)
        if f.kind == "disk_full":
            assert node
            for path in self.rig.disks(node):
                node.run("rm", "-f", str(path / FILL))
            return "fill files removed"
        if f.kind == "sshd_down":
            assert node
            return self.rig.sshd(node, up=True)
        if f.kind == "smtp_down":
            return self.rig.smtp(up=True)
        if f.kind == "edit_invalid":
            assert node
            self._edit(node, self._before.pop(f.n), wall, True)
            return "invalid edit reverted to the file before it"
        if f.kind == "vrrp_cut":
            self.lab.set_vrrp(True)
            return "multicast flooding on again"
        if f.kind == "link_flap":
            assert node
            self.lab.ip(node.name, "link", "set", "eth0", "up")
            return "eth0 up"
        return ""
