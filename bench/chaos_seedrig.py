"""The chaos soak's baseline (``bench/chaos.py --baseline seed``): the same two-node lab and the
same fault schedule, but each node runs the seed's scripts (bench/seed/) instead of lbwatch:
what ops teams glue together and what lbwatch replaces.

On each node:
- ``check_lb.sh``, the cron job, every ``CRON_PERIOD`` seconds at the start of the period on
  the wall clock, as cron runs a ``* * * * *`` job (``cron.sh`` is cron's part): haproxy not
  running -> keepalived stopped; haproxy restarted (a new master PID) -> keepalived restarted;
  keepalived not running -> started; nothing while the operator's maintenance flag is there.
- keepalived with the lab's keepalived.conf for the instance (priorities, VRRP profile,
  ``vrrp_garp_master_refresh``, the transition hooks the observer reads), no lbwatch FIFO nor
  track file, and ``notify.sh`` as its notify script: a mail at each MASTER, to the lab's SMTP
  server.
- haproxy kept up as systemd's ``Restart=always`` keeps Debian's haproxy.service up
  (``haproxy_restart.sh``, the lab's stand-in for systemd, with its start limit).

How the faults apply (the schedule is the lbwatch run's, fault for fault):
- signals to haproxy and keepalived, the operator's haproxy restart and reload, sshd and SMTP
  down, VRRP cuts, a link flap, the pair's faults: as in the lbwatch run.
- lbwatch_kill: the classic equivalent, the seed's supervisor killed: kill -9 of the node's
  cron loop (``cron.sh``), started again at the heal (cron keeps its phase: the wall clock's).
- clock_step: none (nothing of the seed's keeps time but cron, and cron's handling of a step is
  not what the fault tests); the timeline says so.
- drain: the classic equivalent, the operator's maintenance flag (so that the cron job leaves
  the node alone) and `systemctl stop keepalived` (here: TERM through keepalived's pidfile);
  the undrain removes the flag and starts keepalived.
- edits: the file is written as in the lbwatch run; the seed has no config sync, so a valid edit
  stays on its node and is loaded at haproxy's next start there, an invalid one breaks that
  start (as it does under lbwatch, which will not start haproxy on it either). Convergence is
  not judged for the baseline.
- disk_full: the same tmpfs are filled; nothing of the seed's writes there.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar

import psutil

from bench.chaos_faults import SMTP_PORT, prepare_disks, signal_pids
from bench.chaos_observer import Observer
from bench.chaos_plan import Fault
from bench.chaos_procs import node_procs
from bench.chaos_rig import restart_haproxy, smtp, sshd
from tests.lab.netlab import BACKEND, HAPROXY_START, Lab, Node, keepalived_conf
from tests.util import wait_for

CRON_PERIOD = 60  # seconds: cron's minute
SCRIPTS = Path(__file__).resolve().parent / "seed"
ETC = "/etc/keepalived"  # where the node finds the scripts: root's, as keepalived's script
# security wants every directory up to a notify script
MAINTENANCE = "maintenance"  # in ETC: check_lb.sh's $MAINTENANCE


class SeedRig:
    """The seed's scripts on the bare lab, behind the soak's rig interface."""

    tier = "bare"
    supervisor = "seed"
    skipped: ClassVar[dict[str, str]] = {}  # the schedule is the lbwatch run's: nothing left out
    wedge_after = 0.0  # no agent: the watchdog figures do not apply

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.lab = Lab()
        self.maildir = Path()
        self.procs: dict[tuple[str, str], subprocess.Popen[bytes]] = {}  # (node, what) -> Popen

    def up(self) -> Path:
        self.lab.up()
        self.lab.enable_sync()  # sshd on each node, as on the lbwatch run's (the seed uses none)
        self.maildir = self.lab.start_smtp_sink(SMTP_PORT)
        return self.maildir

    def start(self, observer: Observer) -> None:
        for node in self.lab.nodes.values():
            prepare_disks(node, self.disks(node))
            node.write_configs(transitions_log=True, vrrp_profile=self.profile)
            etc = node.dir / "keepalived"
            for script in ("check_lb.sh", "notify.sh"):
                shutil.copy(SCRIPTS / script, etc / script)
                (etc / script).chmod(0o755)
            (etc / "keepalived.conf").write_text(
                keepalived_conf(
                    node.name,
                    "lbwatch",  # plain VRRP: the cron job does the tracking
                    notify=f"{ETC}/notify.sh smtp://{BACKEND}:{SMTP_PORT}",
                    transitions=f"{ETC}/transitions.sh",
                    profile=self.profile,
                )
            )
            node.start_haproxy_service()
            self._spawn(node, "haproxy.service", SCRIPTS / "haproxy_restart.sh",
                        str(self._log(node)), *HAPROXY_START)  # fmt: skip
        for node in self.lab.nodes.values():  # lb1 first: it is MASTER from the start
            node.start_keepalived()
            self._start_cron(node)
        lb1, lb2 = self.lab.nodes["lb1"], self.lab.nodes["lb2"]
        wait_for(lb1.has_vip, 30, what="lb1 to hold the VIP")
        wait_for(lambda: not lb2.has_vip(), 30, what="lb2 to hold no VIP")
        wait_for(lambda: self.lab.client_get() == (200, "lb1"), 20, what="HTTP 200 via lb1")

    def _log(self, node: Node) -> Path:
        return node.dir / "seed.log"

    def _spawn(self, node: Node, what: str, *argv: str | Path) -> None:
        with self._log(node).open("ab") as out:
            self.procs[(node.name, what)] = subprocess.Popen(
                node.enter("sh", *map(str, argv)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _start_cron(self, node: Node) -> None:
        self._spawn(node, "cron", SCRIPTS / "cron.sh", str(CRON_PERIOD), f"{ETC}/check_lb.sh",
                    str(self._log(node)))  # fmt: skip

    def _stop(self, node: Node, what: str) -> str:
        """kill -9 of the script ``what`` runs on ``node``: nsenter's child in the node, by PID."""
        proc = self.procs.pop((node.name, what), None)
        if proc is None:
            return f"no {what} running"
        pids = []
        with contextlib.suppress(psutil.Error):
            pids = [c.pid for c in psutil.Process(proc.pid).children()]
        killed = signal_pids(pids, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        return f"{what} SIGKILL {killed}"

    def mark_start(self) -> float:
        return 0.0

    def down(self) -> None:
        for node_name, what in list(self.procs):
            self._stop(self.lab.nodes[node_name], what)
        self.lab.down()

    def cfg_path(self, node: Node) -> Path:
        return node.dir / "haproxy" / "haproxy.cfg"

    def disks(self, node: Node) -> list[Path]:
        return [node.dir / "state" / "spool", node.dir / "staging"]

    def haproxy_reload(self, node: Node) -> str:
        """As `systemctl reload haproxy` does to the unit's master: USR2."""
        pids = signal_pids(node_procs(node).haproxy_masters(), signal.SIGUSR2)
        return f"SIGUSR2 haproxy master {pids}"

    def haproxy_restart(self, node: Node) -> str:
        return restart_haproxy(node)

    def agent_fault(self, f: Fault, node: Node) -> str:
        if f.kind == "lbwatch_kill":
            return f"the seed's supervisor killed: cron loop {self._stop(node, 'cron')}"
        return "none: the seed's scripts have no clock of their own to step"

    def agent_heal(self, f: Fault, node: Node) -> str:
        if f.kind == "lbwatch_kill":
            self._start_cron(node)
            return "cron loop started again (its phase: the wall clock's minute)"
        return "none"

    def drain(self, node: Node, on: bool) -> str:
        flag = node.dir / "keepalived" / MAINTENANCE
        if on:
            flag.write_text("drained by the operator\n")
            return f"drained: maintenance flag set, {self._stop_keepalived(node)}"
        with contextlib.suppress(FileNotFoundError):
            flag.unlink()
        try:
            node.start_keepalived()
        except RuntimeError as exc:
            return f"maintenance flag removed, keepalived start failed: {exc}"
        return "maintenance flag removed, keepalived started"

    def _stop_keepalived(self, node: Node) -> str:
        """`systemctl stop keepalived`: TERM to the pidfile's PID, its end awaited (10 s)."""
        try:
            pid = node.host_pid(int(node.read("/run/keepalived.pid").split()[0]))
        except (OSError, ValueError, IndexError, LookupError):
            return "keepalived was not running"
        signal_pids([pid], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while node_procs(node).keepalived_up() and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"keepalived stopped (TERM {pid})"

    def sshd(self, node: Node, up: bool) -> str:
        return sshd(node, up)

    def smtp(self, up: bool) -> str:
        return smtp(self.lab, up)

    def logs(self) -> dict[str, str]:
        return {
            n: self._log(node).read_text(errors="replace") if self._log(node).exists() else ""
            for n, node in self.lab.nodes.items()
        }
