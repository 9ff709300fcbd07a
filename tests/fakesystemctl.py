"""A stand-in for systemctl where systemd does not run (the tests): one unit, haproxy, started
and stopped for real, and its state and jobs shown as systemd 252 shows them (the samples in
tests/test_unitjob.py).

``install(dir, argv, pidfile)`` writes ``dir/bin/systemctl``, which runs this file on ``dir``:
``dir/unit.json`` says how haproxy is started, ``dir/state.json`` is what systemd would show.
The verbs:

- ``start haproxy``, ``stop haproxy``: what systemd does, done before it returns;
- ``restart haproxy``: a restart job as systemd runs one: job 7, a restart while the master is
  stopped, then a start while the new master comes up and until ``ready_after`` has passed (a
  Type=notify unit's READY=1), then none; a master that cannot start leaves the unit failed;
- ``show --property=A,B -- haproxy``, ``show --property=JobType JOB``;
- ``crash``: SIGKILL to the master, the unit in auto-restart as under Restart=always (nothing
  restarts it: the agent's start does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

UNIT = "haproxy"
JOB = "7"


def install(where: Path, argv: list[str], pidfile: Path, ready_after: float = 0.3) -> Path:
    """The fake for one haproxy; returns the directory to put first on PATH."""
    (where / "bin").mkdir(parents=True, exist_ok=True)
    unit = {"argv": argv, "pidfile": str(pidfile), "ready_after": ready_after}
    (where / "unit.json").write_text(json.dumps(unit))
    _write(where, {"active": "inactive", "sub": "dead"})
    script = where / "bin" / "systemctl"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__)} {where} "$@"\n')
    script.chmod(0o755)
    return where / "bin"


def _write(where: Path, state: dict[str, object]) -> None:
    state = {"job": "", "job_type": "", "result": "success", "restarts": 0, **state}
    tmp = where / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.rename(where / "state.json")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _main_pid(unit: dict[str, object]) -> int:
    try:
        pid = int(Path(str(unit["pidfile"])).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pid if _alive(pid) else 0


def _stop(unit: dict[str, object], sig: int = signal.SIGTERM) -> None:
    pid = _main_pid(unit)
    if pid:
        os.kill(pid, sig)
    deadline = time.monotonic() + 5
    while pid and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _start(unit: dict[str, object]) -> bool:
    if _main_pid(unit):
        return True
    argv = [str(a) for a in unit["argv"]]  # type: ignore[attr-defined]
    if subprocess.run(argv, stdin=subprocess.DEVNULL, check=False).returncode != 0:
        return False
    deadline = time.monotonic() + 5
    while not _main_pid(unit) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(_main_pid(unit))


def main(where: Path, args: list[str]) -> int:
    unit = json.loads((where / "unit.json").read_text())
    verb, rest = args[0], args[1:]
    if verb == "show":
        return show(where, unit, rest)
    if verb == "crash":
        _write(where, {"active": "activating", "sub": "auto-restart", "result": "signal"})
        _stop(unit, signal.SIGKILL)
        return 0
    if rest != [UNIT]:
        print(f"Unit {rest[-1] if rest else '?'}.service not found.", file=sys.stderr)
        return 5
    if verb == "stop":
        _write(
            where, {"job": JOB, "job_type": "stop", "active": "deactivating", "sub": "stop-sigterm"}
        )
        _stop(unit)
        _write(where, {"active": "inactive", "sub": "dead"})
        return 0
    if verb == "restart":
        _write(
            where,
            {"job": JOB, "job_type": "restart", "active": "deactivating", "sub": "stop-sigterm"},
        )
        _stop(unit)
    elif verb != "start":
        print(f"fakesystemctl: {verb} is not faked", file=sys.stderr)
        return 1
    _write(where, {"job": JOB, "job_type": "start", "active": "activating", "sub": "start"})
    if not _start(unit):
        _write(where, {"active": "failed", "sub": "failed", "result": "exit-code"})
        return 1
    time.sleep(float(unit["ready_after"]) if verb == "restart" else 0.0)
    _write(where, {"active": "active", "sub": "running"})
    return 0


def show(where: Path, unit: dict[str, object], args: list[str]) -> int:
    props = next(a.split("=", 1)[1].split(",") for a in args if a.startswith("--property="))
    name = args[-1]
    state = json.loads((where / "state.json").read_text())
    if name.isdigit():
        if name != state["job"] or state.get("job_gone"):  # finished since Job= named it
            print(
                f"Failed to get properties: Unknown object '/org/freedesktop/systemd1/job/{name}'.",
                file=sys.stderr,
            )
            return 1
        values = {"JobType": state["job_type"], "State": "running"}
    else:
        values = {
            "MainPID": _main_pid(unit),
            "Result": state["result"],
            "NRestarts": state["restarts"],
            "ActiveState": state["active"],
            "SubState": state["sub"],
            "Job": state["job"],
        }
    for key, value in values.items():  # systemd's order, not the order asked
        if key in props:
            print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
