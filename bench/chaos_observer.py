"""The chaos soak's observer: threads outside the agents that record, every ~50 ms, what each
node really does (its processes from /proc, whether it holds the VIP from `ip addr`, its
haproxy.cfg), the client's view through the VIP, and each agent's liveness as systemd's
watchdog would see it: sd_notify WATCHDOG=1 pings on a socket of ours in the bare lab, systemd's
own record of them on the systemd tier (``unit_pings``). lbwatch's own view (status.json) is
never trusted for a figure; the analysis is done afterwards (chaos_report).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.chaos_procs import scan
from tests.lab.netlab import VIP, Lab, Node, sh

UNIT_POLL = 0.5  # systemctl show of lbwatch.service, per node

POLL = 0.05


@dataclass(frozen=True)
class Snap:
    """A node's haproxy and keepalived processes (host PIDs) at one poll."""

    masters: tuple[int, ...]
    master_state: str  # "" none alive, "T" stopped, else running
    workers: tuple[int, ...]
    kl_parents: tuple[int, ...]
    kl_children: tuple[int, ...]

    def text(self) -> str:
        stopped = " STOPPED" if self.master_state == "T" else ""
        return (
            f"haproxy master {list(self.masters)}{stopped} workers {list(self.workers)}, "
            f"keepalived {list(self.kl_parents)} children {list(self.kl_children)}"
        )

    def pids(self) -> set[int]:
        return {*self.masters, *self.workers, *self.kl_parents, *self.kl_children}


@dataclass
class Observations:
    """Everything the observer saw, as (wall time, ...) records in order."""

    timeline: list[tuple[float, str, str]] = field(default_factory=list)  # (t, source, text)
    # (start, end, node, "dead" | "stopped"): keepalived up while the haproxy master was not
    unsafe: list[tuple[float, float, str, str]] = field(default_factory=list)
    procs: dict[str, list[tuple[float, Snap]]] = field(default_factory=dict)  # on change
    vip: list[tuple[float, tuple[str, ...]]] = field(default_factory=list)  # holders changed
    configs: list[tuple[float, str, str]] = field(default_factory=list)  # (t, node, sha256)
    contents: dict[str, str] = field(default_factory=dict)  # sha256 -> content
    pings: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # (t, message)
    client: list[dict] = field(default_factory=list)  # client.py probe lines
    polls: int = 0
    slow_polls: int = 0  # proc polls that took longer than 3 x POLL


def notify_socket(node: Node) -> Path:
    return node.dir / "notify.sock"


class Observer:
    """``cfg_path``: a node's haproxy.cfg as the host reads it. ``unit_pings``: lbwatch runs
    under systemd, whose watchdog gets its pings; the observer reads systemd's record of them."""

    def __init__(
        self, lab: Lab, cfg_path: Callable[[Node], Path], unit_pings: bool = False
    ) -> None:
        self.lab = lab
        self.cfg_path = cfg_path
        self.unit_pings = unit_pings
        self.obs = Observations()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.socks: dict[str, socket.socket] = {}
        self.client: subprocess.Popen[str] | None = None
        for node in lab.nodes.values():
            self.obs.pings[node.name] = []
            if unit_pings:
                continue
            path = notify_socket(node)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
            sock.settimeout(0.2)
            self.socks[node.name] = sock

    def note(self, source: str, text: str, t: float | None = None) -> None:
        with self.lock:
            self.obs.timeline.append((time.time() if t is None else t, source, text))

    def start(self, client_seconds: float) -> None:
        self.client = self.lab.client_probe(client_seconds)
        assert self.client.stdout is not None
        self.client.stdout.readline()  # {"probing": true}
        targets = [self._procs, self._vips, self._configs, self._client]
        pings = self._unit_pings if self.unit_pings else self._pings
        targets += [lambda n=n: pings(n) for n in self.lab.nodes]
        for target in targets:
            th = threading.Thread(target=target, daemon=True)
            th.start()
            self.threads.append(th)

    def stop(self) -> None:
        self.stopping.set()
        if self.client is not None:
            self.client.terminate()
            self.client.wait(10)
        for th in self.threads:
            th.join(10)
        for sock in self.socks.values():
            sock.close()
        if self.client is not None and self.client.stdout is not None:
            self.client.stdout.close()

    # -- threads --------------------------------------------------------------------------------

    def _procs(self) -> None:
        nodes = list(self.lab.nodes.values())
        last: dict[str, Snap] = {}
        unsafe_since: dict[str, tuple[float, str]] = {}
        while not self.stopping.is_set():
            began = time.monotonic()
            seen = scan(nodes)
            now = time.time()
            with self.lock:
                self.obs.polls += 1
                for name, procs in seen.items():
                    snap = Snap(
                        tuple(sorted(procs.haproxy_masters())),
                        procs.haproxy_master_state(),
                        tuple(sorted(procs.haproxy_workers())),
                        tuple(sorted(procs.keepalived_parents())),
                        tuple(sorted(procs.keepalived_children())),
                    )
                    if snap != last.get(name):
                        last[name] = snap
                        self.obs.procs.setdefault(name, []).append((now, snap))
                        self.obs.timeline.append((now, "observer", f"{name} {snap.text()}"))
                    state = snap.master_state
                    bad = "dead" if state == "" else "stopped" if state == "T" else ""
                    if bad and procs.keepalived_up():
                        unsafe_since.setdefault(name, (now, bad))
                    elif name in unsafe_since:
                        start, why = unsafe_since.pop(name)
                        self.obs.unsafe.append((start, now, name, why))
            took = time.monotonic() - began
            if took > 3 * POLL:
                with self.lock:
                    self.obs.slow_polls += 1
            self.stopping.wait(max(0.0, POLL - took))
        now = time.time()
        with self.lock:
            for name, (start, why) in unsafe_since.items():
                self.obs.unsafe.append((start, now, name, why))

    def _vips(self) -> None:
        last: tuple[str, ...] | None = None
        while not self.stopping.is_set():
            holders = []
            for node in self.lab.nodes.values():
                out = sh(
                    "ip", "-n", node.ns, "-4", "-o", "addr", "show", "dev", "eth0", check=False
                )
                if f" {VIP}/" in out.stdout:
                    holders.append(node.name)
            now = time.time()
            if tuple(holders) != last:
                last = tuple(holders)
                with self.lock:
                    self.obs.vip.append((now, last))
                    self.obs.timeline.append(
                        (now, "observer", f"VIP held by {list(last) or 'nobody'}")
                    )
            self.stopping.wait(POLL)

    def _configs(self) -> None:
        last: dict[str, str] = {}
        while not self.stopping.is_set():
            for node in self.lab.nodes.values():
                try:
                    content = self.cfg_path(node).read_text()
                except OSError:
                    continue
                sha = hashlib.sha256(content.encode()).hexdigest()
                if sha != last.get(node.name):
                    last[node.name] = sha
                    now = time.time()
                    tag = next((ln for ln in content.splitlines() if "X-Config" in ln), "?")
                    with self.lock:
                        self.obs.contents[sha] = content
                        self.obs.configs.append((now, node.name, sha))
                        self.obs.timeline.append(
                            (
                                now,
                                "observer",
                                f"{node.name} haproxy.cfg {sha[:8]} {tag.split()[-1]}",
                            )
                        )
            self.stopping.wait(POLL)

    def _pings(self, name: str) -> None:
        sock = self.socks[name]
        while not self.stopping.is_set():
            try:
                data = sock.recv(4096)
            except (socket.timeout, OSError):
                continue
            now = time.time()
            text = data.decode(errors="replace").replace("\n", " ")
            with self.lock:
                self.obs.pings[name].append((now, text))
                if "WATCHDOG=1" not in text:
                    self.obs.timeline.append((now, "observer", f"{name} sd_notify {text[:80]}"))

    def _unit_pings(self, name: str) -> None:
        """lbwatch.service as systemd sees it: each WATCHDOG=1 (WatchdogTimestampMonotonic
        moves; the container shares the host's CLOCK_MONOTONIC, so it converts to wall time)
        recorded as a ping, each new main process that is active (Type=notify: after its
        READY=1) as READY=1, each other state change on the timeline."""
        node = self.lab.nodes[name]
        props = ("MainPID", "ActiveState", "SubState", "WatchdogTimestampMonotonic", "NRestarts")
        argv = ["systemctl", "show", "lbwatch", *(f"-p{p}" for p in props)]
        last: dict[str, str] = {}
        while not self.stopping.is_set():
            try:
                out = node.run(*argv, timeout=10)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.stopping.wait(UNIT_POLL)
                continue
            now, mono = time.time(), time.monotonic()
            cur = dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
            notes = []
            wd = int(cur.get("WatchdogTimestampMonotonic") or 0)
            if wd and cur.get("WatchdogTimestampMonotonic") != last.get(
                "WatchdogTimestampMonotonic"
            ):
                notes.append((now - (mono - wd / 1e6), "WATCHDOG=1", False))
            state = (cur.get("ActiveState"), cur.get("SubState"), cur.get("MainPID"))
            if state != (last.get("ActiveState"), last.get("SubState"), last.get("MainPID")):
                text = f"lbwatch.service {state[0]}/{state[1]} main PID {state[2]}"
                text += f", {cur.get('NRestarts')} restarts"
                if state[0] == "active" and (
                    last.get("ActiveState") != "active" or state[2] != last.get("MainPID")
                ):
                    text = f"READY=1 {text}"
                notes.append((now, text, True))
            last = cur
            with self.lock:
                for t, text, shown in notes:
                    self.obs.pings[name].append((t, text))
                    if shown:
                        self.obs.timeline.append((t, "observer", f"{name} {text}"))
            self.stopping.wait(UNIT_POLL)

    def _client(self) -> None:
        assert self.client is not None and self.client.stdout is not None
        for line in self.client.stdout:
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                with self.lock:
                    self.obs.client.append(data)
                    if "t" in data:
                        self.obs.timeline.append(
                            (data["t"], "client", f"HTTP {data['status']} {data['lb']}".strip())
                        )


def watchdog_env(node: Node) -> dict[str, str]:
    """lbwatch's environment for the observer's watchdog: pings every second."""
    return {"NOTIFY_SOCKET": str(notify_socket(node)), "WATCHDOG_USEC": "2000000"}


def read_transitions(node: Node) -> list[tuple[float, str, str]]:
    """keepalived's own record of its transitions on ``node`` (its notify_STATE hooks):
    (wall time, state, instance). A line "TIME STATE" is VI_1's (the bare lab's one instance),
    "TIME STATE INSTANCE" names it (the systemd tier's two)."""
    out = []
    with contextlib.suppress(OSError):
        for line in node.transitions_path.read_text().splitlines():
            parts = line.split()
            if len(parts) in (2, 3):
                with contextlib.suppress(ValueError):
                    out.append((float(parts[0]), parts[1], (parts[2:] or ["VI_1"])[0]))
    return out
