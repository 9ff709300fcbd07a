"""Memory and idle CPU of the agent, on loopback without the lab: the real agent
(``python -m lbwatch run``) supervising a real haproxy (this script's child, with a
``monitor-uri`` frontend) and a stand-in keepalived (a copy of sleep named ``fakeka``), once
with the HTTP probe, once without it, and once with the previous requests-based probe (the
``lbwatch/health.py`` of ``--old-ref`` in a copy of the package on PYTHONPATH), interleaved.

    sudo .venv/bin/python bench/memory.py            # --runs 3 --idle 20

Each run starts a fresh agent, waits until it is ready (and, with a probe, haproxy healthy),
lets it settle, then samples RSS and USS once a second and CPU time over ``--idle`` seconds.
Figures are medians: of the samples within a run, then over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbwatch.status import STATUS_FILE
from tests.conftest import free_port, haproxy_config, reap
from tests.util import load_status, wait_for

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 40.0
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Variant:
    label: str
    probe: bool
    pythonpath: str | None = None  # a package directory that shadows the installed lbwatch


@dataclass(frozen=True)
class Figures:
    rss: float  # bytes
    uss: float | None
    cpu: float  # share of one core
    ssl_loaded: bool


class Rig:
    """haproxy (our child) and the files one agent needs, in a private directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.monitor = free_port()
        self.cfg = haproxy_config(tmp / "haproxy.cfg", free_port(), self.monitor)
        self.ha_pid = tmp / "haproxy.pid"
        self.ka_pid = tmp / "fakeka.pid"
        self.fakeka = tmp / "fakeka"
        shutil.copy("/bin/sleep", self.fakeka)
        self.haproxy = subprocess.Popen(
            ["haproxy", "-W", "-f", str(self.cfg), "-p", str(self.ha_pid)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.monitor_answers, 10, what="haproxy's monitor port")

    def monitor_answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.monitor), timeout=0.5).close()
        except OSError:
            return False
        return True

    def config(self, name: str, probe: bool) -> Path:
        q = json.dumps
        health = (
            f'[haproxy.health]\nurl = "http://127.0.0.1:{self.monitor}/health"\n' if probe else ""
        )
        stop_ha = ["start-stop-daemon", "--stop", "--quiet", "--oknodo", "--pidfile"]
        path = self.tmp / f"{name}.toml"
        # Defaults wherever the agent has them (scan every 1 s, probe every 1 s with a 1 s
        # timeout); only paths and commands point into this directory.
        path.write_text(
            f"""
[agent]
node_name = "bench"
run_dir = {q(str(self.tmp / name / "run"))}
state_dir = {q(str(self.tmp / name / "state"))}
log_level = "info"

[haproxy]
pidfile = {q(str(self.ha_pid))}
find_without_pidfile = false
start = ["haproxy", "-W", "-D", "-f", {q(str(self.cfg))}, "-p", {q(str(self.ha_pid))}]
stop = {q([*stop_ha, str(self.ha_pid), "--retry", "TERM/5/KILL/2"])}
{health}
[keepalived]
pidfile = {q(str(self.ka_pid))}
process_name = "fakeka"
find_without_pidfile = false
start = ["start-stop-daemon", "--start", "--quiet", "--background", "--make-pidfile",
         "--pidfile", {q(str(self.ka_pid))}, "--exec", {q(str(self.fakeka))}, "--", "100000"]
stop = {q([*stop_ha, str(self.ka_pid), "--retry", "TERM/5/KILL/2"])}

[policy]
keepalived_start_delay = 0.5

[notify]
fifo = {q(str(self.tmp / name / "keepalived.fifo"))}
"""
        )
        return path

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.ka_pid.read_text().split()[0])
            if psutil.Process(pid).name() == "fakeka":
                os.kill(pid, signal.SIGKILL)
        self.haproxy.send_signal(signal.SIGTERM)  # -W: the master stops its workers
        try:
            self.haproxy.wait(10)
        except subprocess.TimeoutExpired:
            self.haproxy.kill()
            self.haproxy.wait(5)
        reap()


def ready(run_dir: Path, probe: bool) -> bool:
    doc = load_status(run_dir / STATUS_FILE)
    return (
        doc is not None
        and doc.ready
        and bool(doc.services)
        and all(v.running for v in doc.services.values())
        and (not probe or doc.health.state == "up")
    )


def ssl_mapped(pid: int) -> bool:
    """The agent has loaded the ssl module (its _ssl extension is mapped)."""
    with open(f"/proc/{pid}/maps") as maps:
        return any("/_ssl." in line for line in maps)


def one_run(rig: Rig, variant: Variant, n: int, idle: float, settle: float) -> Figures:
    name = f"run{n}"
    config = rig.config(name, variant.probe)
    run_dir = rig.tmp / name / "run"
    env = dict(os.environ)
    if variant.pythonpath:
        env["PYTHONPATH"] = variant.pythonpath
    with (rig.tmp / f"{name}.log").open("ab") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "lbwatch", "--config", str(config), "run"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=rig.tmp,
        )
    try:
        wait_for(lambda: ready(run_dir, variant.probe), 30, what=f"{variant.label}: agent ready")
        time.sleep(settle)
        proc = psutil.Process(agent.pid)
        rss, uss = [], []
        before = proc.cpu_times()
        t0 = time.monotonic()
        for i in range(int(idle)):
            wait_for(lambda i=i: time.monotonic() - t0 >= i + 1, 2, interval=0.01)
            rss.append(proc.memory_info().rss)
            with contextlib.suppress(psutil.AccessDenied):
                uss.append(proc.memory_full_info().uss)
        after = proc.cpu_times()
        elapsed = time.monotonic() - t0
        if not ready(run_dir, variant.probe):
            raise RuntimeError(f"{variant.label}: the agent left its ready state while sampled")
        return Figures(
            rss=statistics.median(rss),
            uss=statistics.median(uss) if uss else None,
            cpu=(after.user + after.system - before.user - before.system) / elapsed,
            ssl_loaded=ssl_mapped(agent.pid),
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)


def old_package(tmp: Path, ref: str | None) -> tuple[str, str] | None:
    """A copy of lbwatch/ whose health.py is the one of ``ref`` (default: the commit before the
    probe stopped using requests): (directory for PYTHONPATH, commit), or None if git cannot
    tell."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    try:
        if ref is None:
            replaced = git(
                "log", "-1", "--format=%H", "-S", "import requests", "--", "lbwatch/health.py"
            )
            ref = f"{replaced}^"
        commit = git("rev-parse", "--short", ref)
        source = git("show", f"{commit}:lbwatch/health.py")
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"previous probe not measured: git: {exc}", file=sys.stderr)
        return None
    if "requests" not in source:
        print(f"previous probe not measured: {commit}'s health.py does not use requests")
        return None
    pkg = tmp / "old" / "lbwatch"
    shutil.copytree(ROOT / "lbwatch", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "health.py").write_text(source + "\n")
    return str(pkg.parent), commit


def mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh agents per variant")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds sampled per run")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after ready")
    parser.add_argument(
        "--old-ref", help="git ref whose requests-based health.py to measure as the before figure"
    )
    parser.add_argument("--no-old", action="store_true", help="skip the requests-based probe")
    args = parser.parse_args()
    for tool in ("haproxy", "start-stop-daemon", "sleep"):
        if shutil.which(tool) is None:
            print(f"bench/memory.py needs {tool}", file=sys.stderr)
            return 2
    # fakeka is started in the background by start-stop-daemon: it becomes our child, to reap.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    tmp = Path(tempfile.mkdtemp(prefix="lbwatch-membench-"))
    variants = [
        Variant("with the HTTP probe (every 1 s)", probe=True),
        Variant("without the probe", probe=False),
    ]
    old = None if args.no_old else old_package(tmp, args.old_ref)
    if old is not None:
        variants.append(Variant(f"with the previous probe (requests, {old[1]})", True, old[0]))
    results: dict[str, list[Figures]] = {v.label: [] for v in variants}
    print(
        f"agent memory and idle CPU: {len(variants)} variants x {args.runs} runs, "
        f"{args.idle:g} s sampled each, Python {sys.version.split()[0]}",
        flush=True,
    )
    rig = Rig(tmp)
    try:
        n = 0
        for r in range(args.runs):
            for variant in variants:
                n += 1
                fig = one_run(rig, variant, n, args.idle, args.settle)
                results[variant.label].append(fig)
                uss = mib(fig.uss) if fig.uss is not None else "-"
                print(
                    f"  run {r + 1}, {variant.label}: RSS {mib(fig.rss)}, USS {uss}, "
                    f"CPU {fig.cpu * 100:.3f} %, ssl loaded: {fig.ssl_loaded}",
                    flush=True,
                )
    finally:
        rig.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    head = f"| lbwatch idle, scan every 1 s | RSS | USS | CPU (% of a core) | vs {TARGET_MB:g} MB |"
    print(head)
    print("|---|---|---|---|---|")
    for label, figs in results.items():
        rss = statistics.median(f.rss for f in figs)
        usses = [f.uss for f in figs if f.uss is not None]
        uss = f"{mib(statistics.median(usses))}" if usses else "-"
        cpu = statistics.median(f.cpu for f in figs)
        margin = TARGET_MB - rss / 1e6
        verdict = f"{margin:.1f} MB under" if margin >= 0 else f"**over by {-margin:.1f} MB**"
        print(f"| {label} | {mib(rss)} ({mb(rss)}) | {uss} | {cpu * 100:.2f} % | {verdict} |")
    print()
    print(
        f"medians of {args.runs} runs; CPU time is counted in 10 ms ticks, so the CPU figures "
        f"are +-{1 / args.idle:.2f} % per run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
