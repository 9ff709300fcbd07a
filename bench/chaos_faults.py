"""Injecting and healing the chaos soak's faults in the real two-node lab.

Every fault is done the way it happens in production: signals to the daemons' own PIDs, an
operator's restart or reload of haproxy (what `systemctl restart` and `systemctl reload` do to
haproxy's unit: TERM to the master and a new one started, USR2 to the master), sshd and the
SMTP server gone, an operator's edit of haproxy.cfg (written and renamed into place), VRRP
multicast dropped on the lab's bridge while unicast flows, a node's link down, a wall-clock step
seen by lbwatch (its test-only offset, set by restarting it), and the disk under lbwatch's spool
and staging directories full (each a small tmpfs of its own, ``prepare_disks``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from bench.chaos_plan import Fault
from bench.chaos_procs import node_procs
from tests.lab.netlab import Lab, Node, haproxy_cfg

SMTP_PORT = 2525
INVALID_MARK = "no-such-keyword-chaos"
FILL = ".chaos-fill"
SIGNALS = (
    "haproxy_reload",
    "haproxy_master_kill",
    "haproxy_worker_kill",
    "haproxy_master_stop",
    "keepalived_parent_kill",
    "keepalived_child_kill",
)


def disks(node: Node) -> list[Path]:
    """The directories ``prepare_disks`` puts on small disks of their own: lbwatch's notify
    spool and config sync's staging directory (the lab's defaults)."""
    return [node.dir / "state" / "spool", node.dir / "staging"]


def prepare_disks(node: Node) -> None:
    """Before lbwatch starts: the spool and the staging directory on a 1 MB tmpfs each, in
    the node's mount namespace, so that ``disk_full`` fills them and nothing else."""
    spool, staging = disks(node)
    node.small_fs(spool, "1m", "0700")
    node.small_fs(staging, "1m", "0755")


def _signal(pids: list[int], sig: int) -> list[int]:
    """``sig`` to each of ``pids`` (the lab's own daemons); those still there to take it."""
    done = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            done.append(pid)
    return done


def restart_haproxy(node: Node) -> str:
    """An operator's restart of haproxy in the bare lab, as `systemctl restart haproxy` does
    it: TERM to the master, its end awaited (KILL after 5 s, as the unit's stop timeout
    would), then a new one started."""
    masters = node_procs(node).haproxy_masters()
    _signal(masters, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while set(node_procs(node).haproxy_masters()) & set(masters):
        if time.monotonic() > deadline:
            _signal(masters, signal.SIGKILL)
            break
        time.sleep(0.01)
    node.start_haproxy_service()  # idempotent, as `systemctl start` is
    new = node_procs(node).haproxy_masters()
    return f"haproxy restarted: TERM master {masters}, new master {new}"


class Injector:
    """Does what a fault says; the lab's daemons are left to heal what they should heal."""

    def __init__(self, lab: Lab, start_agent: Callable[[Node, float], None]) -> None:
        self.lab = lab
        self.start_agent = start_agent  # (node, wall-clock offset) -> lbwatch started
        self.lock = threading.Lock()  # the observer reads `valid`/`invalid` while we write
        self.valid: list[tuple[float, str, str]] = []  # (wall time, node, content) of edits
        self.invalid: list[tuple[str, str]] = []  # (node, content) of invalid edits
        self._before: dict[int, str] = {}  # fault number -> config before an invalid edit
        self._edits = 0

    # -- helpers --------------------------------------------------------------------------------

    def _cfg_path(self, node: Node) -> Path:
        return node.dir / "haproxy" / "haproxy.cfg"

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

    def _stop_agent(self, f: Fault, node: Node) -> str:
        sig = signal.SIGKILL if f.kind == "lbwatch_kill" else signal.SIGTERM
        code = node.stop_lbwatch(sig)
        if f.kind == "clock_step":
            self.start_agent(node, f.arg)
            return f"lbwatch stopped (exit {code}), started with wall clock {f.arg:+.0f} s"
        return f"lbwatch SIGKILL (exit {code})"

    def _fill(self, node: Node) -> str:
        for path in disks(node):
            # Fills the tmpfs; head fails when it is full, which is the point.
            node.run("sh", "-c", f"head -c 64M /dev/zero > {path / FILL} 2>/dev/null; true")
        free = [node.run("df", "-B1", "--output=avail", str(p)).split()[-1] for p in disks(node)]
        return f"spool and staging disks filled (bytes free: {', '.join(free)})"

    # -- faults ---------------------------------------------------------------------------------

    def _signal_fault(self, kind: str, node: Node) -> str:
        """Signal one of the node's daemons: a master, a worker, a parent or a child."""
        procs = node_procs(node)
        what, pids, sig = {
            "haproxy_master_kill": ("haproxy master", procs.haproxy_masters(), signal.SIGKILL),
            "haproxy_worker_kill": ("haproxy worker", procs.haproxy_workers()[:1], signal.SIGKILL),
            "haproxy_master_stop": ("haproxy master", procs.haproxy_masters(), signal.SIGSTOP),
            "haproxy_reload": ("haproxy master", procs.haproxy_masters(), signal.SIGUSR2),
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
        return f"{signal.Signals(sig).name} {what} {_signal(pids, sig)}"

    def inject(self, f: Fault, wall: float) -> str:
        """Inject ``f`` at wall time ``wall``; a one-line detail for the timeline."""
        node = self.lab.nodes[f.node] if f.node else None
        if f.kind in SIGNALS:
            assert node
            return self._signal_fault(f.kind, node)
        if f.kind in ("lbwatch_kill", "clock_step"):
            assert node
            return self._stop_agent(f, node)
        if f.kind == "haproxy_restart":
            assert node
            return restart_haproxy(node)
        if f.kind == "disk_full":
            assert node
            return self._fill(node)
        if f.kind == "sshd_down":
            assert node
            node.stop_sshd()
            return "sshd killed"
        if f.kind == "smtp_down":
            self.lab.stop_smtp_sink()
            return "SMTP server killed"
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
            # Every stopped haproxy of the node: a master lbwatch replaced meanwhile included.
            stopped = node_procs(node).stopped("haproxy")
            return f"SIGCONT haproxy {_signal(stopped, signal.SIGCONT)}"
        if f.kind == "lbwatch_kill":
            assert node
            self.start_agent(node, 0.0)
            return "lbwatch started"
        if f.kind == "clock_step":
            assert node
            code = node.stop_lbwatch(signal.SIGTERM)
            self.start_agent(node, 0.0)
            return f"lbwatch stopped (exit {code}), started with the true wall clock"
        if f.kind == "disk_full":
            assert node
            for path in disks(node):
                node.run("rm", "-f", str(path / FILL))
            return "fill files removed"
        if f.kind == "sshd_down":
            assert node
            node.start_sshd()
            return "sshd started"
        if f.kind == "smtp_down":
            self.lab.start_smtp_sink(SMTP_PORT)
            return "SMTP server started"
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
