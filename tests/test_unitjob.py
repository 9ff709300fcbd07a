"""Reading what systemd is doing with haproxy's unit, from real `systemctl show` output.

Every sample below was printed by systemd 252.39 (Debian 12) in a container booted by
systemd-nspawn: Debian's haproxy.service (Type=notify, `haproxy -Ws`, KillMode=mixed,
Restart=always), sampled as soon as the master's pidfd became readable and then until haproxy
ran again, by

    systemctl show -p Job -p ActiveState -p SubState -p Result -p NRestarts -p MainPID \\
        haproxy.service
    systemctl show -p JobType -p State JOB     (while Job= names one)

The samples of the stop half of a restart or stop job come from a transient unit whose main
process takes 0.5 s to exit on SIGTERM (`systemd-run -p KillMode=mixed -p Restart=always sh -c
"trap 'sleep 0.5; exit 0' TERM; ..."`): haproxy's master exits last, so with haproxy that half
is over before lbwatch can ask.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lbwatch.events import Action, Outcome, Service, UnitPlan, Verb
from lbwatch.services import CommandController, ask_unit
from lbwatch.unitjob import (
    UnitView,
    classify,
    describe,
    job_query,
    read_bus,
    read_job_type,
    read_unit,
    timespan_usec,
    unit_query,
)
from tests import fakesystemctl
from tests.fakes import config, proc

# `systemctl restart haproxy`, asked 26 ms after the old master (40) exited: the stop half is
# done, the job is already a start job, the new master (53) runs but is not READY yet.
RESTART_STARTING = (
    "MainPID=53\nResult=success\nNRestarts=0\nActiveState=activating\nSubState=start\nJob=123\n"
)
# The same, 0.24 s later: done; and `systemctl try-restart haproxy` looks the same.
RESTART_DONE = (
    "MainPID=53\nResult=success\nNRestarts=0\nActiveState=active\nSubState=running\nJob=\n"
)
# A restart job in its stop half (the slow transient unit), and a stop job there.
RESTART_STOPPING = (
    "MainPID=178\nResult=success\nNRestarts=0\n"
    "ActiveState=deactivating\nSubState=stop-sigterm\nJob=220\n"
)
STOP_STOPPING = (
    "MainPID=52\nResult=success\nNRestarts=0\n"
    "ActiveState=deactivating\nSubState=stop-sigterm\nJob=171\n"
)
# `systemctl stop haproxy`, 14 ms after the master exited: the stop job has finished already.
# NRestarts keeps an earlier crash's count until the next start.
STOPPED = "MainPID=0\nResult=success\nNRestarts=1\nActiveState=inactive\nSubState=dead\nJob=\n"
# `kill -9` of the master: Restart=always waits RestartSec (100 ms) in auto-restart, then queues
# a restart job of its own, which shows as a start job a moment later.
CRASHED = (
    "MainPID=0\nResult=signal\nNRestarts=0\nActiveState=activating\nSubState=auto-restart\nJob=\n"
)
CRASH_JOB_QUEUED = (
    "MainPID=0\nResult=signal\nNRestarts=1\n"
    "ActiveState=activating\nSubState=auto-restart\nJob=172\n"
)
CRASH_RESTARTING = (
    "MainPID=94\nResult=success\nNRestarts=1\nActiveState=activating\nSubState=start\nJob=172\n"
)
CRASH_RESTARTED = (
    "MainPID=94\nResult=success\nNRestarts=1\nActiveState=active\nSubState=running\nJob=\n"
)
# `kill -TERM` of the master by someone else: a clean exit, restarted all the same.
TERMED = (
    "MainPID=0\nResult=success\nNRestarts=0\nActiveState=activating\nSubState=auto-restart\nJob=\n"
)
# The master asked about (704) is still the unit's main process: `systemctl reload-or-restart
# haproxy`, which is a reload for a unit with ExecReload=, sampled 10 s after (no exit came).
SAME_MAIN = "MainPID=704\nResult=success\nNRestarts=0\nActiveState=active\nSubState=running\nJob=\n"

START_JOB = "JobType=start\nState=running\n"
RESTART_JOB = "JobType=restart\nState=running\n"
STOP_JOB = "JobType=stop\nState=running\n"
# What the job query prints (exit 1) when the job finished between the two queries.
JOB_GONE = "Failed to get properties: Unknown object '/org/freedesktop/systemd1/job/123'.\n"

CASES = [
    # (description, unit output, job output or None when not asked or failed, dead PID, plan)
    ("a restart in its start half", RESTART_STARTING, START_JOB, 40, UnitPlan.RESTART),
    ("a restart whose job finished before its type was read", RESTART_STARTING, None, 40,
     UnitPlan.RESTART),
    ("a restart already done when asked", RESTART_DONE, None, 40, UnitPlan.RESTART),
    ("a restart job in its stop half", RESTART_STOPPING, RESTART_JOB, 178, UnitPlan.RESTART),
    ("a restart job whose half is unknown: the job went while stopping", RESTART_STOPPING, None,
     178, UnitPlan.UNKNOWN),
    ("a stop job", STOP_STOPPING, STOP_JOB, 52, UnitPlan.STOP),
    ("a stop that has finished", STOPPED, None, 94, UnitPlan.NONE),
    ("a crash waiting for RestartSec", CRASHED, None, 53, UnitPlan.AUTO_RESTART),
    ("a crash whose restart job is queued", CRASH_JOB_QUEUED, START_JOB, 53,
     UnitPlan.AUTO_RESTART),
    ("a crash being restarted: NRestarts counts it", CRASH_RESTARTING, START_JOB, 53,
     UnitPlan.AUTO_RESTART),
    ("a crash restarted already", CRASH_RESTARTED, None, 53, UnitPlan.AUTO_RESTART),
    ("a clean exit restarted by Restart=always", TERMED, None, 551, UnitPlan.AUTO_RESTART),
    ("the master asked about is still the main process", SAME_MAIN, None, 704, UnitPlan.UNKNOWN),
]  # fmt: skip


@pytest.mark.parametrize(
    ("unit", "job", "dead", "plan"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_classify_real_output(unit: str, job: str | None, dead: int, plan: UnitPlan) -> None:
    """Each real sample reads as what systemd was doing then."""
    view = read_unit(unit)
    assert classify(view, read_job_type(job) if job else None, dead) is plan


def test_read_unit_takes_every_field() -> None:
    """The six properties are read whatever their order; a missing one reads as unknown."""
    assert read_unit(RESTART_STARTING) == UnitView(
        job="123", active="activating", sub="start", result="success", restarts=0, main_pid=53
    )
    assert read_unit("Job=\nActiveState=inactive\n") == UnitView(
        job="", active="inactive", sub="", result="", restarts=0, main_pid=0
    )


def test_noise_is_not_read_as_a_property() -> None:
    """A warning systemctl prints on the merged output, and a value that is not a number,
    change nothing."""
    text = (
        "Warning: The unit file, source configuration file or drop-ins of haproxy.service "
        "changed on disk. Run 'systemctl daemon-reload' to reload units.\n"
        "MainPID=x\nNRestarts=\n" + CRASHED.replace("MainPID=0\n", "")
    )
    assert read_unit(text) == UnitView(
        job="", active="activating", sub="auto-restart", result="signal", restarts=0, main_pid=0
    )


def test_an_empty_answer_says_nothing() -> None:
    """No output at all (a systemctl that printed nothing) is no plan, not a stop."""
    assert classify(read_unit(""), None, 40) is UnitPlan.UNKNOWN


def test_job_type_and_gone_job() -> None:
    """The job query's answer gives its type; what a finished job's query prints gives none."""
    assert read_job_type(RESTART_JOB) == "restart"
    assert read_job_type(JOB_GONE) is None


def test_queries_name_the_unit_and_the_job() -> None:
    """The argv lists: the unit's eight properties, the job's type; no shell, an option never
    taken for the unit."""
    assert unit_query("haproxy") == [
        "systemctl", "show", "--property=Job,ActiveState,SubState,Result,NRestarts,MainPID,"
        "RestartUSec,ExecMainExitTimestampMonotonic", "--", "haproxy",
    ]  # fmt: skip
    assert job_query("123") == ["systemctl", "show", "--property=JobType", "123"]


def test_describe_says_what_systemd_said() -> None:
    """The words for the log: the job and the states."""
    view = read_unit(RESTART_STARTING)
    assert describe(view, "start") == "job 123 start; activating/start; 0 restarts; main PID 53"
    assert describe(read_unit(CRASHED), None) == (
        "no job; activating/auto-restart, result signal; 0 restarts"
    )


# ---------------------------------------------------------------------------------------------
# The queries run: services.ask_unit against the stand-in systemctl (tests/fakesystemctl.py),
# with no private socket to ask first (its path names nothing: the fallback).
NO_BUS = "/nonexistent/lbwatch-test-bus"
BY = f" (by systemctl: {NO_BUS}: No such file or directory)"


@pytest.fixture
def fake_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in systemctl first on PATH; its state file, to set what systemd shows."""
    bin_dir = fakesystemctl.install(tmp_path, ["false"], tmp_path / "haproxy.pid")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "state.json"


def set_state(path: Path, **state: object) -> None:
    path.write_text(json.dumps({"job": "", "job_type": "", "result": "success", "restarts": 0,
                                **state}))  # fmt: skip


def test_ask_reads_a_restart_job(fake_unit: Path) -> None:
    """A restart job in its stop half: both queries run, and the answer is a restart."""
    set_state(fake_unit, job="7", job_type="restart", active="deactivating", sub="stop-sigterm")
    res, plan = ask_unit("haproxy", proc(4711), 5.0, bus=NO_BUS)
    assert plan is UnitPlan.RESTART and res.outcome is Outcome.OK
    assert res.detail == "job 7 restart; deactivating/stop-sigterm; 0 restarts" + BY


def test_ask_reads_a_crash(fake_unit: Path) -> None:
    """No job, auto-restart: one query, the answer is Restart='s."""
    set_state(fake_unit, active="activating", sub="auto-restart", result="signal")
    res, plan = ask_unit("haproxy", proc(4711), 5.0, bus=NO_BUS)
    assert plan is UnitPlan.AUTO_RESTART
    assert res.detail == "no job; activating/auto-restart, result signal; 0 restarts" + BY


def test_ask_reads_a_job_that_went_meanwhile(fake_unit: Path) -> None:
    """Job= names a job that has finished when its type is asked (exit 1): it is read without
    its type, here a start in progress."""
    set_state(fake_unit, job="7", job_gone=True, active="activating", sub="start")
    res, plan = ask_unit("haproxy", proc(4711), 5.0, bus=NO_BUS)
    assert plan is UnitPlan.RESTART and res.outcome is Outcome.OK
    assert res.detail == "job 7 (finished); activating/start; 0 restarts" + BY


def test_ask_without_systemctl_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No systemctl to run: failed, and no plan."""
    monkeypatch.setenv("PATH", str(tmp_path))
    res, plan = ask_unit("haproxy", proc(4711), 5.0, bus=NO_BUS)
    assert res.outcome is Outcome.FAILED and plan is UnitPlan.UNKNOWN
    assert res.detail.startswith("cannot run systemctl")


def test_ask_is_bounded_in_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A systemctl that hangs (PID 1 busy) is killed at the budget: a timeout, no plan."""
    (tmp_path / "systemctl").write_text("#!/bin/sh\nexec sleep 30\n")
    (tmp_path / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    started = time.monotonic()
    res, plan = ask_unit("haproxy", proc(4711), 0.3, bus=NO_BUS)
    assert res.outcome is Outcome.TIMEOUT and plan is UnitPlan.UNKNOWN
    assert time.monotonic() - started < 2.0


def test_read_bus_takes_systemds_properties_as_systemctl_shows_them() -> None:
    """The properties read over the private socket make the same view as `systemctl show`'s
    lines for the same state; Job (0, "/") is no job, and a job's path comes with its id."""
    bus = {"Job": (0, "/"), "ActiveState": "activating", "SubState": "auto-restart",
           "Result": "signal", "NRestarts": 0, "MainPID": 0}  # fmt: skip
    assert read_bus(bus) == (read_unit(CRASHED), "")
    # RestartUSec comes as microseconds over the bus and as a timespan from systemctl.
    timed = {**bus, "RestartUSec": 100_000, "ExecMainExitTimestampMonotonic": 5_000_000_000}
    assert read_bus(timed, 7) == (
        read_unit(
            RESTART_AFTER_CRASH.replace(
                "Job=91\nActiveState=inactive\nSubState=dead\nResult=success\nNRestarts=1",
                "Job=\nActiveState=activating\nSubState=auto-restart\nResult=signal\nNRestarts=0",
            ),
            7,
        ),
        "",
    )
    job = {**bus, "Job": (7, "/org/freedesktop/systemd1/job/7"), "SubState": "start",
           "Result": "success", "NRestarts": 2, "MainPID": 53}  # fmt: skip
    view, path = read_bus(job)
    assert path == "/org/freedesktop/systemd1/job/7"
    assert (view.job, view.sub, view.result, view.restarts, view.main_pid) == (
        "7",
        "start",
        "success",
        2,
        53,
    )


def test_an_ask_begun_without_a_bus_is_answered_by_systemctl(fake_unit: Path) -> None:
    """``begin`` writes an ASK's question to systemd's socket on the loop; where there is no
    socket it only logs, and ``execute`` asks systemctl instead and says so."""
    set_state(fake_unit, active="activating", sub="auto-restart", result="signal")
    ctl = CommandController(config(), bus=NO_BUS)
    ask = Action(
        Service.HAPROXY, Verb.ASK, "haproxy master 4711 exited", "asking", target=proc(4711), seq=1
    )
    ctl.begin(ask)
    res = ctl.execute(ask)
    assert res.plan is UnitPlan.AUTO_RESTART and res.outcome is Outcome.OK
    assert res.detail == "no job; activating/auto-restart, result signal; 0 restarts" + BY


# `systemctl restart haproxy` after a crash that Restart= healed, asked between the stop half
# and the start (a state systemd 252 passes through, service.c): the start job is there,
# NRestarts still counts the earlier crash (flushed only at this start), RestartSec is 100 ms.
RESTART_AFTER_CRASH = (
    "Job=91\nActiveState=inactive\nSubState=dead\nResult=success\nNRestarts=1\nMainPID=0\n"
    "RestartUSec=100ms\nExecMainExitTimestampMonotonic=5000000000\n"
)


@pytest.mark.parametrize(
    ("read_usec", "plan"),
    [
        (5_000_003_000, UnitPlan.RESTART),  # 3 ms after the exit: Restart= has queued nothing
        (5_000_099_999, UnitPlan.RESTART),
        (5_000_100_000, UnitPlan.AUTO_RESTART),  # RestartSec has passed: it may be systemd's
        (0, UnitPlan.AUTO_RESTART),  # when it was read is not known: as before
    ],
)
def test_a_start_job_sooner_than_restart_sec_is_not_systemds_own(
    read_usec: int, plan: UnitPlan
) -> None:
    """A start job with NRestarts left over from an earlier crash is read as systemd's own
    restart only once RestartSec could have passed since the exit."""
    view = read_unit(RESTART_AFTER_CRASH, read_usec)
    assert (view.restart_usec, view.exited_usec) == (100_000, 5_000_000_000)
    assert classify(view, "start", 40) is plan


@pytest.mark.parametrize(
    ("text", "usec"),
    [("100ms", 100_000), ("1min 30s", 90_000_000), ("0", 0), ("250us", 250), ("1.5s", 1_500_000),
     ("infinity", None), ("", None), ("5", None), ("2d", None)],
)  # fmt: skip
def test_timespans_as_systemctl_prints_them(text: str, usec: int | None) -> None:
    """RestartUSec as `systemctl show` prints it, in microseconds; what is not read is None."""
    assert timespan_usec(text) == usec
