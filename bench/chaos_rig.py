"""What the chaos soak needs of a lab, behind one narrow interface: the bare lab (``BareRig``:
lbwatch, haproxy and keepalived started by the harness and by lbwatch's configured commands)
or the systemd tier (``bench.chaos_sysrig.SysRig``: each node booted by systemd, lbwatch from
its package under the shipped unit). The schedule, the injector's faults that are the same on
both (signals to the daemons, edits, network cuts, a full disk, SMTP down), the observer and the
report are shared; a rig does what differs: boot, the operator's haproxy restart and reload,
lbwatch's own faults, an operator's drain, sshd, where the files are, how the agent's liveness
is seen. ``bench.chaos_seedrig.SeedRig`` runs the seed's scripts instead of lbwatch, on the same
schedule (``--baseline seed``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar, Protocol

from bench.chaos_faults import SMTP_PORT, prepare_disks, signal_pids
from bench.chaos_observer import Observer, watchdog_env
from bench.chaos_plan import Fault
from bench.chaos_procs import node_procs
from tests.lab.netlab import Lab, Node, notify_toml
from tests.util import wait_for

# every transition mailed one by one: no digest hides one
NOTIFY = notify_toml(SMTP_PORT, notify="flap_max = 100000\n")
WEDGE = 2.0  # the bare lab's agent pings the observer's watchdog socket every second


class Rig(Protocol):
    @property
    def lab(self) -> Lab: ...

    @property
    def tier(self) -> str:
        """ "bare" | "systemd": said in the report."""

    @property
    def skipped(self) -> dict[str, str]:
        """Fault kind -> why it does not apply here."""

    @property
    def supervisor(self) -> str:
        """ "lbwatch" | "seed": who supervises haproxy and keepalived on the nodes."""

    @property
    def wedge_after(self) -> float:
        """Seconds without a watchdog ping that make an agent wedged."""

    def up(self) -> Path:
        """Boot the lab; the mail directory."""

    def start(self, observer: Observer) -> None:
        """Both agents running, every daemon up, lb1 holding the VIP (the observer exists
        first: the bare lab's agents ping its socket)."""

    def mark_start(self) -> float:
        """The soak begins now: what came before is not judged. The wall time from which
        accepted mail counts (0: all of it)."""

    def down(self) -> None: ...

    def cfg_path(self, node: Node) -> Path:
        """haproxy.cfg as the host reads and writes it."""

    def disks(self, node: Node) -> list[Path]:
        """The spool and staging directories on small disks of their own (paths in the node)."""

    def haproxy_reload(self, node: Node) -> str: ...

    def haproxy_restart(self, node: Node) -> str: ...

    def agent_fault(self, f: Fault, node: Node) -> str:
        """Inject lbwatch_kill, lbwatch_stop or clock_step."""

    def agent_heal(self, f: Fault, node: Node) -> str: ...

    def sshd(self, node: Node, up: bool) -> str: ...

    def smtp(self, up: bool) -> str: ...

    def drain(self, node: Node, on: bool) -> str:
        """An operator's drain of ``node`` (``on``) or its undrain. The detail starts with
        the outcome: "drained: ", "refused: " (the expected answer when no peer can take the
        VIP over) or "failed: " (bench.chaos_pair.drain_outcome); an undrain's is said as is."""

    def logs(self) -> dict[str, str]:
        """Each node's lbwatch log (tracebacks are counted in it)."""


class BareRig:
    """The bare lab: lbwatch started by the harness with the observer's socket as its systemd
    watchdog, haproxy and keepalived by lbwatch's configured commands."""

    tier = "bare"
    supervisor = "lbwatch"
    skipped: ClassVar[dict[str, str]] = {}  # every kind applies
    wedge_after = WEDGE

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.lab = Lab()
        self.maildir = Path()

    def up(self) -> Path:
        self.lab.up()
        self.lab.enable_sync()
        self.maildir = self.lab.start_smtp_sink(SMTP_PORT)
        return self.maildir

    def start(self, observer: Observer) -> None:
        for node in self.lab.nodes.values():
            prepare_disks(node, self.disks(node))
            node.write_configs(
                keepalived_notify="fifo",
                lbwatch_extra=NOTIFY,
                sync=True,
                transitions_log=True,
                vrrp_profile=self.profile,
            )
            self._start_agent(node, 0.0)
        lb1, lb2 = self.lab.nodes["lb1"], self.lab.nodes["lb2"]
        wait_for(lambda: services_up(lb1) and services_up(lb2), 30, what="both nodes up")
        wait_for(lb1.has_vip, 30, what="lb1 to hold the VIP")
        wait_for(lambda: self.lab.client_get() == (200, "lb1"), 20, what="HTTP 200 via lb1")

    def mark_start(self) -> float:
        return 0.0  # the agents ran from the first transition on: everything is judged

    def down(self) -> None:
        self.lab.down()

    def cfg_path(self, node: Node) -> Path:
        return node.dir / "haproxy" / "haproxy.cfg"

    def disks(self, node: Node) -> list[Path]:
        # lbwatch's notify spool and config sync's staging directory (the lab's defaults)
        return [node.dir / "state" / "spool", node.dir / "staging"]

    def _start_agent(self, node: Node, offset: float) -> None:
        env = watchdog_env(node)
        if offset:
            env["LBWATCH_TEST_WALL_OFFSET"] = str(offset)
        node.start_lbwatch(env=env)

    def haproxy_reload(self, node: Node) -> str:
        """As `systemctl reload haproxy` does to the unit's master: USR2."""
        pids = signal_pids(node_procs(node).haproxy_masters(), signal.SIGUSR2)
        return f"SIGUSR2 haproxy master {pids}"

    def haproxy_restart(self, node: Node) -> str:
        return restart_haproxy(node)

    def agent_fault(self, f: Fault, node: Node) -> str:
        sig = signal.SIGKILL if f.kind == "lbwatch_kill" else signal.SIGTERM
        code = node.stop_lbwatch(sig)
        if f.kind == "clock_step":
            # A wall-clock step seen by lbwatch: its test-only offset, set by restarting it.
            self._start_agent(node, f.arg)
            return f"lbwatch stopped (exit {code}), started with wall clock {f.arg:+.0f} s"
        return f"lbwatch SIGKILL (exit {code})"

    def agent_heal(self, f: Fault, node: Node) -> str:
        if f.kind == "lbwatch_kill":
            self._start_agent(node, 0.0)
            return "lbwatch started"
        code = node.stop_lbwatch(signal.SIGTERM)
        self._start_agent(node, 0.0)
        return f"lbwatch stopped (exit {code}), started with the true wall clock"

    def drain(self, node: Node, on: bool) -> str:
        """`lbwatch drain` / `lbwatch undrain`, plain (no --force, no --wait), as an operator
        types them on the node."""
        return lbwatch_drain(node, on)

    def sshd(self, node: Node, up: bool) -> str:
        return sshd(node, up)

    def smtp(self, up: bool) -> str:
        return smtp(self.lab, up)

    def logs(self) -> dict[str, str]:
        return {n: node.log_text() for n, node in self.lab.nodes.items()}


def lbwatch_drain(node: Node, on: bool) -> str:
    """Run `lbwatch drain` or `undrain` in ``node``; its outcome and what it said, one line."""
    verb = "drain" if on else "undrain"
    argv = [sys.executable, "-m", "lbwatch", "--config", str(node.dir / "lbwatch.toml"), verb]
    try:
        done = subprocess.run(
            node.enter(*argv),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"failed: lbwatch {verb} still running after 30 s"
    said = " ".join((done.stdout + done.stderr).split())
    if not on:
        return f"lbwatch undrain exit {done.returncode}: {said}"
    if done.returncode == 0:
        return f"drained: lbwatch drain said {said!r}"
    if said.startswith("refused:"):
        return f"refused: lbwatch drain said {said!r}"
    return f"failed: lbwatch drain exit {done.returncode}: {said!r}"


def services_up(node: Node) -> bool:
    doc = node.status()
    return doc is not None and doc.ready and all(v.running for v in doc.services.values())


def restart_haproxy(node: Node) -> str:
    """An operator's restart of haproxy in the bare lab, as `systemctl restart haproxy` does
    it: TERM to the master, its end awaited (KILL after 5 s, as the unit's stop timeout
    would), then a new one started."""
    masters = node_procs(node).haproxy_masters()
    signal_pids(masters, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while set(node_procs(node).haproxy_masters()) & set(masters):
        if time.monotonic() > deadline:
            signal_pids(masters, signal.SIGKILL)
            break
        time.sleep(0.01)
    node.start_haproxy_service()  # idempotent, as `systemctl start` is
    new = node_procs(node).haproxy_masters()
    return f"haproxy restarted: TERM master {masters}, new master {new}"


def sshd(node: Node, up: bool) -> str:
    """The lab node's sshd started or killed (the bare lab's rigs alike)."""
    if up:
        node.start_sshd()
        return "sshd started"
    node.stop_sshd()
    return "sshd killed"


def smtp(lab: Lab, up: bool) -> str:
    """The lab's SMTP server started or killed."""
    if up:
        lab.start_smtp_sink(SMTP_PORT)
        return "SMTP server started"
    lab.stop_smtp_sink()
    return "SMTP server killed"
