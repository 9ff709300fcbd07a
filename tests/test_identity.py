"""Process identity against the real kernel: boot-relative start times that no wall-clock step
moves, uptime measured to the clock tick, and children that outlive their parent never taken
for it."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbwatch import pstat
from lbwatch.config import KeepalivedCfg
from lbwatch.events import LeftoversGone, ProcessDown, ProcessUp, Service
from lbwatch.procs import ProcessWatcher, identify, to_procid
from tests.conftest import needs
from tests.util import wait_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")


def test_parse_stat_counts_fields_from_the_last_parenthesis() -> None:
    """A process name may hold spaces and parentheses; the fields after it still parse."""
    line = "42 (a) b (c)) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 123456 1 2 3"
    st = pstat.parse_stat(42, line)
    assert st is not None
    assert (st.comm, st.state, st.ppid, st.session, st.start_ticks) == (
        "a) b (c)",
        "S",
        7,
        42,
        123456,
    )
    assert pstat.parse_stat(42, "garbage") is None
    assert pstat.parse_stat(42, "42 (x) S 1") is None


@needs("unshare", "mount")
@root_only
def test_a_wall_clock_step_changes_no_identity(tmp_path: Path) -> None:
    """With /proc/stat's btime shifted (what a wall-clock step does to it) and time.time()
    stepped, by +1 s, -1 h and +1 day: the watched process is the same process (no event, the
    same pidfd) and `lbwatch status` still finds its agent running. The control: psutil's
    create_time() of that process moves by exactly the step, so the simulation bites."""
    shutil.copy("/bin/sleep", tmp_path / "haproxy")
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            str(HERE / "clockstep.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    report = json.loads(out.stdout)
    assert report["first"] == ["ProcessUp"]
    assert [s["shift"] for s in report["steps"]] == [1, -3600, 86400]
    for step in report["steps"]:
        assert step["create_time_moved_by"] == step["shift"], step  # the control
        assert step["events"] == [], step
        assert step["pidfd_kept"], step
        assert step["agent_running"], step


def test_uptime_is_measured_to_the_clock_tick(tmp_path: Path) -> None:
    """A process's monotonic start is known within a clock tick of when it was really started,
    so keepalived_start_delay measures real uptime (btime, truncated to whole seconds, made it
    up to a second short)."""
    fake = tmp_path / "haproxy"
    shutil.copy("/bin/sleep", fake)
    tick = 1 / pstat.CLOCK_TICKS
    errors = []
    for _ in range(5):
        before = time.monotonic()
        child = subprocess.Popen([str(fake), "100"])
        after = time.monotonic()
        try:
            st = pstat.read_stat(child.pid)
            assert st is not None
            started = to_procid(st, "haproxy").started
            errors.append((started - before, after - started))
        finally:
            child.kill()
            child.wait()
    for early, late in errors:
        assert early >= -2 * tick and late >= -2 * tick, errors


# Both block opening a FIFO nobody writes to: alive, sleeping, still named as the fake. The
# namespace's init stays (as sleep) when the parent is killed, to adopt the orphan.
KA_TREE = """
{name} -c '{name} -c "read <{hold}" & echo $! >{child}; read <{hold}' &
echo $! >{parent}
exec sleep 60
"""


@needs("unshare")
@root_only
def test_children_that_outlive_their_parent_are_never_the_service(tmp_path: Path) -> None:
    """keepalived's VRRP child lives on with its parent killed (re-parented to the PID
    namespace's init): the watcher reports the parent down with one child left, never adopts
    the child as the new keepalived on any later scan, wakes through a pidfd and says when the
    child is gone, and finds a real new parent when one starts."""
    # A name of this run's own: the watcher scans the whole host for it (find_without_pidfile),
    # and a second run of this test beside it (another checkout's suite) once passed for a new
    # keepalived here.
    name = f"fka{os.getpid()}"[:15]
    shutil.copy("/bin/bash", tmp_path / name)
    hold = tmp_path / "hold"
    os.mkfifo(hold)
    parent_file, child_file = tmp_path / "parent", tmp_path / "child"
    script = KA_TREE.format(name=name, hold=hold, child=child_file, parent=parent_file)
    # A PID namespace of its own: the orphan goes to that namespace's init (a shell that waits),
    # not to this test process, as keepalived's children go to PID 1 on a node.
    init = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "bash", "-c", script],
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
    )
    cfg = KeepalivedCfg(
        pidfile=tmp_path / "keepalived.pid", process_name=name, find_without_pidfile=True
    )
    try:
        wait_for(lambda: child_file.exists() and parent_file.exists(), 10, what="the tree")
        watcher = ProcessWatcher(Service.KEEPALIVED, cfg)
        wait_for(lambda: identify(cfg).children, 10, what="parent with its child")
        events = watcher.rescan("start-up")
        assert [type(e) for e in events] == [ProcessUp]
        parent = watcher.view.main
        assert parent is not None
        (child,) = watcher.view.children
        # The pidfile names the parent, as keepalived's does.
        cfg.pidfile.write_text(f"{parent.pid}\n")
        os.kill(parent.pid, signal.SIGKILL)
        wait_for(
            lambda: (st := pstat.read_stat(child)) is not None and st.ppid != parent.pid,
            10,
            what="the child re-parented",
        )
        events = watcher.rescan("pidfd")
        assert [type(e) for e in events] == [ProcessDown]
        assert events[0].leftovers == 1  # type: ignore[union-attr]
        for _ in range(3):
            assert watcher.rescan("scan") == [], "an orphaned child was taken for keepalived"
            assert identify(cfg, watcher.known_children).main is None
        # The control: without what the watcher remembers, the orphan passes for keepalived.
        orphan = identify(cfg).main
        assert orphan is not None and orphan.pid == child
        # The orphan's exit makes its pidfd readable, and the next rescan says they are gone.
        (fd,) = watcher.leftover_fds.values()
        os.kill(child, signal.SIGKILL)
        assert select.select([fd], [], [], 5.0)[0], "the leftover's pidfd did not wake"
        wait_for(lambda: (st := pstat.read_stat(child)) is None or not st.alive, 5, what="exit")
        events = watcher.rescan("scan")
        assert [type(e) for e in events] == [LeftoversGone]
        assert watcher.leftover_fds == {}
        # A new parent (a session leader, as a daemon is) is found at once.
        new = subprocess.Popen(
            ["setsid", str(tmp_path / name), "-c", f"read <{hold}"],
        )
        try:
            cfg.pidfile.write_text(f"{new.pid}\n")
            wait_for(
                lambda: (st := pstat.read_stat(new.pid)) is not None and st.comm == name,
                10,
                what="the new parent to be running",
            )
            events = watcher.rescan("scan")
            assert [type(e) for e in events] == [ProcessUp]
            assert watcher.view.main is not None and watcher.view.main.pid == new.pid
        finally:
            new.kill()
            new.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            init.kill()
        init.wait(10)
