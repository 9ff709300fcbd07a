"""Issue 23, finding 5: what one peer's sync key can take from the node it is authorized on.
The receiver (``lbwatch receive``) is run as sshd runs it, and spoken to by hand in its
protocol, as a holder of a stolen key would: many sessions at once, floods of large and of tiny
versions (also from sessions at once), names of files the node does not sync, and a receiver
killed in the middle of a body. Each attack comes after the positive control, on the same
setup, shows that the key, the receiver and the protocol work.

What the node allows is the document its agent writes for its receivers
(``STAGING/.receiver/limits.json``); the tests write it here by hand, from its description in
``sync/limits.py``, as the agent would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.netlab import LBWATCH
from tests.util import wait_for

MiB = 1024 * 1024
VERSION_LIMIT = 64 * MiB  # the largest version the receiver takes
# The defaults the README states for [sync]: 8 sessions per peer key, 256 MiB and 64 files.
DEFAULT_SESSIONS, DEFAULT_BYTES, DEFAULT_FILES = 8, 4 * VERSION_LIMIT, 64
OWN = {".receiver", "status.json", "node.json"}  # what lbwatch itself keeps in staging

pytestmark = pytest.mark.skipif(
    not os.access("/proc/self/io", os.R_OK), reason="needs /proc/PID/io (what a receiver wrote)"
)


def name_for(content: bytes, counter: int = 1, file: str = "haproxy.cfg") -> str:
    """A staged version's name, built here from the format (not from lbwatch's code)."""
    return f"{file}@lb1@c{counter}@1700000000000000000@{hashlib.sha256(content).hexdigest()}"


def allow(staging: Path, **limits: object) -> None:
    """Write the receivers' document as this node's agent does: the unit it syncs, and the
    limits (any left out take their defaults)."""
    doc = {"lbwatch-receiver": 1, "unit": "haproxy.cfg", **limits}
    (staging / ".receiver").mkdir(mode=0o700, exist_ok=True)
    (staging / ".receiver" / "limits.json").write_text(json.dumps(doc))


def stored(staging: Path) -> dict[str, int]:
    """What the key has stored in staging: every entry but lbwatch's own, with its size."""
    return {p.name: p.lstat().st_size for p in staging.iterdir() if p.name not in OWN}


def written(pid: int) -> int:
    """How many bytes the process has written (to its files and pipes), from /proc/PID/io."""
    found = re.search(r"^wchar: (\d+)$", Path(f"/proc/{pid}/io").read_text(), re.MULTILINE)
    assert found is not None
    return int(found[1])


class Receiver:
    """One ssh session's receiver, started as sshd starts the forced command of a sync key:
    ``peer`` is the name its authorized_keys line gives (None: a line from before there was
    one)."""

    def __init__(self, staging: Path, peer: str | None = None) -> None:
        env = {"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": "lbwatch-sync 1"}
        named = ["--peer", peer] if peer is not None else []
        self.proc = subprocess.Popen(
            [LBWATCH, "receive", *named, str(staging)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.pending = b""

    def line(self, timeout: float = 20) -> bytes:
        """The next line it says; b"" once it has ended without one."""
        poller = select.poll()
        poller.register(self.stdout.fileno(), select.POLLIN)
        while b"\n" not in self.pending:
            assert poller.poll(timeout * 1000), "the receiver said nothing in time"
            chunk = os.read(self.stdout.fileno(), 65536)
            if not chunk:
                return b""
            self.pending += chunk
        said, _, self.pending = self.pending.partition(b"\n")
        return said + b"\n"

    def greeted(self) -> bool:
        """Whether it took the session (greeted), rather than ending at once."""
        return self.line().startswith(b"LBWATCH-SYNC 1 ")

    def send(self, data: bytes) -> None:
        self.stdin.write(data)

    def put(self, name: str, content: bytes) -> bytes:
        self.send(f"PUT {name} {len(content)}\n".encode() + content)
        return self.line()

    def get(self, name: str) -> bytes:
        self.send(f"GET {name}\n".encode())
        head = self.line()
        size = int(head[5:]) if head.startswith(b"DATA ") else 0
        while len(self.pending) < size:
            self.pending += os.read(self.stdout.fileno(), 65536)
        body, self.pending = self.pending[:size], self.pending[size:]
        return head + body

    def ended(self, timeout: float = 20) -> tuple[int, str]:
        """Its exit code and what it said on stderr, once it has ended on its own."""
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read().decode()

    def close(self) -> None:
        """End it (if it still runs) and close our ends: a test's clean-up."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.stdin, self.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def sessions() -> Iterator[list[Receiver]]:
    """Receivers a test starts; every one still running at the end is killed."""
    started: list[Receiver] = []
    yield started
    for r in started:
        r.close()


def start(sessions: list[Receiver], staging: Path, peer: str | None = None) -> Receiver:
    r = Receiver(staging, peer)
    sessions.append(r)
    return r


@pytest.mark.parametrize("peer", [None, "lb1"])
def test_positive_control_pushes_and_reads_work_over_two_sessions_of_one_key(
    staging: Path, sessions: list[Receiver], peer: str | None
) -> None:
    """Two sessions of one key at once (the sync link's and the cluster watch's) are both
    served: a version of the file the node syncs lands whole, and the status file reads back;
    the same holds for a key line without --peer (from before there was one)."""
    allow(staging)
    a, b = start(sessions, staging, peer), start(sessions, staging, peer)
    assert a.greeted() and b.greeted()
    content = b"global\n    maxconn 100\n"
    assert a.put(name_for(content), content) == b"OK\n"
    (staging / "status.json").write_bytes(b"{}")
    assert b.get("status.json") == b"DATA 2\n{}"
    other = b"global\n    maxconn 200\n"
    assert b.put(name_for(other, 2), other) == b"OK\n"
    assert stored(staging) == {name_for(content): len(content), name_for(other, 2): len(other)}


@pytest.mark.parametrize("peer", [None, "lb1"])
def test_the_session_past_the_limit_is_refused_while_the_others_keep_working(
    staging: Path, sessions: list[Receiver], peer: str | None
) -> None:
    """With three sessions allowed per key, a fourth session of the same key is refused at
    once (it ends before its greeting, saying why), while the three go on taking versions."""
    allow(staging, receiver_sessions=3, peers=1)
    held = [start(sessions, staging, peer) for _ in range(3)]
    assert all(r.greeted() for r in held)
    extra = start(sessions, staging, peer)
    assert not extra.greeted()
    code, said = extra.ended()
    assert code == 1 and "busy" in said, said
    for i, r in enumerate(held, 1):
        content = b"global\n# from session %d\n" % i
        assert r.put(name_for(content, i), content) == b"OK\n"
    assert len(stored(staging)) == 3


@pytest.mark.parametrize("peer", [None, "lb1"])
def test_forty_sessions_of_one_key_leave_eight_running(
    staging: Path, sessions: list[Receiver], peer: str | None
) -> None:
    """The review's forty receivers at once for one key (680 MiB of memory): with the default
    limit eight are served and thirty-two end at once, so no more than eight stay resident."""
    allow(staging)
    started = [start(sessions, staging, peer) for _ in range(40)]
    greeted = [r for r in started if r.greeted()]
    assert len(greeted) == DEFAULT_SESSIONS
    for r in started:
        if r not in greeted:
            assert r.ended()[0] == 1
    assert sum(r.proc.poll() is None for r in started) == DEFAULT_SESSIONS


def test_each_key_has_its_own_sessions_and_old_lines_share_one_pool_per_peer(
    staging: Path, sessions: list[Receiver]
) -> None:
    """A key that used up its sessions takes none from another peer's key; key lines without
    --peer share one pool, as large as one key's sessions times the node's peers."""
    allow(staging, receiver_sessions=2, peers=2)
    # One after another: started at once, which of them is refused would be a race.
    assert [start(sessions, staging, "lb1").greeted() for _ in range(3)] == [True, True, False]
    assert start(sessions, staging, "lb3").greeted()
    old = [start(sessions, staging).greeted() for _ in range(5)]
    assert old == [True, True, True, True, False]


def test_a_slot_held_by_a_sigkilled_receiver_is_free_again(
    staging: Path, sessions: list[Receiver]
) -> None:
    """A receiver killed with SIGKILL gives its session back (the kernel drops its lock): the
    next session of the key is served, and the one after it is refused again."""
    allow(staging, receiver_sessions=2)
    a, b = start(sessions, staging), start(sessions, staging)
    assert a.greeted() and b.greeted()
    assert not start(sessions, staging).greeted()
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    c = start(sessions, staging)
    assert c.greeted()
    content = b"global\n"
    assert c.put(name_for(content), content) == b"OK\n"
    assert not start(sessions, staging).greeted()


def test_the_byte_quota_stops_a_flood_of_64_mib_versions(
    staging: Path, sessions: list[Receiver]
) -> None:
    """The review's flood of 64 MiB versions (768 MiB stored in 4.6 s): with the default quota
    of 256 MiB four land, every one after them is refused without being stored, and the
    session goes on."""
    allow(staging)
    r = start(sessions, staging)
    assert r.greeted()
    answers = []
    for i in range(6):
        content = b"#" * (VERSION_LIMIT - 16) + b"%016d" % i
        answers.append(r.put(name_for(content, i + 1), content))
    assert answers[:4] == [b"OK\n"] * 4
    assert all(a.startswith(b"ERR staging is full") for a in answers[4:]), answers
    assert sum(stored(staging).values()) <= DEFAULT_BYTES
    assert len(stored(staging)) == 4


def test_the_file_quota_stops_a_flood_of_tiny_versions(
    staging: Path, sessions: list[Receiver]
) -> None:
    """A flood of tiny versions stops at the default quota of 64 files: every one after that is
    refused without being stored."""
    allow(staging)
    r = start(sessions, staging)
    assert r.greeted()
    answers = [r.put(name_for(b"%d\n" % i, i + 1), b"%d\n" % i) for i in range(100)]
    assert answers[:DEFAULT_FILES] == [b"OK\n"] * DEFAULT_FILES
    assert all(a.startswith(b"ERR staging is full") for a in answers[DEFAULT_FILES:])
    assert len(stored(staging)) == DEFAULT_FILES


@pytest.mark.parametrize(
    "quota", [{"staging_max_bytes": 2_500_000}, {"staging_max_files": 2}], ids=["bytes", "files"]
)
def test_sessions_at_once_cannot_overshoot_the_quota_together(
    staging: Path, sessions: list[Receiver], quota: dict[str, int]
) -> None:
    """Two sessions each in the middle of a 1 MB body hold their share of the quota: a third
    session's version that would take staging past it is refused, though nothing has landed
    yet, and the two bodies in flight land whole."""
    allow(staging, **quota)
    a, b, c = (start(sessions, staging) for _ in range(3))
    assert a.greeted() and b.greeted() and c.greeted()
    bodies = [b"a" * 1_000_000, b"b" * 1_000_000, b"c" * 1_000_000]
    for r, body, n in ((a, bodies[0], 1), (b, bodies[1], 2)):
        r.send(f"PUT {name_for(body, n)} {len(body)}\n".encode() + body[:600_000])
        # Its first piece of the body is written: its share is taken.
        wait_for(lambda r=r: written(r.proc.pid) > 262_144, 20, what="a body in flight")
    assert c.put(name_for(bodies[2], 3), bodies[2]).startswith(b"ERR staging is full")
    assert stored(staging) == {}
    a.send(bodies[0][600_000:])
    b.send(bodies[1][600_000:])
    assert a.line() == b.line() == b"OK\n"
    assert stored(staging) == {name_for(bodies[0], 1): 1_000_000, name_for(bodies[1], 2): 1_000_000}


@pytest.mark.parametrize("unit", ["haproxy.cfg", "haproxy.cfg.bundle"])
def test_a_name_of_a_file_the_node_does_not_sync_is_refused_without_being_stored(
    staging: Path, sessions: list[Receiver], unit: str
) -> None:
    """A version-shaped name of a file this node does not sync (the review's Lua file, or the
    plain config at a node that syncs a bundle) is refused, and its body is never written
    anywhere; a version of the node's own unit is taken on the same session."""
    allow(staging, unit=unit)
    r = start(sessions, staging)
    assert r.greeted()
    lua = b"os.execute('id > /tmp/marker')\n" * 10_000
    foreign = "init.lua" if unit == "haproxy.cfg" else "haproxy.cfg"
    before = written(r.proc.pid)
    assert r.put(name_for(lua, 1, foreign), lua).startswith(b"ERR ")
    assert written(r.proc.pid) - before < 1000  # the answer only: the body was not stored
    assert stored(staging) == {}
    own = b"global\n"
    assert r.put(name_for(own, 2, unit), own) == b"OK\n"
    assert stored(staging) == {name_for(own, 2, unit): len(own)}


def test_no_version_is_taken_before_the_agent_said_what_the_node_syncs(
    staging: Path, sessions: list[Receiver]
) -> None:
    """Until this node's agent has written what it syncs, every version is refused unstored
    (the receiver cannot tell the node's files from others); reads are served all the same."""
    r = start(sessions, staging)
    assert r.greeted()
    (staging / "status.json").write_bytes(b"{}")
    assert r.get("status.json") == b"DATA 2\n{}"
    content = b"global\n"
    assert r.put(name_for(content), content).startswith(b"ERR ")
    assert stored(staging) == {}


def test_a_receiver_sigkilled_mid_body_leaves_nothing_in_staging(
    staging: Path, sessions: list[Receiver]
) -> None:
    """A receiver killed with SIGKILL in the middle of a body leaves no file in staging, and
    what it held of the quota is free at once for the next session."""
    allow(staging, staging_max_bytes=1_500_000)
    r = start(sessions, staging)
    assert r.greeted()
    body = b"x" * 1_000_000
    r.send(f"PUT {name_for(body)} {len(body)}\n".encode() + body[:600_000])
    wait_for(lambda: written(r.proc.pid) > 262_144, 20, what="part of the body written")
    r.proc.send_signal(signal.SIGKILL)
    r.proc.wait(10)
    assert stored(staging) == {}
    again = start(sessions, staging)
    assert again.greeted()
    assert again.put(name_for(body), body) == b"OK\n"
    assert stored(staging) == {name_for(body): len(body)}


def test_an_idle_or_stalled_session_ends_and_frees_its_slot(
    staging: Path, sessions: list[Receiver]
) -> None:
    """A session that sends nothing for the idle time (a sender that vanished without closing,
    so its sshd session lingers), or stops in the middle of a body, ends on its own and leaves
    nothing behind; its slot is served again."""
    allow(staging, receiver_sessions=2, idle=1)
    idle, stalled = start(sessions, staging), start(sessions, staging)
    assert idle.greeted() and stalled.greeted()
    body = b"y" * 1_000_000
    stalled.send(f"PUT {name_for(body)} {len(body)}\n".encode() + body[:600_000])
    for r in (idle, stalled):
        code, said = r.ended()
        assert code == 1 and "idle" in said, said
    assert stored(staging) == {}
    assert start(sessions, staging).greeted()
