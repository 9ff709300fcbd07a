"""`lbwatch run` as a real process, started the way systemd starts a unit's process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lbwatch.status import set_paused
from tests.util import wait_for


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

    def start(self, exec_pid: str = "$$", wrap: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """``wrap``: a command prefix that execs the rest (setpriv, tests/sandbox.py), so the
        Popen's PID stays lbwatch's."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
        }
        env["INVOCATION_ID"] = "5f1d2c3b4a5968778695a4b3c2d1e0f1"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *wrap,
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

    def wait_started(self, timeout: float) -> None:
        """Until lbwatch logged its start and wrote status.json; fails at once if it exited."""
        assert self.proc is not None
        proc = self.proc
        wait_for(lambda: self.started() or proc.poll() is not None, timeout, what="lbwatch start")
        assert self.started(), f"lbwatch exited {proc.returncode}:\n{self.text()}"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
