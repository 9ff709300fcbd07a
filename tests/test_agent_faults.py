"""The agent under faults: an executor that raises, a clock step under a running agent, a hung
haproxy that recovers, a start command that starts nothing."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import inotify_simple
import psutil
import pytest

from lbwatch import policy
from lbwatch.daemon import Agent
from lbwatch.events import Action, ActionResult, Service, Verb
from tests.conftest import needs
from tests.fakes import FakeController, config
from tests.test_agent import Rig
from tests.util import wait_for

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")


class RaisingController(FakeController):
    """Raises ``exc`` on the first ``times`` actions, then carries them out like the fake."""

    def __init__(self, exc: Exception, times: int = 1) -> None:
        super().__init__()
        self.exc = exc
        self.times = times

    def execute(self, action: Action) -> ActionResult:
        if len(self.executed) < self.times:
            self.executed.append(action)
            raise self.exc
        return super().execute(action)


class BeginRaisingController(FakeController):
    """``begin`` raises (a bug on the loop's side of an action); ``execute`` as the fake."""

    def begin(self, action: Action) -> None:
        super().begin(action)
        raise RuntimeError("begin broke")


@pytest.fixture
def fake_haproxy(tmp_path: Path) -> Iterator[Path]:
    """A process named haproxy with its pidfile: the agent sees haproxy running."""
    exe = tmp_path / "haproxy"
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "100"])
    pidfile = tmp_path / "haproxy.pid"
    pidfile.write_text(f"{proc.pid}\n")
    yield pidfile
    proc.kill()
    proc.wait()


def in_process_agent(
    tmp_path: Path, fake_haproxy: Path, controller: FakeController, **keepalived: object
) -> Agent:
    """An agent in this process over ``controller``, its loop turned by the test (``_once``):
    the fake haproxy runs, keepalived does not and is started at once; ``keepalived``: more of
    its settings."""
    cfg = config(
        agent={"run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state")},
        haproxy={"pidfile": str(fake_haproxy), "find_without_pidfile": False},
        keepalived={
            "pidfile": str(tmp_path / "keepalived.pid"),
            "find_without_pidfile": False,
            **keepalived,
        },
        policy={"keepalived_start_delay": 0},
        notify={"fifo": str(tmp_path / "fifo")},
    )
    agent = Agent(cfg, controller=controller)
    agent._sel.add(agent._workers.fileno(), agent._on_results)
    return agent


def test_an_executor_that_raises_is_a_failed_action_and_the_agent_goes_on(
    tmp_path: Path, fake_haproxy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The controller raises OSError (a full /tmp) on keepalived's start: the policy sees a
    failed start with the error, frees the slot and tries again after the backoff."""
    controller = RaisingController(OSError(28, "No space left on device"))
    agent = in_process_agent(tmp_path, fake_haproxy, controller, backoff={"initial": 0.1})
    caplog.set_level(logging.INFO, logger="lbwatch")
    try:
        agent._scan("start-up")
        agent._feed(policy.Primed())
        deadline = time.monotonic() + 10
        while len(controller.executed) < 2 and time.monotonic() < deadline:
            agent._once()
        starts = [a for a in controller.executed if a.verb is Verb.START]
        assert [a.service for a in starts] == [Service.KEEPALIVED] * 2
        assert starts[1].doing == "starting keepalived (attempt 2)"
        said = "start keepalived failed: internal error: OSError: [Errno 28] No space left"
        assert any(
            r.levelno == logging.ERROR and r.getMessage().startswith(said) for r in caplog.records
        )
        # The second start went through: the slot holds nothing stale.
        wait_until = time.monotonic() + 5
        while agent.state.keepalived.inflight is not None and time.monotonic() < wait_until:
            agent._once()
        assert agent.state.keepalived.inflight is None
        failed = [e for e in agent.publisher.history if e.outcome == "failed"]
        assert len(failed) == 1 and "OSError" in (failed[0].detail or "")
    finally:
        agent._shutdown()


def test_a_scan_that_fails_while_a_result_comes_in_does_not_cost_the_result(
    tmp_path: Path,
    fake_haproxy: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scan taken before a finished start is fed to the policy raises (a bug in one of its
    parts): it is logged with its traceback, and the result is still taken at once, so the slot
    does not wait for the action's deadline (40 s here) and expire as a timeout."""
    controller = FakeController()
    agent = in_process_agent(tmp_path, fake_haproxy, controller)
    caplog.set_level(logging.INFO, logger="lbwatch")
    try:
        agent._scan("start-up")
        real = agent.notify.check_fifo
        broken: list[int] = []

        def breaks_once(*args: object) -> None:
            if not broken:
                broken.append(1)
                raise RuntimeError("a bug in one part of the scan")
            real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(agent.notify, "check_fifo", breaks_once)
        agent._feed(policy.Primed())
        assert [a.service for a in controller.executed] == [Service.KEEPALIVED]
        deadline = time.monotonic() + 5
        while agent.state.keepalived.inflight is not None and time.monotonic() < deadline:
            agent._once()
        assert broken, "the scan did not fail: the test proves nothing"
        assert agent.state.keepalived.inflight is None
        assert [e.outcome for e in agent.publisher.history] == ["ok"]
        assert any("internal error in _scan" in r.getMessage() for r in caplog.records)
    finally:
        agent._shutdown()


class Opens:
    """Counts the opens of one file from the moment this is made (inotify IN_OPEN, whoever
    opens it); true once there have been ``want``."""

    def __init__(self, path: Path, want: int) -> None:
        self._inotify = inotify_simple.INotify()
        self._inotify.add_watch(path, inotify_simple.flags.OPEN)
        self.want = want
        self.count = 0

    def __call__(self) -> bool:
        events = self._inotify.read(timeout=0)
        self.count += sum(1 for e in events if e.mask & inotify_simple.flags.OPEN)
        return self.count >= self.want

    def close(self) -> None:
        self._inotify.close()


def quiet_after_start(rig: Rig) -> bool:
    """Start-up has played out: both services seen running and both start actions finished.
    Each of these is published after the line that says it (a start's "done", a process's
    "is running"), so the start-up's lines are all in the log."""
    doc = rig.status()
    return (
        doc is not None
        and doc.ready
        and rig.both_up()
        and [(a.action, a.outcome) for a in doc.recent_actions]
        == [("start haproxy", "ok"), ("start keepalived", "ok")]
    )


def shifted_stat(tmp: Path, shift: int) -> Path:
    text = Path("/proc/stat").read_text()
    fake = tmp / f"stat{shift}"
    fake.write_text(
        re.sub(r"^btime (\d+)$", lambda m: f"btime {int(m.group(1)) + shift}", text, flags=re.M)
    )
    return fake


@needs("haproxy", "start-stop-daemon", "unshare", "nsenter")
@root_only
@pytest.mark.usefixtures("subreaper")
def test_clock_step_under_a_running_agent_changes_nothing(rig: Rig) -> None:
    """The agent runs in a mount namespace of its own; /proc/stat's btime is shifted there by
    +1 s and then -1 h (what wall-clock steps do to it) while both services run: no action, no
    log line, and `lbwatch status` still finds the agent."""
    rig.start(prefix=("unshare", "--mount", "--propagation", "private"))
    wait_for(lambda: quiet_after_start(rig), 10, what="start-up played out")
    agent = rig.agent_pid()
    assert agent is not None
    before = rig.text()
    statuses = []
    for shift in (1, -3600):
        fake = shifted_stat(rig.tmp, shift)
        subprocess.run(
            ["nsenter", "-t", str(agent), "-m", "mount", "--bind", str(fake), "/proc/stat"],
            check=True,
            timeout=10,
        )
        seen = subprocess.run(
            ["nsenter", "-t", str(agent), "-m", "grep", "^btime", "/proc/stat"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        assert seen.strip() == re.search(r"^btime .*$", fake.read_text(), re.M).group(0)  # type: ignore[union-attr]
        # Rescans pass, counted by their reads of haproxy's pidfile (one read each, and nothing
        # else reads it meanwhile). They run one after another on the agent's loop, each with
        # its decisions and log lines, so the rescan that makes the third read counted here
        # starts after the second has finished, and the second started after the first read
        # counted, with the shift in place: a whole rescan has run under the shifted btime.
        opens = Opens(rig.ha_pid, want=3)
        try:
            wait_for(opens, 10, what="three rescans reading haproxy's pidfile")
        finally:
            opens.close()
        # `lbwatch status` in the agent's mount namespace, so it reads the shifted btime too.
        cli = [sys.executable, "-m", "lbwatch", "--config", str(rig.config), "status"]
        status = subprocess.run(
            ["nsenter", "-t", str(agent), "-m", *cli],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        statuses.append(status.returncode)
        subprocess.run(
            ["nsenter", "-t", str(agent), "-m", "umount", "/proc/stat"], check=True, timeout=10
        )
    assert statuses == [0, 0]
    assert rig.text() == before, rig.text()[len(before) :]
    actions = rig.doc().recent_actions
    assert [a.action for a in actions] == ["start haproxy", "start keepalived"]


@needs("haproxy", "start-stop-daemon")
@pytest.mark.usefixtures("subreaper")
def test_a_hang_that_recovers_brings_keepalived_back_as_healthy_again(rig: Rig) -> None:
    """haproxy stops answering (SIGSTOP): keepalived is stopped once, with the probe's failure as
    the one line; when it answers again keepalived comes back because the same master is healthy
    again, never because a master that never went down "is up again"."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    master = rig.pid("haproxy")
    assert master is not None
    hung = [master, *(c.pid for c in psutil.Process(master).children())]
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: rig.pid("fakeka") is None, 15, what="keepalived stopped")
    finally:
        for pid in hung:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: rig.pid("fakeka") is not None, 15, what="keepalived started again")
    lines = rig.text().splitlines()
    assert rig.pid("haproxy") == master
    assert sum("health check failing" in line for line in lines) == 1, lines
    assert any(
        f"haproxy master {master} is healthy again; starting keepalived" in ln for ln in lines
    )
    assert not any("is up again" in line for line in lines), lines


@needs("haproxy", "start-stop-daemon")
@pytest.mark.usefixtures("subreaper")
def test_a_start_that_starts_nothing_is_a_warning_once(rig: Rig) -> None:
    """keepalived's start command exits 0 and starts nothing: a WARNING the first time, and the
    attempts go on without repeating it."""
    rig.write_config(ka_start='["true"]', policy="start_confirm = 0.3")
    rig.start()
    wait_for(
        lambda: rig.text().count("starting keepalived (attempt") >= 3, 20, what="three attempts"
    )
    warnings = [
        line
        for line in rig.text().splitlines()
        if "exited 0 but no keepalived process appeared" in line
    ]
    assert len(warnings) == 1 and warnings[0].startswith("<4>start keepalived exited 0"), warnings
    assert "start keepalived failed" not in rig.text()  # the command itself did not fail


def test_an_action_whose_begin_raises_is_still_carried_out(
    tmp_path: Path, fake_haproxy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``begin`` raising on the loop is logged with its traceback, and the action it began is
    still executed on a worker: keepalived is started."""
    controller = BeginRaisingController()
    agent = in_process_agent(tmp_path, fake_haproxy, controller)
    caplog.set_level(logging.INFO, logger="lbwatch")
    try:
        agent._scan("start-up")
        agent._feed(policy.Primed())
        deadline = time.monotonic() + 10
        while not controller.executed and time.monotonic() < deadline:
            agent._once()
        assert [(a.service, a.verb) for a in controller.begun] == [(Service.KEEPALIVED, Verb.START)]
        assert controller.executed == controller.begun
        assert any(r.getMessage() == "internal error in begin; continuing" and r.exc_info
                   for r in caplog.records)  # fmt: skip
    finally:
        agent._shutdown()
