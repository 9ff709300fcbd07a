"""Run inside a private mount namespace (``unshare --mount --propagation private``): watch a
process, then make the kernel report a stepped wall clock the way a real step does, and print
what the watcher and ``lbwatch status``'s liveness check made of it, as JSON.

A wall-clock step moves /proc/stat's ``btime`` (boot time = wall clock - time since boot) by the
step; this bind-mounts a copy of /proc/stat with ``btime`` shifted, which only this namespace
sees. The wall clock itself is stepped by replacing ``time.time`` in this process. psutil's
``create_time()`` of the watched process is printed before and after, to show the simulation
really moves what a wall-clock-based identity would read.

    python clockstep.py WORKDIR
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lbwatch import pstat
from lbwatch.config import HaproxyCfg
from lbwatch.events import Service
from lbwatch.procs import ProcessWatcher
from lbwatch.status import read_status, write_status
from lbwatch.statusdoc import AgentInfo, StatusDoc


def shifted_stat(shift: int) -> str:
    text = Path("/proc/stat").read_text()
    return re.sub(
        r"^btime (\d+)$", lambda m: f"btime {int(m.group(1)) + shift}", text, flags=re.MULTILINE
    )


def main() -> None:
    work = Path(sys.argv[1])
    child = subprocess.Popen([str(work / "haproxy"), "100"])
    pidfile = work / "haproxy.pid"
    pidfile.write_text(f"{child.pid}\n")
    cfg = HaproxyCfg(pidfile=pidfile, find_without_pidfile=False)
    watcher = ProcessWatcher(Service.HAPROXY, cfg)
    me = pstat.read_stat(os.getpid())
    assert me is not None
    agent = AgentInfo(
        pid=os.getpid(), start_ticks=me.start_ticks, create_time=0.0, node="t", version="t"
    )
    write_status(work, StatusDoc(agent=agent, summary=""))
    out: dict[str, object] = {"first": [type(e).__name__ for e in watcher.rescan("start-up")]}
    pidfd = watcher.pidfd
    create_before = psutil.Process(child.pid).create_time()
    steps = []
    real_time = time.time
    try:
        for shift in (1, -3600, 86400):
            fake = work / f"stat{shift}"
            fake.write_text(shifted_stat(shift))
            subprocess.run(["mount", "--bind", str(fake), "/proc/stat"], check=True)
            time.time = lambda s=shift: real_time() + s  # type: ignore[misc]
            try:
                steps.append(
                    {
                        "shift": shift,
                        "create_time_moved_by": round(
                            psutil.Process(child.pid).create_time() - create_before, 3
                        ),
                        "events": [type(e).__name__ for e in watcher.rescan("scan")],
                        "pidfd_kept": watcher.pidfd == pidfd,
                        "agent_running": read_status(work).agent_running,
                    }
                )
            finally:
                time.time = real_time  # type: ignore[misc]
                subprocess.run(["umount", "/proc/stat"], check=True)
    finally:
        child.kill()
        child.wait()
    out["steps"] = steps
    print(json.dumps(out))


if __name__ == "__main__":
    main()
