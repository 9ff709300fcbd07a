"""The agent as a real process: real haproxy on loopback, a stand-in keepalived (a copy of sleep
named ``fakeka``, since a real keepalived belongs in the namespace lab), a real sd_notify socket,
and the real CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lbwatch.procs import read_pidfile
from lbwatch.status import STATUS_FILE
from lbwatch.statusdoc import StatusDoc
from tests.conftest import free_port, haproxy_config, needs, reap
from tests.util import load_status, wait_for

REAPER = Path(__file__).resolve().parent / "reaper.py"
pytestmark = [needs("haproxy", "start-stop-daemon"), pytest.mark.usefixtures("subreaper")]


class Rig:
    """One agent with its config, services, notify socket and log."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.monitor = free_port()
        self.cfg_file = haproxy_config(tmp / "haproxy.cfg", free_port(), self.monitor)
        self.ha_pid = tmp / "haproxy.pid"
        self.ka_pid = tmp / "fakeka.pid"
        self.fakeka = tmp / "fakeka"
        shutil.copy("/bin/sleep", self.fakeka)
        self.config = tmp / "lbwatch.toml"
        self.write_config()
        self.log = tmp / "agent.log"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(tmp / "notify"))
        self.sock.setblocking(False)
        self.notes: list[str] = []
        self.agent: subprocess.Popen[bytes] | None = None

    def write_config(
        self,
        extra: str = "",
        ha_backoff: str = "initial = 0.2\nmax = 1.0\nstable_after = 3.0",
        notify: str = "",
        ka_start: str = "",
        policy: str = "",
        ka_extra: str = "",
        ha_commands: str | None = None,
    ) -> None:
        """``ha_commands``: haproxy's command lines in place of its own start and stop ("":
        none, systemctl's)."""
        q = json.dumps
        if ha_commands is None:
            ha_commands = (
                f'start = ["haproxy", "-W", "-D", "-f", {q(str(self.cfg_file))}, "-p", '
                f"{q(str(self.ha_pid))}]\n"
                'stop = ["start-stop-daemon", "--stop", "--quiet", "--oknodo", "--pidfile", '
                f'{q(str(self.ha_pid))}, "--retry", "TERM/5/KILL/2"]'
            )
        ka_start = ka_start or (
            '["start-stop-daemon", "--start", "--quiet", "--background", "--make-pidfile", '
            f'"--pidfile", {q(str(self.ka_pid))}, "--exec", {q(str(self.fakeka))}, "--", "1000"]'
        )
        self.config.write_text(
            f"""
[agent]
node_name = "t1"
run_dir = {q(str(self.tmp / "run"))}
state_dir = {q(str(self.tmp / "state"))}
scan_interval = 0.5
log_level = "debug"

[haproxy]
pidfile = {q(str(self.ha_pid))}
find_without_pidfile = false
{ha_commands}
command_timeout = 5

[haproxy.health]
url = "http://127.0.0.1:{self.monitor}/health"
interval = 0.2
fall = 2
rise = 1

[haproxy.backoff]
{ha_backoff}

[keepalived]
pidfile = {q(str(self.ka_pid))}
process_name = "fakeka"
find_without_pidfile = false
start = {ka_start}
stop = ["start-stop-daemon", "--stop", "--quiet", "--oknodo", "--pidfile",
        {q(str(self.ka_pid))}, "--retry", "TERM/5/KILL/2"]
command_timeout = 5
{ka_extra}

[policy]
keepalived_start_delay = 0.3
{policy}

[notify]
fifo = {q(str(self.tmp / "run" / "keepalived.fifo"))}
{notify}
{extra}"""
        )

    def start(self, prefix: tuple[str, ...] = ()) -> None:
        """Start the agent; ``prefix``: a command it runs under (e.g. a private mount
        namespace), which must exec it in place."""
        out = self.log.open("ab")
        st = os.fstat(out.fileno())
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.tmp / "notify"),
            "WATCHDOG_USEC": "400000",
            "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
        }
        self.agent = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                str(REAPER),
                sys.executable,
                "-m",
                "lbwatch",
                "--config",
                str(self.config),
                "run",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
        )
        out.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lbwatch", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def received(self) -> list[str]:
        while True:
            try:
                self.notes.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.notes

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> StatusDoc | None:
        """The agent's status document; None until it has written one."""
        return load_status(self.tmp / "run" / STATUS_FILE)

    def doc(self) -> StatusDoc:
        """The agent's status document, which it must have written by now."""
        doc = self.status()
        assert doc is not None, f"no {STATUS_FILE} in {self.tmp / 'run'} yet"
        return doc

    def pid(self, which: str) -> int | None:
        pid = read_pidfile(self.ha_pid if which == "haproxy" else self.ka_pid)
        if pid is None:
            return None
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return pid

    def both_up(self) -> bool:
        doc = self.status()
        return (
            doc is not None and bool(doc.services) and all(v.running for v in doc.services.values())
        )

    def agent_pid(self) -> int | None:
        """The agent's PID (the Popen is the reaper around it)."""
        if self.agent is None:
            return None
        kids = psutil.Process(self.agent.pid).children()
        return kids[0].pid if kids else None

    def stop_agent(self, sig: int = signal.SIGTERM) -> int | None:
        if self.agent is None or self.agent.poll() is not None:
            return None if self.agent is None else self.agent.returncode
        if sig == signal.SIGKILL:
            # The reaper cannot forward SIGKILL: kill the agent itself first.
            pid = self.agent_pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        self.agent.send_signal(sig)
        return self.agent.wait(10)

    def close(self) -> None:
        self.stop_agent(signal.SIGKILL)
        # Everything this rig started names its private directory on the command line (haproxy's
        # -f, fakeka's path); a start still in flight when the agent died has no pidfile yet.
        # A daemon that was still forking away from a killed start command shows up a moment
        # later: sweep until two rounds in a row find nothing (bounded to 3 s).
        mine = str(self.tmp)
        quiet_rounds, deadline = 0, time.monotonic() + 3
        while quiet_rounds < 2 and time.monotonic() < deadline:
            found = 0
            for proc in psutil.process_iter(["cmdline"]):
                if any(mine in arg for arg in proc.info["cmdline"] or ()):
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                        found += 1
            quiet_rounds = quiet_rounds + 1 if found == 0 else 0
            time.sleep(0.1)
            reap()
        self.sock.close()


def test_starts_both_and_reports_ready_to_systemd(rig: Rig) -> None:
    """Nothing running: haproxy is started, then keepalived once haproxy passes its probe; READY=1
    follows the first reconcile, WATCHDOG=1 keeps coming, and logs carry journald priorities."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    wait_for(lambda: any(n.startswith("READY=1") for n in rig.received()), 10, what="READY=1")
    wait_for(lambda: sum(n == "WATCHDOG=1" for n in rig.received()) >= 2, 10, what="2 pings")
    text = rig.text()
    assert (
        "<6>haproxy is down (not running when lbwatch started); starting haproxy (attempt 1)"
        in text
    )
    assert "<6>haproxy master" in text and "is up and keepalived is not running; starting" in text
    out = rig.cli("status")
    assert out.returncode == 0, out.stderr
    assert "haproxy     running" in out.stdout and "keepalived  running" in out.stdout
    assert "health      up" in out.stdout


def test_haproxy_death_stops_keepalived_then_heals(rig: Rig) -> None:
    """SIGKILL of haproxy: keepalived is stopped, haproxy restarted, keepalived started again."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    ka_before, ha_before = rig.pid("fakeka"), rig.pid("haproxy")
    assert ka_before and ha_before
    workers = [c.pid for c in psutil.Process(ha_before).children()]
    for p in [ha_before, *workers]:
        with contextlib.suppress(ProcessLookupError):  # a worker may go with its master
            os.kill(p, signal.SIGKILL)
    wait_for(
        lambda: (
            f"haproxy master {ha_before} exited (pidfd); stopping keepalived so the "
            "VIP moves" in rig.text()
        ),
        10,
        what="stop reason",
    )
    wait_for(
        lambda: rig.pid("fakeka") not in (None, ka_before) and rig.both_up(),
        10,
        what="keepalived restarted after haproxy came back",
    )
    assert rig.pid("haproxy") not in (None, ha_before)
    # One line per cause, and one stop: the exit, seen before the stop's result, is not taken
    # for a keepalived still to be stopped.
    lines = rig.text().splitlines()
    assert sum(f"master {ha_before} exited" in line for line in lines) == 1, lines
    assert sum("stopping keepalived" in line for line in lines) == 1, lines
    actions = [a.action for a in rig.doc().recent_actions]
    assert actions[-3:] in (
        ["start haproxy", "stop keepalived", "start keepalived"],
        ["stop keepalived", "start haproxy", "start keepalived"],
    )


def test_keepalived_death_is_restarted(rig: Rig) -> None:
    """keepalived dies on its own: it is started again at once."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    ka = rig.pid("fakeka")
    assert ka
    os.kill(ka, signal.SIGKILL)
    wait_for(lambda: rig.pid("fakeka") not in (None, ka), 10, what="keepalived restarted")
    # Seen by its pidfd, or by the rescan when the death fell inside one (a loaded machine).
    said = rf"keepalived {ka} exited \((pidfd|scan)\); starting keepalived \(attempt "
    wait_for(lambda: re.search(said, rig.text()), 5, what="the restart's reason logged")
    assert f"fakeka {ka} exited" not in rig.text()  # it is reported as the service


def test_pause_observes_only_and_survives_restart(rig: Rig) -> None:
    """Paused: a dead keepalived stays dead and the agent says what it would do; the pause
    outlives an agent restart; resume acts."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    out = rig.cli("pause", "--reason", "kernel update")
    assert out.returncode == 0 and out.stdout.startswith("paused: lbwatch on t1 observes only")
    ka = rig.pid("fakeka")
    assert ka
    os.kill(ka, signal.SIGKILL)
    wait_for(lambda: "paused: would start keepalived" in rig.text(), 10, what="paused note")
    # The loop goes on (a watchdog ping every 0.2 s, a rescan every 0.5 s) and still starts
    # nothing: five more pings.
    pings = sum(n == "WATCHDOG=1" for n in rig.received())
    wait_for(lambda: sum(n == "WATCHDOG=1" for n in rig.received()) >= pings + 5, 10)
    assert rig.pid("fakeka") is None
    assert rig.stop_agent() == 0
    rig.start()
    wait_for(
        lambda: (
            (doc := rig.status()) is not None and doc.ready and doc.agent.pid == rig.agent_pid()
        ),
        10,
        what="restarted agent ready",
    )
    status = rig.cli("status").stdout
    assert "paused      YES since" in status and "kernel update" in status
    assert rig.pid("fakeka") is None
    out = rig.cli("resume")
    assert out.returncode == 0 and "acts again" in out.stdout
    wait_for(lambda: rig.pid("fakeka") is not None, 10, what="keepalived started after resume")


def test_sighup_keeps_running_config_when_new_one_is_bad(rig: Rig) -> None:
    """A bad config on SIGHUP is reported and the old one kept; a good one is applied."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    good = rig.config.read_text()
    rig.config.write_text(good.replace("scan_interval = 0.5", "scan_interval = -1"))
    assert rig.agent is not None
    rig.agent.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the running one" in rig.text(), 10, what="bad reload reported")
    assert f"<3>{rig.config}: agent.scan_interval: must be at least 0.1 s" in rig.text()
    assert rig.agent.poll() is None
    rig.config.write_text(good)
    rig.agent.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in rig.text(), 10, what="good reload")
    assert any(n.startswith("RELOADING=1") for n in rig.received())


def test_one_agent_per_node_and_sigterm_leaves_services(rig: Rig) -> None:
    """A second agent is refused; SIGTERM ends the agent and leaves both services running;
    `status` then says the agent is not running (exit 3)."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    second = rig.cli("run")
    assert second.returncode == 1
    assert "another lbwatch (PID" in second.stderr
    ha, ka = rig.pid("haproxy"), rig.pid("fakeka")
    # Read what is queued, as systemd does all along: the socket holds 10 datagrams (the
    # kernel's net.unix.max_dgram_qlen), and a full queue drops the next one, STOPPING=1 too.
    rig.received()
    assert rig.stop_agent() == 0
    assert any(n == "STOPPING=1" for n in rig.received())
    assert rig.pid("haproxy") == ha and rig.pid("fakeka") == ka
    out = rig.cli("status")
    assert out.returncode == 3 and "lbwatch is not running" in out.stderr


def test_broken_haproxy_backs_off_and_never_starts_keepalived(rig: Rig) -> None:
    """haproxy cannot start: attempts back off, then lbwatch gives up loudly; keepalived is
    never started meanwhile."""
    rig.cfg_file.write_text("this is not a haproxy config\n")
    rig.write_config(
        ha_backoff="initial = 0.2\nmax = 0.4\nmax_attempts = 3\nwindow = 30\ngiveup_retry = 60"
    )
    rig.start()
    wait_for(lambda: "giving up on haproxy: 3 start attempts" in rig.text(), 10, what="give-up")
    assert rig.pid("fakeka") is None
    assert "start keepalived" not in rig.text()
    # The log line comes a moment before the status file is rewritten.
    wait_for(
        lambda: (doc := rig.status()) is not None and doc.services["haproxy"].given_up,
        5,
        what="status",
    )
    last_failure = rig.doc().services["haproxy"].last_failure
    assert last_failure is not None and last_failure.startswith("exit 1")
    out = rig.cli("status").stdout
    assert "GIVEN UP" in out
