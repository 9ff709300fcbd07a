"""Adversarial tests of process identity and death detection against real processes: pidfd
wake-ups that arrive in the same loop turn as a rescan, haproxy's master re-exec on reload, and
a real keepalived's VRRP child outliving its parent.

A test here that fails shows a bug in lbwatch (see the report on branch ``adv``); it is not
marked xfail on purpose.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lbwatch import pstat
from lbwatch.config import HaproxyCfg, KeepalivedCfg
from lbwatch.events import (
    Action,
    HaproxyReloaded,
    Observation,
    Outcome,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    Verb,
)
from lbwatch.loop import Mailbox, Selector
from lbwatch.observe import ProcessObserver
from lbwatch.procs import ProcessWatcher, identify, open_pidfd, to_procid
from lbwatch.services import CommandController, terminate
from tests.conftest import free_port, haproxy_config, needs, reap
from tests.fakes import config
from tests.test_procs import accepts
from tests.util import wait_for

pytestmark = pytest.mark.usefixtures("subreaper")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def _alive(pid: int) -> bool:
    st = pstat.read_stat(pid)
    return st is not None and st.alive


def _state(pid: int) -> str:
    """The process's state letter in /proc/PID/stat ("" once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def test_a_stale_pidfd_wakeup_does_not_drop_the_new_masters_pidfd(tmp_path: Path) -> None:
    """One turn of the loop can find two descriptors ready: a worker's result (whose handler
    rescans before it takes the result) and the old master's pidfd. When the result comes
    first, its rescan already sees the old master gone and the new one running, and moves the
    pidfd to the new master. The old pidfd's callback, still in the same turn's list, must not
    then close the new master's pidfd: otherwise the new master's death is only seen by the
    periodic rescan (agent.scan_interval later), never at once."""
    fake = tmp_path / "lbwadvha"  # a name no other process on the host has
    shutil.copy("/bin/sleep", fake)
    pidfile = tmp_path / "haproxy.pid"
    cfg = config(
        haproxy={
            "pidfile": str(pidfile),
            "process_name": "lbwadvha",
            "find_without_pidfile": False,
        },
        keepalived={
            "pidfile": str(tmp_path / "none.pid"),
            "process_name": "lbwadvka",
            "find_without_pidfile": False,
        },
    )
    sel = Selector()
    seen: list[Observation] = []
    observer = ProcessObserver(cfg, sel, seen.append)
    results: Mailbox[str] = Mailbox()

    def on_results() -> None:  # what Agent._on_results does: look at the world, then take it
        observer.scan("scan")
        results.results()

    sel.add(results.fileno(), on_results)
    old = subprocess.Popen([str(fake), "100"])
    new: subprocess.Popen[bytes] | None = None
    try:
        pidfile.write_text(f"{old.pid}\n")
        wait_for(lambda: identify(cfg.haproxy).main is not None, 5, what="the old master")
        observer.scan("start-up")
        watcher = observer.watchers[Service.HAPROXY]
        assert watcher.pidfd is not None
        # A result becomes ready first, then the old master dies and a new one takes over.
        results.post("a worker's result")
        old.kill()
        # Its exit, which readies the pidfd, happens when the kernel gets to it: under load, after
        # the lines below. Waited for (a zombie until the finally reaps it), never assumed.
        wait_for(lambda: _state(old.pid) == "Z", 5, what="the old master's exit")
        new = subprocess.Popen([str(fake), "100"])
        pidfile.write_text(f"{new.pid}\n")
        wait_for(lambda: identify(cfg.haproxy).main is not None, 5, what="the new master")
        ready = sel.wait(5.0)
        # The control: both are ready in this one turn, the result first.
        assert len(ready) == 2 and ready[0] == on_results, ready
        for callback in ready:
            callback()
        assert watcher.view.main is not None and watcher.view.main.pid == new.pid
        assert watcher.pidfd is not None, "the new master's pidfd was closed"
        # The consequence: the new master dies and nothing wakes the loop.
        new.kill()
        assert sel.wait(2.0) != [], "the new master's death did not wake the loop"
    finally:
        for p in (old, new):
            if p is not None:
                p.kill()
                p.wait()
        observer.close()
        results.close()
        sel.close()


# ---------------------------------------------------------------------------------------------
# Properties that held


@pytest.fixture
def daemon_haproxy(tmp_path: Path) -> Iterator[tuple[HaproxyCfg, int]]:
    """A real haproxy started the way the Rig starts it: -W -D, the master a session leader."""
    monitor = free_port()
    cfg_file = haproxy_config(tmp_path / "haproxy.cfg", free_port(), monitor)
    pidfile = tmp_path / "haproxy.pid"
    subprocess.run(
        ["haproxy", "-W", "-D", "-f", str(cfg_file), "-p", str(pidfile)],
        check=True,
        timeout=10,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cfg = HaproxyCfg(pidfile=pidfile, find_without_pidfile=False)
    wait_for(lambda: identify(cfg).children, 5, what="the workers")
    wait_for(lambda: accepts(monitor), 5, what="the master to finish starting")
    yield cfg, monitor
    master = identify(cfg).main
    for pid in [*([master.pid] if master else []), *identify(cfg).children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reap()


@needs("haproxy")
def test_a_reexecuting_master_stays_the_master_through_reloads(
    daemon_haproxy: tuple[HaproxyCfg, int],
) -> None:
    """haproxy's master re-executes itself on every reload (same PID, same start ticks, a
    session leader): three reloads in a row are three reloads, never a down or up; the
    master's pidfd stays; and what the watcher remembers (the old and new workers) never
    excludes the master itself."""
    cfg, monitor = daemon_haproxy
    watcher = ProcessWatcher(Service.HAPROXY, cfg)
    try:
        assert [type(e) for e in watcher.rescan("start-up")] == [ProcessUp]
        master = watcher.view.main
        assert master is not None
        st = pstat.read_stat(master.pid)
        assert st is not None and st.session == st.pid  # -D: the master detached (setsid)
        pidfd = watcher.pidfd
        for _ in range(3):
            before = watcher.view.children
            # haproxy 2.6 drops a SIGUSR2 that arrives while its re-executed master is still
            # starting up: ask again (bounded) until new workers come; that is haproxy's
            # business, what is tested is how the watcher reads the result.
            for _attempt in range(5):
                os.kill(master.pid, signal.SIGUSR2)
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda b=before: identify(cfg).children - b, 3, what="new workers")
                    break
            assert identify(cfg).children - before, "haproxy did not reload"
            wait_for(lambda: accepts(monitor), 5, what="the new workers to serve")
            events = watcher.rescan("scan")
            assert [type(e) for e in events] == [HaproxyReloaded], events
            assert watcher.view.main is not None and watcher.view.main.same_process(master)
            assert watcher.pidfd == pidfd
            assert all(pid != master.pid for pid, _ in watcher.known_children)
            assert identify(cfg, watcher.known_children).main is not None
    finally:
        watcher.close()


# Becomes a child subreaper, runs argv, then reaps orphans until its stdin closes (at most 60 s).
SUBREAPER = """
import ctypes, os, select, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
subprocess.run(sys.argv[1:], check=True, timeout=10)
end = time.monotonic() + 60
while time.monotonic() < end and not select.select([0], [], [], 0.02)[0]:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass
"""

KA_CONF = """
global_defs {{
  router_id adv
  pid_file {pid}
}}
vrrp_instance VI_1 {{
  state BACKUP
  interface lbwv0
  virtual_router_id 51
  priority 100
  advert_int 1
  virtual_ipaddress {{
    192.0.2.10/32
  }}
}}
"""


@needs("keepalived", "unshare", "ip")
@root_only
def test_a_real_keepalived_vrrp_child_outliving_its_parent_is_never_keepalived(
    tmp_path: Path,
) -> None:
    """The real keepalived (2.2), in a network namespace of its own: its parent is a session
    leader, its VRRP child is not. SIGKILL the parent: the watcher reports keepalived down,
    and on every rescan while the orphaned VRRP child lives on (re-parented to this test, a
    subreaper) it never takes the child for keepalived, though a watcher that never saw the
    child would (the control)."""
    name = f"lbwadvka{os.getpid()}"[:15]  # its own: not another keepalived, nor another run's
    binary = tmp_path / name
    shutil.copy(shutil.which("keepalived") or "/usr/sbin/keepalived", binary)
    conf = tmp_path / "ka.conf"
    pid = tmp_path / "ka.pid"
    conf.write_text(KA_CONF.format(pid=pid))
    script = (
        "ip link set lo up && ip link add lbwv0 type veth peer name lbwv1 && "
        "ip link set lbwv0 up && ip link set lbwv1 up && "
        "ip addr add 192.0.2.1/24 dev lbwv0 && "
        f"exec {binary} -f {conf} -p {pid} -r {tmp_path}/vrrp.pid -c {tmp_path}/chk.pid"
    )
    # keepalived's orphans go to the nearest subreaper: a helper of their own, as PID 1 on a
    # node (not this test, whose own children a scan skips as lbwatch's start commands).
    holder = subprocess.Popen(
        [sys.executable, "-c", SUBREAPER, "unshare", "--net", "sh", "-c", script],
        stdin=subprocess.PIPE,
    )
    cfg = KeepalivedCfg(pidfile=pid, process_name=name, find_without_pidfile=True)
    watcher = ProcessWatcher(Service.KEEPALIVED, cfg)
    children: list[int] = []
    try:
        wait_for(lambda: identify(cfg).children, 10, what="keepalived's VRRP child")
        assert [type(e) for e in watcher.rescan("start-up")] == [ProcessUp]
        parent = watcher.view.main
        assert parent is not None
        children = sorted(watcher.view.children)
        for child in children:
            st = pstat.read_stat(child)
            assert st is not None and st.session == parent.pid != st.pid
        os.kill(parent.pid, signal.SIGKILL)
        wait_for(lambda: not _alive(parent.pid), 5, what="the parent's exit")
        events = watcher.rescan("pidfd")
        assert [type(e) for e in events] == [ProcessDown]
        orphan_seen = 0
        for _ in range(200):
            if not any(_alive(c) for c in children):
                break
            if identify(cfg).main is not None:
                orphan_seen += 1  # the control: a fresh watcher would take it
            changes = watcher.rescan("scan")
            # Only the news that the orphan is gone may come (LeftoversGone), never a new
            # keepalived.
            assert not [c for c in changes if isinstance(c, ProcessUp)], (
                "an orphaned VRRP child was taken for keepalived"
            )
            reap()
            time.sleep(0.01)  # polling, bounded above: the orphan exits on its own within ~1 s
        assert orphan_seen > 0, "the orphan was never there to be mistaken: the test proved nothing"
    finally:
        watcher.close()
        for p in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        master = identify(cfg).main
        if master is not None:
            os.kill(master.pid, signal.SIGKILL)
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


def test_a_pidfd_or_sigterm_is_never_aimed_at_a_process_that_reused_the_pid(
    tmp_path: Path,
) -> None:
    """An identity whose PID now names another process (same PID, other start ticks: the PID
    was reused) gets no pidfd and no SIGTERM; the same calls with the process's own identity
    do (the control)."""
    fake = tmp_path / "lbwadvka"
    shutil.copy("/bin/sleep", fake)
    child = subprocess.Popen([str(fake), "100"])
    try:
        wait_for(
            lambda: (st := pstat.read_stat(child.pid)) is not None and st.comm == "lbwadvka", 5
        )
        st = pstat.read_stat(child.pid)
        assert st is not None
        own = to_procid(st, "lbwadvka")
        other = replace(own, start_ticks=own.start_ticks - 1)  # the process that had the PID
        fd = open_pidfd(own)
        assert fd is not None  # the control
        os.close(fd)
        assert open_pidfd(other) is None
        res = terminate(other, 1.0)
        assert res.outcome is Outcome.OK and "already gone" in res.detail
        assert child.poll() is None and _alive(child.pid)
        res = terminate(own, 5.0)  # the control: its own identity reaches it
        assert res.outcome is Outcome.OK and "exited after SIGTERM" in res.detail
        assert child.wait(5) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


def _sigterm_pending(pid: int) -> bool:
    """SIGTERM waits in the process's shared pending set (/proc/PID/status ShdPnd, a hex mask
    with signal N at bit N-1): it was sent, and the process blocks it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    raise AssertionError("no ShdPnd in /proc/PID/status")


def test_a_stops_signal_at_issue_reaches_only_the_identified_keepalived() -> None:
    """``begin`` of a STOP sends SIGTERM at once to its target, without waiting for it to exit,
    and only to it: not to an identity whose PID was reused, not for a verb that is not a STOP
    (an ASK's target is haproxy's dead master, whose PID may be anyone's by then), and not
    without a target. The process blocks SIGTERM, so a signal sent stays visible as pending."""
    code = (
        "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
        "print('ready', flush=True); time.sleep(100)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        st = pstat.read_stat(child.pid)
        assert st is not None
        own = to_procid(st, "keepalived")
        ctl = CommandController(config(keepalived={"stop": ["true"]}), bus="/nonexistent/bus")

        def action(verb: Verb, target: ProcId | None) -> Action:
            return Action(Service.KEEPALIVED, verb, "test", "test", target=target)

        ctl.begin(action(Verb.STOP, replace(own, start_ticks=own.start_ticks - 1)))
        ctl.begin(action(Verb.ASK, own))
        ctl.begin(action(Verb.START, own))
        ctl.begin(action(Verb.STOP, None))
        assert not _sigterm_pending(child.pid)
        ctl.begin(action(Verb.STOP, own))  # the control: the STOP with its own identity
        assert _sigterm_pending(child.pid) and child.poll() is None
    finally:
        child.kill()
        child.communicate()
    ctl.begin(action(Verb.STOP, own))  # gone by now: nothing to signal, and no error


def test_a_stop_command_that_finds_keepalived_gone_after_the_signal_is_a_done_stop() -> None:
    """A stop command that fails because ``begin``'s SIGTERM already ended keepalived (as
    `start-stop-daemon --stop` without --oknodo, or a pkill, does) is a stop done, with the
    command's words kept; the same failing command while the target still runs stays a failure
    (the control)."""
    code = (
        "import signal, sys, time; "
        "sys.argv[1] == 'block' and signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
        "print('ready', flush=True); time.sleep(100)"
    )
    ctl = CommandController(config(keepalived={"stop": ["false"]}), bus="/nonexistent/bus")
    for how, outcome in (("block", Outcome.FAILED), ("die", Outcome.OK)):
        child = subprocess.Popen(
            [sys.executable, "-c", code, how], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            st = pstat.read_stat(child.pid)
            assert st is not None
            stop = Action(Service.KEEPALIVED, Verb.STOP, "test", "test",
                          target=to_procid(st, "keepalived"))  # fmt: skip
            ctl.begin(stop)
            if how == "die":
                assert child.wait(5) == -signal.SIGTERM  # gone before the command runs
            res = ctl.execute(stop)
            assert res.outcome is outcome, res.detail
            assert "exit 1" in res.detail
            if outcome is Outcome.OK:
                assert "had exited on lbwatch's SIGTERM" in res.detail
        finally:
            child.kill()
            child.communicate()
