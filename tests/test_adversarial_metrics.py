"""A local client against ``[metrics] listen`` (issue 23, item 4): whatever it does to the
listener (send its request a byte every few seconds, never read the answer, open more
connections than the agent serves at once), other scrapes are still answered, the agent's
descriptors and threads stay bounded, and failover and status under the attack are what they
are unattacked, in the same run, under the descriptor limit the unit sets; a listener out of
descriptors rests instead of spinning. And when a descriptor does run out somewhere, the
process observer does not leave a dead haproxy standing as up, nor report a live one dead,
and a status write that failed is made again.

Each attack was written first and failed on the listener that spent a thread and a descriptor
per connection, with no cap (``ThreadingHTTPServer``). Nothing here is marked xfail.

The agents are real (tests/test_agent.py's Rig: real haproxy, a stand-in keepalived).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lbwatch import policy
from lbwatch.config import Config, MetricsCfg
from lbwatch.daemon import Agent
from lbwatch.events import Observation, PauseChanged, ProcessDown, Service
from lbwatch.loop import Selector
from lbwatch.metrics.output import Exporter
from lbwatch.observe import ProcessObserver
from lbwatch.procs import identify
from lbwatch.status import STATUS_FILE, is_paused, set_paused
from tests.conftest import free_port, needs, reap
from tests.fakes import FakeController, config
from tests.slowclients import SlowClients
from tests.test_agent import Rig
from tests.test_metrics import parse, scrape, value
from tests.util import load_status, wait_for

pytestmark = pytest.mark.usefixtures("subreaper")

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "lbwatch.service"
# What README "Metrics" promises of the listener: connections served at once, and the deadline
# for a whole request. The bounds below are these plus a few descriptors of slack.
CLIENTS = 16
DEADLINE = 5.0
# systemd's soft descriptor limit for a service whose unit sets no LimitNOFILE= (systemd >= 240:
# DefaultLimitNOFILE=1024:524288); the limit the attack ran into.
SYSTEMD_SOFT_NOFILE = 1024


# ---------------------------------------------------------------------------------------------
# Looking at the agent and attacking it


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Threads:\s+(\d+)$", status, re.M)
    assert match, status
    return int(match.group(1))


class Peak:
    """The most descriptors and threads ``pid`` had, sampled every 20 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fds = self.threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError):
                self.fds = max(self.fds, fds(self.pid))
                self.threads = max(self.threads, threads(self.pid))


@pytest.fixture
def attacker_fds() -> Iterator[None]:
    """This test process may open the attack's 1,100 connections and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def metered(rig: Rig, attacker_fds: None) -> tuple[Rig, int]:
    port = free_port()
    rig.write_config(extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    return rig, port


def exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` whole and read the answer to its end (the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def settled(pid: int) -> tuple[int, int]:
    """The agent's descriptors and threads once they have stopped moving (a probe's worker
    thread comes and goes): the least of a second's samples."""
    samples = []
    for _ in range(20):
        samples.append((fds(pid), threads(pid)))
        time.sleep(0.05)
    return min(f for f, _ in samples), min(t for _, t in samples)


def services_as_they_are(rig: Rig) -> bool:
    """The status names the haproxy and keepalived that run, as running."""
    doc = rig.doc()
    ha, ka = doc.services["haproxy"], doc.services["keepalived"]
    return (
        ha.running
        and ka.running
        and ha.pid == rig.pid("haproxy") is not None
        and ka.pid == rig.pid("fakeka") is not None
    )


def told(rig: Rig) -> str:
    """What the status says beside what runs, for a failure's message."""
    doc = rig.doc()
    said = {name: (v.running, v.pid) for name, v in doc.services.items()}
    return (
        f"status {said} ({doc.summary!r}); running: haproxy {rig.pid('haproxy')}, "
        f"keepalived {rig.pid('fakeka')}"
    )


# ---------------------------------------------------------------------------------------------
# The positive control


@needs("haproxy", "start-stop-daemon")
def test_a_scrape_answers_with_the_agents_status(metered: tuple[Rig, int]) -> None:
    """Unattacked, /metrics answers 200 with what the status says (both services up), in the
    format asked for; / answers, any other path is 404, any other method is not served."""
    rig, port = metered
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    s = parse(scrape(port))
    assert value(s, "lbwatch_agent_up") == 1
    assert value(s, "lbwatch_service_up", service="haproxy") == 1
    assert value(s, "lbwatch_service_up", service="keepalived") == 1
    assert (value(s, "process_open_fds") or 0) > 0
    om = exchange(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; "
        b"version=1.0.0\r\n\r\n",
    )
    head, _, body = om.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    assert b"application/openmetrics-text" in head
    assert body.endswith(b"# EOF\n")
    # A bare HTTP/1.0 request, as `printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc` sends it.
    plain = exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert b" 200 " in plain.split(b"\r\n")[0]
    assert b'lbwatch_service_up{service="haproxy"} 1.0' in plain
    assert b" 200 " in exchange(port, b"GET / HTTP/1.0\r\n\r\n").split(b"\r\n")[0]
    assert b" 404 " in exchange(port, b"GET /nope HTTP/1.0\r\n\r\n").split(b"\r\n")[0]
    refused = exchange(port, b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert refused.startswith(b"HTTP/1.") and b" 200 " not in refused.split(b"\r\n")[0]


# ---------------------------------------------------------------------------------------------
# Attacks on the listener


@needs("haproxy", "start-stop-daemon")
def test_slow_clients_take_no_thread_and_few_descriptors(metered: tuple[Rig, int]) -> None:
    """300 clients sending a byte a second: the agent starts no thread for them and holds at
    most the cap of connections, and other clients' scrapes are answered meanwhile, with the
    status's content."""
    rig, port = metered
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    pid = rig.agent_pid()
    assert pid is not None
    scrape(port)  # the listener has answered once, as everything after it will have
    idle_fds, idle_threads = settled(pid)
    with SlowClients(port, 300, gap=1.0) as slow, Peak(pid) as peak:
        wait_for(lambda: slow.opened >= 300 and slow.rounds >= 4, 60, what="3 s of attack")
        for _ in range(5):
            s = parse(scrape(port))
            assert value(s, "lbwatch_service_up", service="haproxy") == 1
            assert value(s, "lbwatch_service_up", service="keepalived") == 1
    assert peak.threads <= idle_threads + 3, (idle_threads, peak.threads)
    assert peak.fds <= idle_fds + CLIENTS + 4, (idle_fds, peak.fds)


@needs("haproxy", "start-stop-daemon")
def test_excess_connections_are_refused_at_once(metered: tuple[Rig, int]) -> None:
    """Forty connections more than the cap, none finishing its request: forty are let go at
    once (long before the request deadline), and no more than the cap stay open."""
    rig, port = metered
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    excess = 40
    with SlowClients(port, CLIENTS + excess, gap=0.1, persist=False) as slow:
        wait_for(lambda: slow.opened == CLIENTS + excess, 10, what="all connected")
        wait_for(lambda: slow.dropped >= excess, DEADLINE / 2, what=f"{excess} connections let go")
        assert len(slow.socks) <= CLIENTS
        assert b" 200 " in exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n").split(b"\r\n")[0]


@needs("haproxy", "start-stop-daemon")
def test_a_request_has_a_deadline_however_slowly_it_comes(metered: tuple[Rig, int]) -> None:
    """A client sending a byte every 0.2 s (each byte well within any per-read timeout) is let
    go once the request deadline has passed since it connected."""
    rig, port = metered
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    with SlowClients(port, 1, gap=0.2, persist=False) as slow:
        wait_for(lambda: slow.opened == 1, 5, what="connected")
        began = time.monotonic()
        wait_for(lambda: slow.dropped == 1, DEADLINE + 5, what="the slow client let go")
        held = time.monotonic() - began
    assert held < 2 * DEADLINE, held  # let go at the deadline, not by a per-read timeout


@needs("haproxy", "start-stop-daemon")
def test_clients_that_never_read_are_let_go(metered: tuple[Rig, int]) -> None:
    """200 clients that send a whole request with the smallest receive buffer and never read
    the answer: no thread is started for them, the agent's descriptors come back to idle
    within the deadline, and scrapes are answered meanwhile."""
    rig, port = metered
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    pid = rig.agent_pid()
    assert pid is not None
    scrape(port)
    idle_fds, idle_threads = settled(pid)
    mute: list[socket.socket] = []
    try:
        with Peak(pid) as peak:
            for _ in range(200):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
                s.settimeout(2.0)
                with contextlib.suppress(OSError):  # refused at the cap: that is fine
                    s.connect(("127.0.0.1", port))
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                mute.append(s)
            assert value(parse(scrape(port)), "lbwatch_service_up", service="haproxy") == 1
            wait_for(
                lambda: fds(pid) <= idle_fds + 2, DEADLINE + 5, what="descriptors back to idle"
            )
    finally:
        for s in mute:
            s.close()
    assert peak.threads <= idle_threads + 3, (idle_threads, peak.threads)
    assert peak.fds <= idle_fds + CLIENTS + 4, (idle_fds, peak.fds)


# ---------------------------------------------------------------------------------------------
# The attack, against the agent under the unit's descriptor limit


def unit_nofile() -> tuple[int, int]:
    """The (soft, hard) descriptor limit systemd gives the agent: the unit's LimitNOFILE=, or
    systemd's default soft limit where the unit sets none."""
    match = re.search(r"^LimitNOFILE=(\d+)(?::(\d+))?$", UNIT.read_text(), re.M)
    if match is None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        return SYSTEMD_SOFT_NOFILE, max(hard, SYSTEMD_SOFT_NOFILE)
    return int(match.group(1)), int(match.group(2) or match.group(1))


@dataclass(frozen=True)
class Failover:
    stopped: float  # haproxy killed -> keepalived stopped (lbwatch's failover)
    told: float  # haproxy killed -> the status no longer says that master runs


def kill_haproxy(rig: Rig) -> Failover:
    """SIGKILL haproxy's master and workers; how long until keepalived was stopped and until
    the status said so. Polled every 5 ms, at most 30 s."""
    ha, ka = rig.pid("haproxy"), rig.pid("fakeka")
    assert ha is not None and ka is not None
    victims = [ha, *(c.pid for c in psutil.Process(ha).children())]
    began = time.monotonic()
    for p in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    stopped = told = None
    while stopped is None or told is None:
        elapsed = time.monotonic() - began
        if stopped is None and rig.pid("fakeka") != ka:
            stopped = elapsed
        if told is None and rig.doc().services["haproxy"].pid != ha:
            told = elapsed
        if elapsed > 30:
            raise TimeoutError(
                f"30 s after haproxy {ha} was killed: keepalived stopped after {stopped} s, "
                f"the status told after {told} s; status: {rig.doc().summary!r}"
            )
        time.sleep(0.005)
    return Failover(stopped, told)


def healed(rig: Rig, before: tuple[int | None, int | None]) -> None:
    """haproxy was restarted, keepalived started again, and the status says so (bounded)."""
    wait_for(
        lambda: (
            rig.pid("haproxy") not in (None, before[0])
            and rig.pid("fakeka") not in (None, before[1])
            and services_as_they_are(rig)
        ),
        20,
        what="haproxy and keepalived back, and the status saying so",
    )


@needs("haproxy", "start-stop-daemon", "prlimit")
def test_slow_client_attack_under_the_units_limit_does_not_delay_failover(
    metered: tuple[Rig, int],
) -> None:
    """The issue's attack, 1,100 clients each sending a byte every 3 s (and reconnecting when
    let go) against an agent under the descriptor limit the unit sets, with haproxy killed
    during it: keepalived is stopped and the status says haproxy's master is gone as fast as in
    an unattacked run of the same agent (generous ratio), the status is right throughout,
    other clients' scrapes are answered, and the agent stays far from its limit."""
    rig, port = metered
    soft, hard = unit_nofile()
    rig.start(prefix=("prlimit", f"--nofile={soft}:{hard}", "--"))
    wait_for(rig.both_up, 15, what="both services up")
    pid = rig.agent_pid()
    assert pid is not None
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(rf"^Max open files\s+{soft}\s+{hard}\s", limits, re.M), limits
    scrape(port)

    before = rig.pid("haproxy"), rig.pid("fakeka")
    quiet = kill_haproxy(rig)
    healed(rig, before)

    with SlowClients(port, 1100, gap=3.0) as slow, Peak(pid) as peak:
        wait_for(lambda: slow.attempted >= 1100 and slow.rounds >= 3, 60, what="6 s of attack")
        assert services_as_they_are(rig), told(rig)
        s = parse(scrape(port))  # another client is served during the attack
        assert value(s, "lbwatch_service_up", service="haproxy") == 1
        before = rig.pid("haproxy"), rig.pid("fakeka")
        loud = kill_haproxy(rig)
        healed(rig, before)
        s = parse(scrape(port))
        assert value(s, "lbwatch_failovers_total", reason="haproxy_down") == 2
        assert value(s, "lbwatch_service_up", service="haproxy") == 1
        held = len(slow.socks)  # the attack went on throughout
    print(
        f"\nfailover: keepalived stopped {quiet.stopped:.3f} s unattacked, {loud.stopped:.3f} s "
        f"attacked; status told {quiet.told:.3f} s / {loud.told:.3f} s; agent peak "
        f"{peak.fds} descriptors, {peak.threads} threads (limit {soft}); attacker "
        f"{slow.opened} connections, {slow.dropped} let go, {held} held at the end"
    )
    assert loud.stopped <= 3 * quiet.stopped + 0.5, (quiet, loud)
    assert loud.told <= 3 * quiet.told + 0.5, (quiet, loud)
    assert peak.fds <= soft // 2, (peak.fds, soft)
    assert "Traceback" not in rig.text()


# ---------------------------------------------------------------------------------------------
# When a descriptor runs out anyway


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """This process's descriptor table full: the soft limit lowered to a little above the
    highest descriptor open, and every number below it taken, until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    held: list[int] = []
    try:
        for _ in range(highest + 8):
            try:
                held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def thread_cpu(tid: int) -> float:
    """Seconds of CPU the thread ``tid`` of this process has used (utime + stime)."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_listener_out_of_descriptors_does_not_spin() -> None:
    """When accept() finds no descriptor left, the listener waits instead of spinning on a
    listening socket that stays readable: its thread takes next to no CPU while clients wait,
    and it serves again once descriptors are back."""
    port = free_port()
    exporter = Exporter(MetricsCfg(listen=f"127.0.0.1:{port}"))
    clients = [socket.socket() for _ in range(4)]
    try:
        thread = next(t for t in threading.enumerate() if t.name == "lbwatch-metrics")
        assert thread.native_id is not None
        before = thread_cpu(thread.native_id)
        with out_of_descriptors():
            for c in clients:
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
            time.sleep(1.0)  # the window measured: clients waiting, no descriptor to accept
        used = thread_cpu(thread.native_id) - before
        assert used < 0.1, f"the listener's thread used {used:.2f} s of CPU in 1 s"

        def serves() -> bool:
            with contextlib.suppress(OSError):
                return b" 200 " in exchange(port, b"GET / HTTP/1.0\r\n\r\n", timeout=1.0)
            return False

        wait_for(serves, 5, what="the listener serving again")
    finally:
        for c in clients:
            c.close()
        exporter.close()


def watched(tmp_path: Path, find_without_pidfile: bool) -> tuple[Config, Path, Path]:
    """A stand-in haproxy (a copy of sleep under a name no other process on the host has), its
    pidfile, and a config that watches it (and a keepalived that never runs)."""
    fake = tmp_path / "lbwemfha"
    shutil.copy("/bin/sleep", fake)
    pidfile = tmp_path / "haproxy.pid"
    cfg = config(
        haproxy={
            "pidfile": str(pidfile),
            "process_name": fake.name,
            "find_without_pidfile": find_without_pidfile,
        },
        keepalived={
            "pidfile": str(tmp_path / "none.pid"),
            "process_name": "lbwemfka",
            "find_without_pidfile": False,
        },
    )
    return cfg, fake, pidfile


@pytest.mark.parametrize("find_without_pidfile", [True, False])
def test_a_death_is_reported_when_descriptors_have_run_out(
    tmp_path: Path, find_without_pidfile: bool
) -> None:
    """haproxy's master dies while the agent has no descriptor left: its pidfd (which needs no
    new descriptor) still has it reported down, the status cannot keep it up, and the
    exhausted pidfd does not keep waking the loop."""
    cfg, fake, pidfile = watched(tmp_path, find_without_pidfile)
    sel = Selector()
    seen: list[Observation] = []
    observer = ProcessObserver(cfg, sel, seen.append)
    daemon = subprocess.Popen([str(fake), "100"])
    try:
        pidfile.write_text(f"{daemon.pid}\n")
        observer.scan("start-up")
        watcher = observer.watchers[Service.HAPROXY]
        assert watcher.view.main is not None and watcher.pidfd is not None  # the control
        seen.clear()
        errors = []
        with out_of_descriptors():
            daemon.kill()
            select.select([watcher.pidfd], [], [], 5.0)  # needs no descriptor
            for callback in sel.wait(5.0):
                try:
                    callback()
                except OSError as exc:  # the agent's loop logs this and goes on
                    errors.append(exc)
            again = sel.wait(0.2)
        assert errors == []
        downs = [c for o in seen for c in o.changes if isinstance(c, ProcessDown)]
        assert [d.proc.pid for d in downs] == [daemon.pid]
        assert watcher.view.main is None
        assert again == [], "a readable pidfd keeps waking the loop"
    finally:
        daemon.kill()
        daemon.wait()
        observer.close()
        sel.close()


@pytest.mark.parametrize("find_without_pidfile", [True, False])
def test_a_scan_without_descriptors_does_not_report_a_live_daemon_dead(
    tmp_path: Path, find_without_pidfile: bool
) -> None:
    """A periodic scan that cannot open /proc or the pidfile (no descriptor left) reports no
    change: haproxy, still running, is not reported down (which would stop keepalived), and
    the scan after descriptors come back finds it as it was."""
    cfg, fake, pidfile = watched(tmp_path, find_without_pidfile)
    sel = Selector()
    seen: list[Observation] = []
    observer = ProcessObserver(cfg, sel, seen.append)
    daemon = subprocess.Popen([str(fake), "100"])
    try:
        pidfile.write_text(f"{daemon.pid}\n")
        observer.scan("start-up")
        watcher = observer.watchers[Service.HAPROXY]
        main = watcher.view.main
        assert main is not None and main.pid == daemon.pid  # the control
        seen.clear()
        errors = []
        with out_of_descriptors():
            try:
                observer.scan("scan")
            except OSError as exc:  # the agent's loop logs this and goes on
                errors.append(exc)
        assert errors == []
        assert seen == []
        assert watcher.view.main is main
        observer.scan("scan")
        assert seen == []
        assert watcher.view.main is not None and watcher.view.main.same_process(main)
    finally:
        daemon.kill()
        daemon.wait()
        observer.close()
        sel.close()


def test_a_leftover_childs_exit_without_descriptors_does_not_spin_the_loop(
    tmp_path: Path,
) -> None:
    """A child that a dead keepalived left behind exits while the agent has no descriptor left
    (keepalived found by scan as well as by pidfile, the default): its pidfd is let go, so it
    does not wake the loop over and over."""
    script = tmp_path / "lbwemfka"  # a shell script's process is named after the script
    # One child, and no fork after it: a loop of sleeps showed a sleep between its fork and its
    # exec, still under the script's name, as a second child now and then (seen in CI). The
    # child blocks opening a FIFO nobody writes; the script waits for it.
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    script.write_text(f"#!/bin/sh\n( read x < {fifo} ) &\nwait\n")
    script.chmod(0o755)
    pidfile = tmp_path / "keepalived.pid"
    cfg = config(
        haproxy={
            "pidfile": str(tmp_path / "none.pid"),
            "process_name": "lbwemfha",
            "find_without_pidfile": False,
        },
        keepalived={"pidfile": str(pidfile), "process_name": script.name},
    )
    sel = Selector()
    seen: list[Observation] = []
    observer = ProcessObserver(cfg, sel, seen.append)
    daemon = subprocess.Popen([str(script)])
    children: list[int] = []
    try:
        pidfile.write_text(f"{daemon.pid}\n")
        wait_for(lambda: identify(cfg.keepalived).children, 5, what="the script's child")
        observer.scan("start-up")
        watcher = observer.watchers[Service.KEEPALIVED]
        children = sorted(watcher.view.children)
        assert len(children) == 1
        daemon.kill()
        for callback in sel.wait(5.0):
            callback()
        assert list(watcher.leftover_fds) == children  # the control: a pidfd on the child
        errors = []
        with out_of_descriptors():
            os.kill(children[0], signal.SIGKILL)
            for callback in sel.wait(5.0):
                try:
                    callback()
                except OSError as exc:  # the agent's loop logs this and goes on
                    errors.append(exc)
            again = sel.wait(0.2)
        assert errors == []
        assert again == [], "a readable pidfd keeps waking the loop"
    finally:
        for pid in [daemon.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        daemon.wait()
        observer.close()
        sel.close()
        reap()


def test_a_status_write_that_failed_is_made_again_though_nothing_changed(
    tmp_path: Path,
) -> None:
    """Paused (so nothing changes after it), haproxy dies while the status cannot be written
    (the run directory unusable, as it is when no descriptor is left): once it can be written
    again, the status says haproxy is down, although the document has not changed since the
    write that failed."""
    fake = tmp_path / "lbwemfha"
    shutil.copy("/bin/sleep", fake)
    run, state, pidfile = tmp_path / "run", tmp_path / "state", tmp_path / "haproxy.pid"
    cfg = config(
        agent={"run_dir": str(run), "state_dir": str(state), "scan_interval": 0.1},
        haproxy={"pidfile": str(pidfile), "process_name": fake.name, "find_without_pidfile": False},
        keepalived={
            "pidfile": str(tmp_path / "none.pid"),
            "process_name": "lbwemfka",
            "find_without_pidfile": False,
        },
        notify={"fifo": str(tmp_path / "fifo")},
    )
    set_paused(state, True, "test")
    daemon = subprocess.Popen([str(fake), "100"])
    agent = Agent(cfg, controller=FakeController())
    try:
        pidfile.write_text(f"{daemon.pid}\n")
        agent._feed(PauseChanged(is_paused(state)))
        agent._scan("start-up")
        agent._feed(policy.Primed())
        doc = load_status(run / STATUS_FILE)
        assert doc is not None and doc.services["haproxy"].pid == daemon.pid  # the control
        run.rename(tmp_path / "run.away")
        run.write_text("not a directory\n")
        daemon.kill()
        deadline = time.monotonic() + 5
        while agent.state.haproxy.proc is not None and time.monotonic() < deadline:
            agent._once()
        assert agent.state.haproxy.proc is None
        run.unlink()
        (tmp_path / "run.away").rename(run)

        def says_down() -> bool:
            agent._once()  # a scan every 0.1 s publishes
            doc = load_status(run / STATUS_FILE)
            return doc is not None and not doc.services["haproxy"].running

        wait_for(says_down, 5, interval=0, what="the status saying haproxy is down")
    finally:
        daemon.kill()
        daemon.wait()
        agent._shutdown()
