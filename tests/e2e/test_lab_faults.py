"""End to end under faults, on the two-node lab: a wall-clock step (as /proc/stat's btime shows
it), a haproxy master replaced behind lbwatch's back, a pidfile naming a worker, keepalived's
children outliving their parent, and config sync held by the maintenance pause."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lbwatch.statusdoc import ServiceView
from tests.e2e import test_lab, test_lab_sync
from tests.e2e.test_lab import pids, services_up
from tests.e2e.test_lab_sync import cfg_path, save_like_vim, served
from tests.lab.netlab import Lab, Node, haproxy_cfg
from tests.util import wait_for

pytestmark = test_lab.pytestmark

# The lab's fixtures, shared with the modules that define them.
cluster = test_lab.cluster
synced = test_lab_sync.synced

PIDFILE = "/run/haproxy.pid"
# How long "nothing happens" is watched: more than three of lbwatch's scans (scan_interval 1 s).
WINDOW = 3.5
LEVEL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (\w+) ")
ATTEMPT = re.compile(r"starting keepalived \(attempt (\d+)\)")


def said_since(node: Node, mark: int) -> str:
    return node.log_text()[mark:]


def hold(lab: Lab, seconds: float, keepalived: dict[str, set[int]]) -> int:
    """For ``seconds``, every ~0.1 s: lb1 holds the VIP, lb2 does not, and keepalived's
    processes on each node are the ones in ``keepalived``. Returns how many checks passed."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    checks = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not lb2.has_vip(), "lb2 took the VIP"
        assert lb1.has_vip(), "lb1 lost the VIP"
        for name, before in keepalived.items():
            assert pids(lab.nodes[name], "keepalived") == before, f"keepalived changed on {name}"
        checks += 1
        time.sleep(0.1)
    return checks


# ---------------------------------------------------------------------------------------------
# 1. A wall-clock step


def btime(stat: str) -> int:
    return int(next(line for line in stat.splitlines() if line.startswith("btime ")).split()[1])


def shifted_stat(node: Node, delta: int) -> Path:
    """A copy of the host's /proc/stat with btime moved by ``delta`` seconds: what a wall-clock
    step of ``delta`` does to it (btime is the wall clock minus the time since boot)."""
    lines = Path("/proc/stat").read_text().splitlines(keepends=True)
    out = [f"btime {btime(ln) + delta}\n" if ln.startswith("btime ") else ln for ln in lines]
    path = node.dir / f"proc-stat{delta:+d}"
    path.write_text("".join(out))
    return path


def node_btime(node: Node) -> int:
    """The boot time psutil computes inside the node (what its create_time() adds)."""
    return int(node.run(sys.executable, "-c", "import psutil; print(int(psutil.boot_time()))"))


def test_wall_clock_step_changes_nothing(cluster: Lab) -> None:
    """btime moved by +1 s and then by -3600 s on both nodes while they serve, as a wall-clock
    step moves it: no VRRP transition, no restart, no client error, not one log line above
    debug, and `lbwatch status` still finds its own agent."""
    nodes = list(cluster.nodes.values())
    keepalived = {n.name: pids(n, "keepalived") for n in nodes}
    haproxy = {n.name: pids(n, "haproxy") for n in nodes}
    marks = {n.name: len(n.log_text()) for n in nodes}
    real = btime(Path("/proc/stat").read_text())
    checks = 0
    with cluster.client_sample(2 * WINDOW + 6) as sampler:
        assert sampler.stdout is not None
        sampler.stdout.readline()  # sampling
        try:
            for delta in (1, -3600):
                for node in nodes:
                    node.bind_file(shifted_stat(node, delta), "/proc/stat")
                    # Positive control: the step is seen where the old identity looked.
                    assert node_btime(node) == real + delta
                checks += hold(cluster, WINDOW, keepalived)
            statuses = [n.lbwatch_cli("status") for n in nodes]  # raises unless it exits 0
            while sampler.poll() is None:  # the client is still watching: so are we
                checks += hold(cluster, 0.3, keepalived)
            result = json.loads(sampler.stdout.readline())
        finally:
            for node in nodes:
                node.unbind_all()
    print(f"client answers across the steps: {result}; {checks} VIP checks")
    assert result["answers"] == {"200 lb1": result["total"]} and result["total"] > 100
    assert checks > 50
    for node, out in zip(nodes, statuses):
        assert "lbwatch is not running" not in out and "keepalived up" in out, out
        assert pids(node, "haproxy") == haproxy[node.name]
        lines = said_since(node, marks[node.name]).splitlines()
        loud = [ln for ln in lines if (m := LEVEL.match(ln)) is None or m.group(1) != "DEBUG"]
        assert not loud, f"{node.name} said: {loud}"
        words = ("exited", "running", "stopping", "starting")
        assert not [ln for ln in lines if any(w in ln for w in words)], lines


# ---------------------------------------------------------------------------------------------
# 2. One scan, one observation


def pidfile_pid(node: Node) -> int:
    """The PID in the node's haproxy pidfile; 0 while it is missing or being written."""
    try:
        return int(node.read(PIDFILE).split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def test_master_replaced_while_lbwatch_looks_away_is_one_change(cluster: Lab) -> None:
    """lbwatch frozen while a second haproxy master takes the pidfile over and the old master
    and its workers are killed: the scan after the thaw sees one change of master, and
    keepalived and the VIP stay where they are."""
    lb1 = cluster.nodes["lb1"]
    keepalived = {n.name: pids(n, "keepalived") for n in cluster.nodes.values()}
    old_master = pidfile_pid(lb1)
    old = pids(lb1, "haproxy")  # the master and its workers, host PIDs
    assert len(old) >= 2
    agent = lb1.agent_pid()
    assert agent is not None
    mark = len(lb1.log_text())
    os.kill(agent, signal.SIGSTOP)
    try:
        lb1.start_haproxy()  # both masters' workers serve meanwhile (SO_REUSEPORT)
        wait_for(
            lambda: pidfile_pid(lb1) not in (0, old_master), 10, what="pidfile naming the new one"
        )
        new_master = pidfile_pid(lb1)
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pids(lb1, "haproxy") & old, 5, what="the old master and workers gone")
    finally:
        os.kill(agent, signal.SIGCONT)
    wait_for(
        lambda: (
            f"haproxy is running: haproxy {new_master} (was {old_master})" in said_since(lb1, mark)
        ),
        5,
        what="lbwatch reporting the new master",
    )
    hold(cluster, WINDOW, keepalived)
    said = said_since(lb1, mark)
    assert "stopping keepalived" not in said and "starting haproxy" not in said, said
    assert lb1.doc().services["haproxy"].pid == new_master
    wait_for(lambda: cluster.client_get() == (200, "lb1"), 5, what="HTTP 200 via lb1")


def test_pidfile_naming_a_worker_is_not_taken_for_the_master(cluster: Lab) -> None:
    """haproxy.pid rewritten to name a live worker of the master: for several scans lbwatch
    keeps the master it knows, reports no new one and leaves keepalived alone."""
    lb1 = cluster.nodes["lb1"]
    keepalived = {n.name: pids(n, "keepalived") for n in cluster.nodes.values()}
    master = pidfile_pid(lb1)
    workers = psutil.Process(lb1.host_pid(master)).children()
    assert workers and all(w.name() == "haproxy" for w in workers)
    worker = lb1.ns_pid(workers[0].pid)
    mark = len(lb1.log_text())
    lb1.write(PIDFILE, f"{worker}\n")
    try:
        assert pidfile_pid(lb1) == worker
        deadline = time.monotonic() + WINDOW
        while time.monotonic() < deadline:
            assert lb1.doc().services["haproxy"].pid == master
            hold(cluster, 0.3, keepalived)
    finally:
        lb1.write(PIDFILE, f"{master}\n")
    said = said_since(lb1, mark)
    for words in ("is running", "exited", "stopping keepalived", "starting"):
        assert words not in said, said
    assert cluster.client_get() == (200, "lb1")


# ---------------------------------------------------------------------------------------------
# 3. keepalived's children outlive their parent


@dataclass(frozen=True)
class Episode:
    """keepalived's parent killed, followed until a new keepalived runs and the orphans are
    gone. PIDs are the node's own (what lbwatch's log and status say)."""

    parent: int
    orphans: frozenset[int]
    # lbwatch's status every ~50 ms: (seconds since the kill, running, PID, attempts)
    samples: tuple[tuple[float, bool, int | None, int], ...]
    orphan_life: dict[int, float]  # how long each orphan outlived the parent, in seconds
    new_parent: int


def keepalived_status(node: Node) -> ServiceView | None:
    """keepalived as ``node``'s status document shows it; None until the agent has written one."""
    doc = node.status()
    return doc.services.get("keepalived") if doc is not None else None


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_keepalived_parent(node: Node) -> Episode:
    """SIGKILL keepalived's parent only (the one lbwatch reports, with every child it reports
    seen), then follow lbwatch's status and the orphans, bounded in time."""
    st = keepalived_status(node)
    assert st is not None and st.pid is not None, st
    parent = st.pid
    kids = {node.ns_pid(k.pid): k for k in psutil.Process(node.host_pid(parent)).children()}
    assert kids and set(st.children) == set(kids), (st, kids)
    os.kill(node.host_pid(parent), signal.SIGKILL)
    t0 = time.monotonic()
    samples: list[tuple[float, bool, int | None, int]] = []
    life: dict[int, float] = {}
    new = 0
    while (not new or len(life) < len(kids)) and time.monotonic() < t0 + 20:
        now = time.monotonic() - t0
        st = keepalived_status(node)
        if st is not None:
            samples.append((now, st.running, st.pid, st.attempts))
            seen = st.pid
            if st.running and seen is not None and seen not in kids and seen != parent and not new:
                new = seen
        for pid, proc in kids.items():
            if pid not in life and not alive(proc):
                life[pid] = round(now, 2)
        time.sleep(0.05)
    assert new, f"no new keepalived within 20 s: {samples[-5:]}"
    assert len(life) == len(kids), f"orphans still alive after 20 s: {set(kids) - set(life)}"
    return Episode(parent, frozenset(kids), tuple(samples), life, new)


def check_episode(ep: Episode, said: str, floor: int) -> None:
    """No orphan ever passed for keepalived, and the attempt count never fell below ``floor``
    once it had reached it, before the new keepalived appeared."""
    for orphan in ep.orphans:
        assert not re.search(rf"keepalived is running: keepalived {orphan}\b", said), said
    assert not [s for s in ep.samples if s[1] and s[2] in ep.orphans], ep.samples
    counts = [s[3] for s in ep.samples]
    reached = next((i for i, n in enumerate(counts) if n >= floor), None)
    assert reached is not None and min(counts[reached:]) >= floor, ep.samples


def test_keepalived_children_outliving_their_parent_never_pass_for_it(cluster: Lab) -> None:
    """keepalived's parent killed on lb2, then the new one at once: the orphaned VRRP child is
    never reported as keepalived, the attempt count never drops back while it lives, and the
    second kill's start goes on counting from the first's."""
    lb2 = cluster.nodes["lb2"]
    wait_for(
        lambda: (ka := keepalived_status(lb2)) is not None and ka.attempts == 0,
        15,
        what="keepalived stable",
    )
    mark = len(lb2.log_text())
    first = kill_keepalived_parent(lb2)
    said = said_since(lb2, mark)
    starts = [int(n) for n in ATTEMPT.findall(said)]
    assert starts and starts[0] == 1, said
    check_episode(first, said, 1)
    # The new keepalived is not stable yet (backoff.stable_after 5 s): its attempts stand.
    wait_for(
        lambda: (ka := keepalived_status(lb2)) is not None and ka.children,
        5,
        what="the new keepalived's child seen",
    )
    mark = len(lb2.log_text())
    second = kill_keepalived_parent(lb2)
    said = said_since(lb2, mark)
    again = [int(n) for n in ATTEMPT.findall(said)]
    assert again and again[0] == max(starts) + 1, (starts, said)
    # One start each: lbwatch waited for the orphans rather than starting a keepalived that
    # refuses to run beside them.
    assert (starts, again) == ([1], [2]), (starts, again)
    check_episode(second, said, max(starts))
    print(
        f"starts: {starts} then {again}; orphans outlived their parent by "
        f"{first.orphan_life} and {second.orphan_life} s; new keepalived seen after "
        f"{first.samples[-1][0]:.2f} and {second.samples[-1][0]:.2f} s"
    )
    wait_for(lambda: services_up(lb2), 15, what="lb2's services up")


def test_keepalived_killed_alone_comes_back_in_one_attempt(cluster: Lab) -> None:
    """keepalived's parent killed on lb2 while its VRRP child lives on for a moment (keepalived
    refuses to start while it runs): lbwatch waits for that child, then one start attempt
    brings keepalived back at once, with no "no keepalived process appeared" warning."""
    lb2 = cluster.nodes["lb2"]
    wait_for(
        lambda: (ka := keepalived_status(lb2)) is not None and ka.attempts == 0,
        15,
        what="keepalived stable",
    )
    mark = len(lb2.log_text())
    ep = kill_keepalived_parent(lb2)
    said = said_since(lb2, mark)
    print(f"new keepalived after {ep.samples[-1][0]:.2f} s; orphans lived {ep.orphan_life} s")
    assert "no keepalived process appeared" not in said, said
    assert ATTEMPT.findall(said) == ["1"], said
    assert "child process(es) it left to exit before starting keepalived again" in said, said
    assert "the child processes it left have exited; starting keepalived (attempt 1)" in said
    # Back within a moment of the last orphan's exit, not after start_confirm (5 s).
    back = ep.samples[-1][0]
    assert back < max(ep.orphan_life.values()) + 1.5, (back, ep.orphan_life)


# ---------------------------------------------------------------------------------------------
# 4. The pause holds config sync


def staged(node: Node) -> list[str]:
    """Versions waiting in the node's staging directory."""
    return [p.name for p in (node.dir / "staging").iterdir() if p.name.startswith("haproxy.cfg@")]


@pytest.mark.skipif(
    not Path("/usr/sbin/sshd").exists() or not Path("/usr/bin/rrsync").exists(),
    reason="needs sshd and rrsync",
)
def test_pause_holds_config_sync_until_resume(synced: Lab) -> None:
    """lb2 paused: a new haproxy.cfg saved on lb1 is served by lb1 and waits in lb2's staging
    while lb2 serves the old one and says what it would do; on resume lb2 installs it."""
    lb1, lb2 = synced.nodes["lb1"], synced.nodes["lb2"]
    lb2.lbwatch_cli("pause")
    wait_for(lambda: (doc := lb2.status()) is not None and doc.paused, 5, what="lb2 paused")
    mark = len(lb2.log_text())
    save_like_vim(cfg_path(lb1), haproxy_cfg("v2"))
    wait_for(lambda: served(synced, lb1) == "v2", 15, what="lb1 serving v2")
    wait_for(lambda: staged(lb2), 15, what="v2 staged on lb2")
    wait_for(
        lambda: "paused: would sync haproxy" in said_since(lb2, mark), 10, what="lb2 holding it"
    )
    held = time.monotonic()
    while time.monotonic() < held + 3:
        assert served(synced, lb2) == "v1"
        assert staged(lb2)
        time.sleep(0.2)
    assert cfg_path(lb2).read_text() == haproxy_cfg("v1")
    lb2.lbwatch_cli("resume")
    resumed = time.monotonic()
    wait_for(lambda: served(synced, lb2) == "v2", 10, what="lb2 serving v2 after resume")
    print(f"lb2 served v2 {time.monotonic() - resumed:.2f} s after resume")
    assert cfg_path(lb2).read_text() == haproxy_cfg("v2")
    wait_for(lambda: not staged(lb2), 5, what="lb2's staging emptied")
