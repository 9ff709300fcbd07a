"""The chaos soak on the systemd tier (``bench/chaos.py --systemd``): tests/lab/syslab.py's
nodes, each booted by systemd, Debian's haproxy.service (Restart=always) and keepalived.service,
lbwatch from its package under the shipped unit (Restart=always, RestartSec=2s,
WatchdogSec=10s), mail with AUTH to the lab's SMTP server. keepalived runs the example's pair
(VI_1 MASTER on lb1, VI_2 on lb2); the observer and the VIP figures follow VI_1, the mail check
both instances.

How each fault kind applies here:
- haproxy master kill -9 / SIGSTOP, worker kill, keepalived parent or child kill: the same
  signals to the same processes (host PIDs of the container's); systemd restarts haproxy
  (Restart=always), lbwatch keepalived (its unit has no Restart=).
- haproxy_restart, haproxy_reload: the operator's `systemctl restart haproxy` and
  `systemctl reload haproxy` in the node (ExecReload= checks the file, then USR2).
- lbwatch_kill: kill -9 of the unit's main process; systemd starts it again (Restart=always,
  RestartSec=2s). The heal starts nothing: it waits (bounded) for the new main process to be
  active, so the fault's end is the agent's return as in the bare lab.
- lbwatch_stop (here only): SIGSTOP of the main process; systemd's watchdog (WatchdogSec=10s)
  ends it (SIGABRT, then SIGCONT) and Restart= brings it back; the heal only waits for that.
- sshd_down: `systemctl stop ssh` / `systemctl start ssh`. Debian's ssh.service has
  KillMode=process: sessions already open (a peer's kept sync connection) live on, as on a
  real node; only new connections are refused.
- smtp_down, edits (valid, invalid, both nodes), vrrp_cut, link_flap: as in the bare lab; the
  edits go to /etc/haproxy/haproxy.cfg through the node's tree, written and renamed.
- disk_full: a 1 MB tmpfs over /var/lib/lbwatch/spool and /var/lib/lbwatch/incoming (the
  defaults) mounted in the container's mount namespace after the install, then lbwatch
  restarted so that its own namespace (PrivateMounts=yes) is made with them.

The installed config is the systemd tier's (config/lbwatch.toml with node values) and one change
the bare soak makes too: [notify] flap_max = 100000, so that each transition is mailed alone.
- clock_step: not injected. The bare lab steps lbwatch's wall clock alone through a test-only
  environment offset; here that would mean a drop-in adding a test hook to the shipped unit
  (not lbwatch as users run it), and the real clock is the host's (a container has no clock
  of its own: CLOCK_REALTIME is not namespaced), shared with every other lab on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from bench.chaos_faults import prepare_disks
from bench.chaos_observer import Observer
from bench.chaos_plan import PAIR_KINDS, Fault
from tests.lab.netlab import Node
from tests.lab.syslab import SMTP_PASSWORD, SMTP_PORT, SMTP_USER, SysLab, SysNode, set_key
from tests.systemd.conftest import fresh_deb
from tests.util import wait_for

SKIPPED = {
    "clock_step": "lbwatch's wall clock alone cannot be stepped under systemd without a test "
    "hook in the shipped unit, and the container's clock is the host's (shared with other labs)",
    **{kind: "not tried on the systemd tier yet" for kind in PAIR_KINDS},
}
SPOOL, STAGING = "/var/lib/lbwatch/spool", "/var/lib/lbwatch/incoming"
CONF = Path("/etc/lbwatch/lbwatch.toml")
BACK = 40.0  # seconds at most for systemd to bring lbwatch back after a kill or a stop


class SysRig:
    """The systemd tier behind the soak's rig interface (bench/chaos_rig.py)."""

    tier = "systemd"
    supervisor = "lbwatch"
    skipped = SKIPPED
    # lbwatch pings systemd's watchdog at half WatchdogSec=10s, every 5 s; systemd's record
    # gives each ping's time exactly. A gap beyond 7 s (the interval + 2 s, for the loaded
    # machine; the bare lab allows its 1 s interval + 1 s) is a wedge.
    wedge_after = 7.0

    def __init__(self) -> None:
        self.lab = SysLab(fresh_deb(), transitions_log=True)
        self.maildir = Path()
        self._agent: dict[int, int] = {}  # fault number -> the lbwatch main PID it hit

    def node(self, node: Node) -> SysNode:
        assert isinstance(node, SysNode)
        return node

    def up(self) -> Path:
        self.lab.up()
        self.lab.start_sinks()
        assert self.lab.maildir is not None
        self.maildir = self.lab.maildir
        return self.maildir

    def start(self, observer: Observer) -> None:
        self.lab.install()
        self.lab.wait_healthy(90)
        for node in self.lab.sysnodes.values():
            prepare_disks(node, [Path(SPOOL), Path(STAGING)])
            # Every transition mailed one by one, as in the bare lab: no flap digest hides one.
            text = (node.root / CONF.relative_to("/")).read_text()
            node.put(str(CONF), set_key(text, "notify", "flap_max", "100000"))
            node.systemctl("restart", "lbwatch")
        self.lab.wait_healthy(90)
        for node in self.lab.sysnodes.values():
            # The agent's own mount namespace has the small disks.
            pid = node.main_pid("lbwatch")
            seen = node.run(
                "nsenter", "-t", str(node.ns_pid(pid)), "-m", "df", "--output=fstype", SPOOL
            )
            assert "tmpfs" in seen, f"{node.name}: lbwatch's {SPOOL} is not the small disk: {seen}"

    def mark_start(self) -> float:
        """Boot's transitions came before lbwatch was installed (never mailed): keepalived's
        record so far is set aside, and the mail accepted so far is not judged (it stays in the
        directory: the SMTP server numbers its files by their count there)."""
        for node in self.lab.sysnodes.values():
            path = node.transitions_path
            if path.exists():
                path.with_name(path.name + ".before-start").write_text(path.read_text())
                path.write_text("")
        return time.time()

    def down(self) -> None:
        self.lab.down()

    def cfg_path(self, node: Node) -> Path:
        return self.node(node).root / "etc/haproxy/haproxy.cfg"

    def disks(self, node: Node) -> list[Path]:
        return [Path(SPOOL), Path(STAGING)]

    def haproxy_reload(self, node: Node) -> str:
        n = self.node(node)
        master = n.main_pid("haproxy")
        n.systemctl("reload", "haproxy")
        return f"systemctl reload haproxy (master [{master}])"

    def haproxy_restart(self, node: Node) -> str:
        n = self.node(node)
        old = n.main_pid("haproxy")
        n.systemctl("restart", "haproxy")
        return f"systemctl restart haproxy: master [{old}] -> {n.main_pid('haproxy')}"

    def agent_fault(self, f: Fault, node: Node) -> str:
        n = self.node(node)
        pid = n.main_pid("lbwatch")
        sig = signal.SIGKILL if f.kind == "lbwatch_kill" else signal.SIGSTOP
        os.kill(pid, sig)
        self._agent[f.n] = pid
        return f"{signal.Signals(sig).name} lbwatch [{pid}]"

    def agent_heal(self, f: Fault, node: Node) -> str:
        """Nothing to do but wait (bounded) for systemd to have lbwatch back: active (after its
        READY=1) under a new main process."""
        n = self.node(node)
        began = time.monotonic()
        was = self._agent.pop(f.n, 0)

        def back() -> bool:
            pid = n.main_pid("lbwatch")
            return bool(pid) and pid != was and n.prop("lbwatch", "ActiveState") == "active"

        with contextlib.suppress(TimeoutError):  # said below: its state after BACK
            wait_for(back, BACK, what="lbwatch back")
        took = time.monotonic() - began
        state = n.prop("lbwatch", "ActiveState")
        return (
            f"lbwatch.service {state}, main PID {n.main_pid('lbwatch')}, "
            f"{n.prop('lbwatch', 'NRestarts')} restarts (waited {took:.1f} s)"
        )

    def sshd(self, node: Node, up: bool) -> str:
        verb = "start" if up else "stop"
        self.node(node).systemctl(verb, "ssh")
        return f"systemctl {verb} ssh"

    def smtp(self, up: bool) -> str:
        if up:
            self.lab.start_smtp_sink(SMTP_PORT, auth=f"{SMTP_USER}:{SMTP_PASSWORD}")
            return "SMTP server started"
        self.lab.stop_smtp_sink()
        return "SMTP server killed"

    def drain(self, node: Node, on: bool) -> str:
        raise NotImplementedError("drain is in SKIPPED: not tried on the systemd tier yet")

    def logs(self) -> dict[str, str]:
        return {n: node.journal("-u", "lbwatch") for n, node in self.lab.sysnodes.items()}

    def daemon_logs(self) -> dict[str, str]:
        return {
            n: node.journal("-u", "lbwatch", "-u", "haproxy", "-u", "keepalived", "-u", "ssh")
            for n, node in self.lab.sysnodes.items()
        }
