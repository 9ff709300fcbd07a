"""Under systemd, `lbwatch run` refuses start commands that would put haproxy or keepalived into
lbwatch's own cgroup (where `systemctl stop lbwatch` SIGKILLs them), with exit 2; outside
systemd the same commands are allowed. Pure tables, then the real `lbwatch run` process."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.cli import EXIT_CONFIG
from lbwatch.config import parse
from lbwatch.systemd import cgroup_hazards, started_by_systemd
from tests.unitproc import Unit

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
    unit.wait_started(20)
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
    unit.wait_started(20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
