"""How long after a haproxy master-worker reload an old worker still answers (root).

The number behind ``lbwatch/sync/canary.py``'s SETTLE: a haproxy serving a monitor frontend on
127.0.0.1:8404 is reloaded (SIGUSR2) onto a config without it. From the moment the new worker
appears under the master (what lbwatch's reload confirmation waits for), the frontend is probed
back to back for 0.2 s; any HTTP 200 then came from an old worker. Runs in a private network
namespace (``unshare -n``), so nothing else on the host is touched.

    sudo .venv/bin/python bench/reload_race.py --reloads 100
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CONFIG = """global
    stats socket {dir}/admin.sock mode 600 level admin
defaults
    mode http
    timeout connect 500ms
    timeout client 5s
    timeout server 5s
frontend web
    bind 127.0.0.1:8080
    http-request return status 200 content-type text/plain string ok
"""
MONITOR = """frontend monitor
    bind 127.0.0.1:8404
    monitor-uri /health
"""


def answered(timeout: float = 0.5) -> bool:
    """One GET of the monitor URI: did it get an HTTP 200?"""
    with socket.socket() as s:
        s.settimeout(timeout)
        try:
            s.connect(("127.0.0.1", 8404))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return b" 200 " in s.recv(100)
        except OSError:
            return False


def one_reload(tmp: Path) -> list[float]:
    """Start, reload onto the config without the monitor, and return when (seconds after the new
    worker appeared) a probe started that an old worker answered."""
    live, pidfile = tmp / "live.cfg", tmp / "haproxy.pid"
    live.write_text(CONFIG.format(dir=tmp) + MONITOR)
    pidfile.unlink(missing_ok=True)
    subprocess.run(["haproxy", "-W", "-D", "-f", str(live), "-p", str(pidfile)], check=True)
    deadline = time.monotonic() + 5
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if time.monotonic() > deadline:
            raise RuntimeError("haproxy wrote no pidfile")
        time.sleep(0.01)
    master = psutil.Process(int(pidfile.read_text().split()[0]))
    try:
        while not answered():  # serving ("Loading success"): a SIGUSR2 is not lost now
            if time.monotonic() > deadline:
                raise RuntimeError("haproxy does not answer")
        before = {c.pid for c in master.children()}
        live.write_text(CONFIG.format(dir=tmp))
        # haproxy 2.6 may drop a SIGUSR2 that comes just after it started: send it again.
        for _ in range(10):
            os.kill(master.pid, signal.SIGUSR2)
            resend = time.monotonic() + 0.5
            while not {c.pid for c in master.children()} - before and time.monotonic() < resend:
                time.sleep(0.002)
            if {c.pid for c in master.children()} - before:
                break
        else:
            raise RuntimeError("no new worker after 10 SIGUSR2")
        seen = time.monotonic()
        late = []
        while (started := time.monotonic()) < seen + 0.2:
            if answered():
                late.append(started - seen)
        return late
    finally:
        master.terminate()
        master.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reloads", type=int, default=100)
    args = ap.parse_args()
    if os.environ.get("LBWATCH_RACE_NETNS") != "1":
        env = {**os.environ, "LBWATCH_RACE_NETNS": "1"}
        script = "ip link set lo up && exec " + " ".join([sys.executable, *sys.argv])
        return subprocess.run(
            ["unshare", "-n", "sh", "-c", script], env=env, check=False
        ).returncode
    hits: list[float] = []
    reloads_hit = 0
    with tempfile.TemporaryDirectory(prefix="lbwatch-race-") as tmp:
        for _ in range(args.reloads):
            late = one_reload(Path(tmp))
            reloads_hit += bool(late)
            hits += late
    print(
        f"{args.reloads} reloads: an old worker answered a probe started after the new worker "
        f"appeared in {reloads_hit}; latest such probe started "
        + (f"{max(hits) * 1000:.1f} ms after" if hits else "never")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
