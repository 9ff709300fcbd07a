"""The receiver's side of the cluster view: ``GET node.json`` and the long poll ``WAIT``, on the
real receiver process spoken to by hand. A view is served only while the agent that wrote it
runs; the poll answers a change at once, an unchanged view after its seconds, and a sender
that hangs up ends it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch import pstat
from lbwatch.cluster.nodeview import NodeWriter
from lbwatch.statusdoc import NodeAgent, NodeView, VipsView
from tests.conftest import fill
from tests.test_sync_sink import LIMIT, Conn


def ticks_of(pid: int) -> int:
    """Field 22 of /proc/PID/stat, read here apart from lbwatch's pstat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rsplit(")", 1)[1].split()[19])


def view(pid: int, ticks: int, node: str = "lb2", state: str = "BACKUP") -> bytes:
    """A node view as the agent writes it (the receiver reads only its agent part)."""
    doc = {
        "node": node,
        "agent": {"pid": pid, "start_ticks": ticks, "version": "test"},
        "vrrp": {"VI_1": {"state": state, "vips": ["192.0.2.100"], "held": []}},
    }
    return json.dumps(doc).encode()


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


def test_a_view_is_served_while_its_agent_runs_and_refused_once_it_ended(
    staging: Path, conn: Conn
) -> None:
    """GET node.json answers the view while the PID and start time in it are a running
    process's; once that process has ended (or the PID is another process's), it is refused."""
    data = alive_view()
    (staging / "node.json").write_bytes(data)
    assert conn.get("node.json") == (b"DATA %d\n" % len(data), data)
    ended = subprocess.Popen(["true"])
    ended.wait()
    replace_file(staging / "node.json", view(ended.pid, 1))
    head, _ = conn.get("node.json")
    assert head.startswith(b"ERR lbwatch is not running")
    # This process's PID with another start time: a PID reused by another process.
    replace_file(staging / "node.json", view(os.getpid(), ticks_of(os.getpid()) + 1))
    assert conn.get("node.json")[0].startswith(b"ERR lbwatch is not running")
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


def test_a_wait_ends_with_an_error_when_the_agent_ends_meanwhile(staging: Path, conn: Conn) -> None:
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
        assert head.startswith(b"ERR lbwatch is not running"), head
        assert time.monotonic() - ended < 10
    finally:
        agent.kill()
        agent.wait()
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
