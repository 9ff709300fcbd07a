"""The receiver's side of the cluster view: ``GET node.json`` and the long poll ``WAIT``, on the
real receiver process spoken to by hand. A view is served only while the agent that wrote it
runs and renews its heartbeat; otherwise the answer is ``STALE`` with what the node's kernel
holds of the view's VIPs. The poll answers a change at once, an unchanged view after its
seconds, a view going stale as soon as it does, and a sender that hangs up ends it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch import pstat
from lbwatch.cluster.nodeview import NodeWriter
from lbwatch.heartbeat import STALE_AFTER
from lbwatch.statusdoc import NodeAgent, NodeView, VipsView
from tests.conftest import fill
from tests.test_sync_sink import LIMIT, Conn
from tests.util import wait_for


def ticks_of(pid: int) -> int:
    """Field 22 of /proc/PID/stat, read here apart from lbwatch's pstat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rsplit(")", 1)[1].split()[19])


def view(
    pid: int,
    ticks: int,
    node: str = "lb2",
    state: str = "BACKUP",
    heartbeat: Path | None = None,
    vips: tuple[str, ...] = ("192.0.2.100",),
) -> bytes:
    """A node view as the agent writes it (the receiver reads its agent part and, for a view
    that is not current, its VIPs)."""
    agent: dict[str, object] = {"pid": pid, "start_ticks": ticks, "version": "test"}
    if heartbeat is not None:
        agent["heartbeat"] = str(heartbeat)
    doc = {
        "node": node,
        "agent": agent,
        "vrrp": {"VI_1": {"state": state, "vips": list(vips), "held": []}},
    }
    return json.dumps(doc).encode()


# A stand-in for the agent's loop: lbwatch's own heartbeat, renewed as the loop renews it.
BEATING = """
import sys, time
from pathlib import Path
from lbwatch.heartbeat import Heartbeat
beat = Heartbeat(Path(sys.argv[1]))
while True:
    beat.renew(time.monotonic())
    time.sleep(0.05)
"""


@contextlib.contextmanager
def beating_agent(where: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process renewing its heartbeat (in ``where``), as a running agent does; stop it with
    SIGSTOP and its heartbeat goes stale. Killed (resumed first) at the end."""
    path = where / "heartbeat"
    proc = subprocess.Popen([sys.executable, "-c", BEATING, str(path)])
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert path.exists(), "the stand-in agent wrote no heartbeat"
        yield proc, path
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.fixture
def beating(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    with beating_agent(tmp_path) as agent:
        yield agent


def answer_within(conn: Conn, seconds: float) -> tuple[bytes, bytes]:
    """The receiver's next answer, failing if none comes within ``seconds``."""
    poller = select.poll()
    poller.register(conn.stdout.fileno(), select.POLLIN)
    assert poller.poll(seconds * 1000), f"no answer within {seconds:g} s"
    return read_answer(conn)


def this_view(state: str = "MASTER") -> NodeView:
    """This process's view as its agent would write it."""
    me = pstat.read_stat(os.getpid())
    assert me is not None
    return NodeView(
        node="lb2",
        agent=NodeAgent(pid=os.getpid(), start_ticks=me.start_ticks, version="t"),
        vrrp={"VI_1": VipsView(state=state, vips=["192.0.2.100"], held=["192.0.2.100"])},
    )


def alive_view(state: str = "BACKUP") -> bytes:
    return view(os.getpid(), ticks_of(os.getpid()), state=state)


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def conn(staging: Path) -> Iterator[Conn]:
    c = Conn(staging)
    assert c.greeting() == b"LBWATCH-SYNC 1 %d\n" % LIMIT
    yield c
    c.kill()


def replace_file(path: Path, data: bytes) -> None:
    """As the agent writes it: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def wait_request(conn: Conn, held: str, seconds: int) -> None:
    conn.send(f"WAIT node.json {held} {seconds}\n".encode())


def read_answer(conn: Conn) -> tuple[bytes, bytes]:
    head = conn.answer()
    body = conn.stdout.read(int(head[5:])) if head.startswith(b"DATA ") else b""
    return head, body


def test_a_view_is_served_while_its_agent_runs_and_not_once_it_ended(
    staging: Path, conn: Conn
) -> None:
    """GET node.json answers the view while the PID and start time in it are a running
    process's; once that process has ended (or the PID is another process's), it answers
    STALE ended with the VIPs the kernel holds (none here), never the view."""
    data = alive_view()
    (staging / "node.json").write_bytes(data)
    assert conn.get("node.json") == (b"DATA %d\n" % len(data), data)
    ended = subprocess.Popen(["true"])
    ended.wait()
    replace_file(staging / "node.json", view(ended.pid, 1))
    head, _ = conn.get("node.json")
    assert head == b"STALE ended - lbwatch is not running (its agent, PID %d, has ended)\n" % (
        ended.pid
    )
    # This process's PID with another start time: a PID reused by another process.
    replace_file(staging / "node.json", view(os.getpid(), ticks_of(os.getpid()) + 1))
    assert conn.get("node.json")[0].startswith(b"STALE ended - lbwatch is not running")
    replace_file(staging / "node.json", b"[]")
    assert conn.get("node.json")[0] == b"ERR node.json is not a node view\n"
    assert conn.finish() == (0, "")


def test_a_wait_answers_a_change_at_once_and_an_unchanged_view_after_its_seconds(
    staging: Path, conn: Conn
) -> None:
    """WAIT with the held hash: SAME after the seconds given when nothing changed, the new view
    within a fraction of a second of its rename; with another hash, the view at once."""
    first = alive_view()
    (staging / "node.json").write_bytes(first)
    wait_request(conn, "-", 5)
    assert read_answer(conn) == (b"DATA %d\n" % len(first), first)
    held = hashlib.sha256(first).hexdigest()
    started = time.monotonic()
    wait_request(conn, held, 1)
    assert read_answer(conn) == (b"SAME\n", b"")
    took = time.monotonic() - started
    assert 0.9 <= took < 5, took
    wait_request(conn, held, 30)
    time.sleep(0.3)  # the poll is under way before the change (no sleep-and-hope: any order works)
    second = alive_view(state="MASTER")
    changed_at = time.monotonic()
    replace_file(staging / "node.json", second)
    assert read_answer(conn) == (b"DATA %d\n" % len(second), second)
    print(f"\nchange answered after {time.monotonic() - changed_at:.3f} s")
    assert time.monotonic() - changed_at < 5
    assert conn.finish() == (0, "")


def test_a_wait_ends_stale_when_the_agent_ends_meanwhile(staging: Path, conn: Conn) -> None:
    """An agent that dies during a poll, its view unchanged, is told within seconds, not
    when the poll's time is up."""
    agent = subprocess.Popen(["sleep", "60"])
    try:
        data = view(agent.pid, ticks_of(agent.pid))
        (staging / "node.json").write_bytes(data)
        wait_request(conn, hashlib.sha256(data).hexdigest(), 60)
        time.sleep(0.3)
        agent.kill()
        agent.wait()
        ended = time.monotonic()
        head, _ = read_answer(conn)
        assert head.startswith(b"STALE ended - lbwatch is not running"), head
        assert time.monotonic() - ended < 10
    finally:
        agent.kill()
        agent.wait()
    assert conn.finish() == (0, "")


def test_a_view_whose_agent_stopped_renewing_its_heartbeat_is_not_served(
    staging: Path, conn: Conn, beating: tuple[subprocess.Popen[bytes], Path]
) -> None:
    """The finding: a stopped agent (SIGSTOP) still exists, and its view was served as current.
    While its agent renews its heartbeat the view is served; stopped, its process still there,
    GET and WAIT answer STALE silent within the bound (plus the receiver's tenth of a second),
    with the VIPs of the view that the kernel holds (loopback's address: yes; a TEST-NET one:
    no), never the view; resumed, the view is served again."""
    agent, beat = beating
    data = view(agent.pid, ticks_of(agent.pid), heartbeat=beat, vips=("127.0.0.1", "192.0.2.100"))
    (staging / "node.json").write_bytes(data)
    assert conn.get("node.json") == (b"DATA %d\n" % len(data), data)
    wait_request(conn, "-", 5)
    assert read_answer(conn) == (b"DATA %d\n" % len(data), data)
    held = hashlib.sha256(data).hexdigest()
    wait_request(conn, held, 60)  # under way while the agent stops
    time.sleep(0.3)
    agent.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    head, body = answer_within(conn, STALE_AFTER + 5)
    took = time.monotonic() - stopped
    print(f"\nSTALE {took:.2f} s after the agent stopped")
    expected = (
        b"STALE silent 127.0.0.1 lbwatch is not responding (its agent, PID %d, has not renewed "
        b"its heartbeat for %g s)\n" % (agent.pid, STALE_AFTER)
    )
    assert (head, body) == (expected, b"")
    # Its last renewal came at most half a period before the stop; the receiver looks again
    # the moment the view would go stale, so it is said within a tenth of a second of that.
    assert took <= STALE_AFTER + 0.5, took
    assert conn.get("node.json") == (expected, b"")
    agent.send_signal(signal.SIGCONT)
    # Served again once it has renewed its heartbeat (not at the moment it resumes).
    wait_for(lambda: conn.get("node.json")[0].startswith(b"DATA "), 10, what="the view again")
    wait_request(conn, "-", 5)
    assert answer_within(conn, 10) == (b"DATA %d\n" % len(data), data)
    assert conn.finish() == (0, "")


def test_a_heartbeat_that_is_not_its_agents_makes_the_view_not_current(
    staging: Path, conn: Conn, beating: tuple[subprocess.Popen[bytes], Path]
) -> None:
    """A view naming a fresh heartbeat renewed by another process (another agent's, a reused
    path), or one that is missing, is not current: its own agent vouches for nothing."""
    _, beat = beating
    mine = view(os.getpid(), ticks_of(os.getpid()), heartbeat=beat)
    (staging / "node.json").write_bytes(mine)
    head, _ = conn.get("node.json")
    assert head.startswith(b"STALE silent - lbwatch is not responding"), head
    missing = staging.parent / "none"
    replace_file(staging / "node.json", view(os.getpid(), ticks_of(os.getpid()), heartbeat=missing))
    head, _ = conn.get("node.json")
    assert head.endswith(b"has no heartbeat at %s)\n" % str(missing).encode()), head
    assert conn.finish() == (0, "")


def test_a_wait_is_for_the_node_view_only_and_is_bounded(staging: Path, conn: Conn) -> None:
    """The status file (or anything else) cannot be waited for; a wait over 60 s is no
    request, and ends the connection."""
    (staging / "node.json").write_bytes(alive_view())
    (staging / "status.json").write_bytes(b"{}")
    wait_request(conn, "-", 1)
    assert read_answer(conn)[0].startswith(b"DATA ")
    conn.send(b"WAIT status.json - 1\n")
    assert conn.answer() == b"ERR only node.json can be waited for\n"
    conn.send(b"WAIT node.json - 61\n")
    assert conn.answer() == b"ERR 61 seconds is over the limit of 60\n"
    code, err = conn.finish()
    assert code == 1 and "over the limit" in err


def test_a_sender_that_hangs_up_ends_the_wait(staging: Path, conn: Conn) -> None:
    """The receiver does not sit out a poll nobody waits for: closing the connection ends it
    and the receiver at once."""
    data = alive_view()
    (staging / "node.json").write_bytes(data)
    wait_request(conn, hashlib.sha256(data).hexdigest(), 60)
    time.sleep(0.3)
    started = time.monotonic()
    code, _ = conn.finish(timeout=10)
    assert code == 0
    assert time.monotonic() - started < 5


def test_a_view_that_cannot_be_rewritten_is_not_served_as_current(small_disk: Path) -> None:
    """The agent's node view changed but the new one cannot be written (staging's disk is
    full): the receiver must not go on serving the old one as this node's current view, which
    its running writer would otherwise vouch for every second."""
    writer = NodeWriter(small_disk)
    me = this_view()
    assert writer.write(me)
    conn = Conn(small_disk)
    try:
        conn.greeting()
        head, body = conn.get("node.json")
        assert head.startswith(b"DATA ") and b'"MASTER"' in body  # served while written
        fill(small_disk)
        backup = me.model_copy(update={"vrrp": {"VI_1": VipsView(state="BACKUP")}})
        assert writer.write(backup)  # changed; its write failed (logged)
        head, body = conn.get("node.json")
        assert head.startswith(b"ERR "), (head, body)
    finally:
        conn.kill()
