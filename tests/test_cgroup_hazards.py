"""Under systemd, `lbwatch run` refuses start commands that would put haproxy or keepalived into
lbwatch's own cgroup (where `systemctl stop lbwatch` SIGKILLs them), with exit 2; outside
systemd the same commands are allowed. Pure tables, then the real `lbwatch run` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.cli import EXIT_CONFIG
from lbwatch.config import parse
from lbwatch.status import set_paused
from lbwatch.systemd import cgroup_hazards, started_by_systemd
from tests.util import wait_for

DIRECT_START = ["haproxy", "-W", "-D", "-f", "/etc/haproxy/haproxy.cfg"]


@pytest.mark.parametrize(
    ("environ", "pid", "ppid", "expected"),
    [
        # systemd >= 248 names the process it started: that is the answer, either way.
        ({"SYSTEMD_EXEC_PID": "100", "INVOCATION_ID": "ab"}, 100, 1, True),
        ({"SYSTEMD_EXEC_PID": "100"}, 100, 4242, True),
        # A descendant of some unit (a CI runner's test run): inherited, names another process.
        ({"SYSTEMD_EXEC_PID": "99", "INVOCATION_ID": "ab"}, 100, 1, False),
        # systemd < 248: INVOCATION_ID, and started by the manager itself (PID 1).
        ({"INVOCATION_ID": "ab"}, 100, 1, True),
        ({"INVOCATION_ID": "ab"}, 100, 4242, False),
        ({"INVOCATION_ID": ""}, 100, 1, False),
        # No systemd at all (the lab's namespaces, a container whose PID 1 is not systemd).
        ({}, 100, 1, False),
    ],
)
def test_started_by_systemd(environ: dict[str, str], pid: int, ppid: int, expected: bool) -> None:
    """Only the process systemd started for a unit counts; an inherited INVOCATION_ID does not."""
    assert started_by_systemd(environ, pid, ppid) is expected


@pytest.mark.parametrize(
    ("services", "under_systemd", "offending"),
    [
        # The defaults are systemctl VERB UNIT.
        ({}, True, []),
        ({"haproxy": {"start": DIRECT_START}}, True, ["haproxy.start"]),
        ({"haproxy": {"start": DIRECT_START}}, False, []),
        ({"keepalived": {"start": ["/usr/bin/systemctl", "start", "keepalived"]}}, True, []),
        (
            {"haproxy": {"start": ["systemd-run", "--unit=haproxy-lb", "haproxy", "-Ws"]}},
            True,
            [],
        ),
        # A reload that only signals the running daemon forks nothing; a restart has to start.
        ({"haproxy": {"reload": ["pkill", "-USR2", "-F", "/run/haproxy.pid"]}}, True, []),
        ({"haproxy": {"restart": ["kill", "-USR2", "1"]}}, True, ["haproxy.restart"]),
        ({"keepalived": {"reload": ["/usr/sbin/keepalived", "-D"]}}, True, ["keepalived.reload"]),
        # Stopping never leaves a daemon behind in lbwatch's cgroup.
        ({"keepalived": {"stop": ["start-stop-daemon", "--stop", "--oknodo"]}}, True, []),
        # argv[0] decides: a wrapper hides what it runs.
        (
            {"haproxy": {"start": ["/usr/bin/env", "systemctl", "start", "haproxy"]}},
            True,
            ["haproxy.start"],
        ),
        (
            {
                "haproxy": {"start": DIRECT_START, "restart": DIRECT_START},
                "keepalived": {"start": ["keepalived", "-D"]},
            },
            True,
            ["haproxy.start", "haproxy.restart", "keepalived.start"],
        ),
    ],
)
def test_cgroup_hazards(
    services: dict[str, dict[str, list[str]]], under_systemd: bool, offending: list[str]
) -> None:
    """One line per start/restart/reload command not going through systemctl or systemd-run, and
    only under systemd; each names the file and field and says what to use instead."""
    lines = cgroup_hazards(parse(services, "t.toml"), under_systemd, "t.toml")
    assert [line.split(": ")[1] for line in lines] == offending
    for line, field in zip(lines, offending):
        assert line.startswith(f"t.toml: {field}: under systemd, ")
        assert "`systemctl stop lbwatch`" in line
        assert ("kill or pkill" if field.endswith("reload") else "systemd-run --unit=NAME") in line
        assert "\n" not in line


# ---------------------------------------------------------------------------------------------
# The real `lbwatch run` process, started the way systemd starts a unit's process.


class Unit:
    """`lbwatch run` with INVOCATION_ID set and SYSTEMD_EXEC_PID naming its own PID (a shell
    exports its $$ and execs lbwatch, as systemd sets both before its execve), paused so that it
    takes no action, every path in tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "lbwatch.toml"
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        set_paused(tmp / "state", True, "test: observe only")

    def write_config(self, haproxy_extra: str = "") -> None:
        q = json.dumps
        self.config.write_text(
            f"""
[agent]
run_dir = {q(str(self.tmp / "run"))}
state_dir = {q(str(self.tmp / "state"))}

[haproxy]
pidfile = {q(str(self.tmp / "haproxy.pid"))}
find_without_pidfile = false
{haproxy_extra}

[keepalived]
pidfile = {q(str(self.tmp / "keepalived.pid"))}
find_without_pidfile = false

[notify]
fifo = {q(str(self.tmp / "run" / "keepalived.fifo"))}
"""
        )

    def start(self, exec_pid: str = "$$") -> subprocess.Popen[bytes]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
        }
        env["INVOCATION_ID"] = "5f1d2c3b4a5968778695a4b3c2d1e0f1"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    f'export SYSTEMD_EXEC_PID={exec_pid}; exec "$@"',
                    "sh",
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
        return self.proc

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def started(self) -> bool:
        return "starting on" in self.text() and (self.tmp / "run" / "status.json").exists()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Unit]:
    u = Unit(tmp_path)
    try:
        yield u
    finally:
        u.close()


def test_systemctl_commands_start_under_systemd(unit: Unit) -> None:
    """Positive control: as a unit's process with the default (systemctl) commands, lbwatch runs,
    publishes its status, and exits 0 on SIGTERM sent to its PID."""
    unit.write_config()
    proc = unit.start()
    wait_for(unit.started, 20, what="lbwatch to start")
    assert "lbwatch" in Path(f"/proc/{proc.pid}/cmdline").read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_direct_start_command_refused_under_systemd(unit: Unit) -> None:
    """The same with haproxy.start running haproxy directly: one line naming the file and field,
    exit 2 (the unit's RestartPreventExitStatus), and the agent never starts."""
    unit.write_config(f"start = {json.dumps(DIRECT_START)}")
    proc = unit.start()
    assert proc.wait(30) == EXIT_CONFIG
    text = unit.text()
    assert f"{unit.config}: haproxy.start: under systemd, 'haproxy' would run haproxy" in text
    assert "starting on" not in text
    assert not (unit.tmp / "run" / "status.json").exists()


def test_direct_start_command_allowed_in_a_units_descendant(unit: Unit) -> None:
    """INVOCATION_ID inherited from some unit (a test run under a CI runner's service) with
    SYSTEMD_EXEC_PID naming another process: not a unit's process, direct commands allowed."""
    unit.write_config(f"start = {json.dumps(DIRECT_START)}")
    proc = unit.start(exec_pid=str(os.getpid()))
    wait_for(unit.started, 20, what="lbwatch to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
