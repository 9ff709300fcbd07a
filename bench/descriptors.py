"""The agent's descriptors, counted in /proc/PID/fd, on a lab node that uses everything lbwatch
can hold open at once: the HTTP probe, keepalived's notify FIFO and mail to an SMTP server, config
sync and the cluster watch over ssh to the other node, and ``[metrics]`` with the listener and a
textfile. Three phases on lb1: idle, an edit pushed to lb2, and the slow-client attack on the
listener (``tests/slowclients.py`` run inside lb1: 1,100 clients, a byte every 3 s each) with
haproxy killed during it. The agents run under the descriptor limit the unit sets
(systemd/lbwatch.service's LimitNOFILE=, or systemd's default soft limit, 1,024, without one).
The VIP's move from lb1 to lb2 after haproxy is killed is timed without and with the attack,
in the same run.

    sudo .venv/bin/python bench/descriptors.py            # --clients 1100 --attack 8

For each phase: the most descriptors the agent held at once (sampled every 20 ms) and what
they were at that moment (metrics connections told apart by their local port).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.test_lab import services_up
from tests.e2e.test_lab_sync import cfg_path, in_sync, save_like_vim, served
from tests.lab.netlab import METRICS_PORT, Lab, Node, haproxy_cfg, notify_toml
from tests.util import wait_for

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "lbwatch.service"
SYSTEMD_SOFT_NOFILE = 1024


def unit_nofile() -> int:
    match = re.search(r"^LimitNOFILE=(\d+)", UNIT.read_text(), re.M)
    return int(match.group(1)) if match else SYSTEMD_SOFT_NOFILE


def sockets(pid: int) -> dict[str, str]:
    """Socket inode -> "metrics" (a connection to the listener's port), "metrics listener",
    or "socket", from the agent's own network namespace's TCP table."""
    kinds: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local_port = int(f[1].rsplit(":", 1)[1], 16)
            state, inode = f[3], f[9]
            if local_port == METRICS_PORT:
                kinds[inode] = "metrics listener" if state == "0A" else "metrics connection"
    return kinds


def census(pid: int) -> collections.Counter[str]:
    """The agent's descriptors by kind, now."""
    out: collections.Counter[str] = collections.Counter()
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            links.append(str(fd.readlink()))
    tcp = sockets(pid)  # after the links: a connection listed is in the table, if still open
    for link in links:
        if link.startswith("socket:["):
            out[tcp.get(link[8:-1], "socket (other)")] += 1
        elif link.startswith("pipe:"):
            out["pipe"] += 1
        elif link.startswith("anon_inode:"):
            out[link.split(":", 1)[1].strip("[]")] += 1
        elif link.startswith("/dev/"):
            out[link] += 1
        else:
            out["file"] += 1
    return out


class Peak(threading.Thread):
    """The most descriptors ``pid`` held while it ran, and its census at that moment."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.most = 0
        self.at: collections.Counter[str] = collections.Counter()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                now = census(self.pid)
            except OSError:
                continue
            if sum(now.values()) > self.most:
                self.most, self.at = sum(now.values()), now

    def __enter__(self) -> Peak:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(5)


def start_lbwatch(node: Node, nofile: int) -> None:
    log = node.dir / "lbwatch.log"
    node.logs.append(log)
    with log.open("ab") as out:
        node.lbwatch = subprocess.Popen(
            node.enter(
                "prlimit",
                f"--nofile={nofile}:{nofile}",
                "--",
                sys.executable,
                "-m",
                "lbwatch",
                "--config",
                str(node.dir / "lbwatch.toml"),
                "run",
            ),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def vip_move(lab: Lab) -> float:
    """Kill haproxy on lb1: seconds until lb1 no longer holds the VIP and lb2 does; then wait
    until lb1 has it back (its keepalived restarted, priority 254 preempts)."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    began = time.monotonic()
    lb1.kill("haproxy")
    wait_for(lambda: not lb1.has_vip() and lb2.has_vip(), 30, interval=0.005, what="VIP on lb2")
    moved = time.monotonic() - began
    wait_for(lambda: services_up(lb1) and lb1.has_vip(), 60, what="lb1 healed, VIP back")
    return moved


def report(phase: str, peak: Peak) -> None:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(peak.at.items(), key=lambda kv: -kv[1]))
    print(f"{phase:<28} peak {peak.most:>4}   ({kinds})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1100)
    ap.add_argument("--attack", type=float, default=8.0, help="seconds of attack before the kill")
    ap.add_argument("--list", action="store_true", help="list the idle agent's descriptors")
    args = ap.parse_args()
    nofile = unit_nofile()
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        lab.enable_sync()
        lab.start_smtp_sink()
        for node in (lb1, lb2):
            extra = notify_toml() + (
                f'\n[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
                f'textfile = "{node.dir}/state/lbwatch.prom"\ntextfile_interval = 1\n'
            )
            node.write_configs(sync=True, keepalived_notify="fifo", lbwatch_extra=extra)
            start_lbwatch(node, nofile)
        wait_for(lambda: services_up(lb1) and services_up(lb2), 30, what="both nodes up")
        wait_for(lambda: in_sync(lb1, lb2), 30, what="in sync")
        wait_for(lb1.has_vip, 30, what="lb1 holding the VIP")
        pid = lb1.agent_pid()
        assert pid is not None
        limits = Path(f"/proc/{pid}/limits").read_text()
        print(f"lb1's agent {pid}, {re.search(r'Max open files.*', limits)[0]}")  # type: ignore[index]

        with Peak(pid) as idle:
            time.sleep(3.0)
        report("idle", idle)
        if args.list:
            for fd in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name)):
                with contextlib.suppress(OSError):
                    print(f"  {fd.name:>3} {fd.readlink()}")
        with Peak(pid) as push:
            save_like_vim(cfg_path(lb1), haproxy_cfg("v2"))
            wait_for(lambda: served(lab, lb2) == "v2", 30, what="lb2 serving v2")
            wait_for(lambda: in_sync(lb1, lb2), 30, what="in sync again")
        report("edit pushed to lb2", push)
        with Peak(pid) as quiet_peak:
            quiet = vip_move(lab)
        report("haproxy killed", quiet_peak)

        attacker = subprocess.Popen(
            lb1.enter(
                sys.executable,
                str(ROOT / "tests" / "slowclients.py"),
                str(METRICS_PORT),
                "--count",
                str(args.clients),
                "--seconds",
                str(args.attack + 60),
            ),
            stdout=subprocess.DEVNULL,
        )
        try:
            with Peak(pid) as attack:
                time.sleep(args.attack)
                scraped = "lbwatch_service_up" in lb1.scrape()
                loud = vip_move(lab)
            report(f"attack, {args.clients} clients", attack)
        finally:
            attacker.kill()
            attacker.wait(10)
        print(f"a scrape answered during the attack: {scraped}")
        print(f"VIP moved to lb2 {quiet:.3f} s after haproxy's death unattacked, {loud:.3f} s")
        print(f"descriptor limit {nofile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
