"""The agent's wiring with real kernel objects, without running its loop."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lbwatch.daemon import Agent
from lbwatch.events import Service
from tests.fakes import FakeController, config


def test_pidfd_reregistered_when_identity_changes_in_one_scan(tmp_path: Path) -> None:
    """A restart seen in a single rescan closes one pidfd and opens another, usually under the
    same number; the selector must follow, so the new process's death still wakes the loop."""
    fake = tmp_path / "haproxy"
    shutil.copy("/bin/sleep", fake)
    pidfile = tmp_path / "haproxy.pid"
    cfg = config(
        agent={"run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state")},
        haproxy={"pidfile": str(pidfile), "find_without_pidfile": False},
        keepalived={"pidfile": str(tmp_path / "none.pid"), "find_without_pidfile": False},
    )
    first = subprocess.Popen([str(fake), "100"])
    second = subprocess.Popen([str(fake), "100"])
    agent = Agent(cfg, controller=FakeController())
    try:
        pidfile.write_text(f"{first.pid}\n")
        agent._scan("start-up")
        watcher = agent.processes.watchers[Service.HAPROXY]
        first_fd = watcher.pidfd
        assert first_fd is not None
        pidfile.write_text(f"{second.pid}\n")  # replaced between two scans
        agent._scan("scan")
        assert watcher.view.main is not None and watcher.view.main.pid == second.pid
        second.kill()
        second.wait()
        callbacks = agent._sel.wait(5.0)
        assert callbacks, "the new process's pidfd did not wake the selector"
        callbacks[0]()
        assert watcher.view.main is None
    finally:
        for p in (first, second):
            p.kill()
            p.wait()
        agent._shutdown()
