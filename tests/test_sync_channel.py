"""The sender's kept session to a peer's receiver, over a real sshd on loopback with the sync key
restricted as an operator installs it (``authorized_keys_line``), and the fallback to rsync for
a peer whose key still runs rrsync."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from lbwatch.events import Outcome
from lbwatch.sync import limits
from lbwatch.sync.channel import Channel
from lbwatch.sync.transport import (
    Failure,
    Peer,
    Transport,
    authorized_keys_line,
    diagnose,
    rrsync_authorized_keys_line,
    unanswered,
)
from tests.lab.netlab import LBWATCH
from tests.sshd import NEEDS_SSHD, Sshd
from tests.util import wait_for

pytestmark = NEEDS_SSHD


def receiver_line(staging: Path, pub: str) -> str:
    return authorized_keys_line(staging, pub, LBWATCH)


def version_file(tmp: Path, content: bytes, counter: int = 1) -> tuple[Path, str]:
    digest = hashlib.sha256(content).hexdigest()
    name = f"haproxy.cfg@lb1@c{counter}@1700000000000000000@{digest}"
    local = tmp / f"v{counter}"
    local.write_bytes(content)
    return local, name


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path / "peer", receiver_line)
    yield server
    server.stop()


def channel_to(sshd: Sshd, control_dir: Path, timeout: float = 5) -> Channel:
    return Channel(Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=timeout))


@pytest.fixture
def channel(sshd: Sshd, control_dir: Path) -> Iterator[tuple[Channel, Peer]]:
    c = channel_to(sshd, control_dir)
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    yield c, peer
    c.close(peer)


def receivers(staging: Path) -> list[psutil.Process]:
    """The peer's receiver processes (sshd runs them through the shell: `sh -c CMD` execs)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if "receive" in argv and str(staging) in argv:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
    return found


def test_pushes_go_over_one_kept_session(
    sshd: Sshd, channel: tuple[Channel, Peer], tmp_path: Path
) -> None:
    """Versions pushed one after another land whole through one receiver process (one ssh
    session, kept); the status file reads back the same way. Push times are printed."""
    c, peer = channel
    times = []
    for i in range(1, 6):
        local, name = version_file(tmp_path, f"global\n    maxconn {i}\n".encode(), i)
        started = time.monotonic()
        result = c.push(peer, local, name)
        times.append(time.monotonic() - started)
        assert result.outcome is Outcome.OK, result.detail
        assert (sshd.staging / name).read_bytes() == local.read_bytes()
        assert len(receivers(sshd.staging)) == 1
    (sshd.staging / "status.json").write_text('{"haproxy.cfg": {"result": "applied"}}')
    got = tmp_path / "status"
    assert c.fetch(peer, "status.json", got).outcome is Outcome.OK
    assert got.read_text() == '{"haproxy.cfg": {"result": "applied"}}'
    print("push times:", [f"{x * 1000:.1f} ms" for x in times])


def test_missing_status_and_a_refused_version_are_said(
    sshd: Sshd, channel: tuple[Channel, Peer], tmp_path: Path
) -> None:
    """No status file yet reads as MISSING (a peer that never recorded anything); a version the
    receiver refuses fails with its reason, and the session goes on."""
    c, peer = channel
    res = c.fetch(peer, "status.json", tmp_path / "status")
    assert res.outcome is Outcome.FAILED and diagnose(res.output)[0] is Failure.MISSING
    local, name = version_file(tmp_path, b"content\n")
    res = c.push(peer, local, name.replace("@lb1@", "@../x@"))
    assert res.outcome is Outcome.FAILED
    assert res.detail.startswith("lbwatch's receiver on 127.0.0.1 refused: not a staged version")
    assert c.push(peer, local, name).outcome is Outcome.OK
    assert len(receivers(sshd.staging)) == 1


def test_a_session_past_the_keys_limit_fails_at_once_with_the_receivers_reason(
    control_dir: Path, tmp_path: Path
) -> None:
    """With the peer allowing two sessions of this key and both held (the sync link's and the
    cluster watch's), a third sender's push fails at once, saying the receiver refused it as
    busy (no retry in a loop, no wait for the timeout); once a session ends, it goes through."""
    sshd = Sshd(tmp_path / "peer", lambda st, pub: authorized_keys_line(st, pub, LBWATCH, "lb1"))
    limits.publish(sshd.staging, limits.Limits("haproxy.cfg", sessions=2))
    dirs = [Path(tempfile.mkdtemp(prefix="lbc", dir="/tmp")) for _ in range(2)]
    chans = [channel_to(sshd, control_dir), *(channel_to(sshd, d) for d in dirs)]
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    try:
        local, name = version_file(tmp_path, b"one\n", 1)
        assert chans[0].push(peer, local, name).outcome is Outcome.OK
        assert chans[1].fetch(peer, "status.json", tmp_path / "s").outcome is Outcome.FAILED
        assert len(receivers(sshd.staging)) == 2  # the second read found no file, and stays
        started = time.monotonic()
        result = chans[2].push(peer, local, name)
        assert result.outcome is Outcome.FAILED
        assert result.detail.startswith("lbwatch's receiver on 127.0.0.1 refused: busy: 2 ")
        assert time.monotonic() - started < 3
        chans[1].close(peer)
        wait_for(lambda: len(receivers(sshd.staging)) == 1, 10, what="a session ended")
        assert chans[2].push(peer, local, name).outcome is Outcome.OK
    finally:
        for ch in chans:
            ch.close(peer)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        sshd.stop()


def test_a_session_ended_while_idle_is_opened_again_without_a_failure(
    sshd: Sshd, channel: tuple[Channel, Peer], tmp_path: Path
) -> None:
    """The peer's receiver killed between pushes (sshd restarted, a reboot): the next push
    opens a new session and succeeds, with no failed attempt for the backoff."""
    c, peer = channel
    local, name = version_file(tmp_path, b"one\n", 1)
    assert c.push(peer, local, name).outcome is Outcome.OK
    (old,) = receivers(sshd.staging)
    old.kill()
    wait_for(lambda: receivers(sshd.staging) == [], 5, what="the receiver gone")
    local, name = version_file(tmp_path, b"two\n", 2)
    result = c.push(peer, local, name)
    assert result.outcome is Outcome.OK, result.detail
    assert (sshd.staging / name).read_bytes() == b"two\n"
    (new,) = receivers(sshd.staging)
    assert new.pid != old.pid


def test_a_peer_that_stops_answering_fails_the_push_in_time(
    sshd: Sshd, control_dir: Path, tmp_path: Path
) -> None:
    """A receiver that stops reading (SIGSTOP) fails a push within the timeout, as unanswered
    (the link then watches the port), and the session is replaced on the next push."""
    c = channel_to(sshd, control_dir, timeout=2)
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    try:
        local, name = version_file(tmp_path, b"one\n", 1)
        assert c.push(peer, local, name).outcome is Outcome.OK
        (recv,) = receivers(sshd.staging)
        recv.suspend()
        try:
            local, name = version_file(tmp_path, b"two\n" * 100_000, 2)
            started = time.monotonic()
            result = c.push(peer, local, name)
            assert result.outcome is Outcome.TIMEOUT, result
            assert time.monotonic() - started < 4
        finally:
            recv.resume()
        assert c.push(peer, local, name).outcome is Outcome.OK
    finally:
        c.close(peer)


def test_the_key_runs_no_command_and_old_rsync_senders_are_told(
    sshd: Sshd, channel: tuple[Channel, Peer], tmp_path: Path
) -> None:
    """Positive control first: the key logs in and pushes. Then a command with the same key
    never runs, and an rsync push (an lbwatch older than the receiver) is refused in words."""
    c, peer = channel
    local, name = version_file(tmp_path, b"allowed\n")
    assert c.push(peer, local, name).outcome is Outcome.OK
    marker = tmp_path / "ran"
    argv = c.rsync.ssh_argv(peer)
    proc = subprocess.run(
        [*argv, peer.host, f"touch {marker}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0 and not marker.exists()
    assert "lbwatch receive: refused" in proc.stderr
    old = c.rsync.push(peer, local, "haproxy.cfg")
    assert old.outcome is Outcome.FAILED
    assert "this key only takes lbwatch's own sync connections" in old.output
    assert not (sshd.staging / "haproxy.cfg").exists()


def test_two_senders_at_once_each_land_whole(sshd: Sshd, tmp_path: Path) -> None:
    """Two senders with the same key and their own connections (an agent restarted while its
    old session lingers) push at the same time: every version lands whole."""
    dirs = [Path(tempfile.mkdtemp(prefix="lbc", dir="/tmp")) for _ in range(2)]
    chans = [channel_to(sshd, d) for d in dirs]
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    pushed: dict[str, bytes] = {}
    failures: list[str] = []

    def sender(k: int) -> None:
        for i in range(8):
            content = f"sender {k} version {i}\n".encode() * (1000 * (i + 1))
            local, name = version_file(tmp_path / f"s{k}", content, 100 * k + i + 1)
            res = chans[k].push(peer, local, name)
            if res.outcome is not Outcome.OK:
                failures.append(res.detail)
            pushed[name] = content

    for k in range(2):
        (tmp_path / f"s{k}").mkdir()
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures
        assert len(receivers(sshd.staging)) == 2
        assert {p.name for p in sshd.staging.iterdir()} - {limits.DIR} == set(pushed)
        for name, content in pushed.items():
            assert (sshd.staging / name).read_bytes() == content
    finally:
        for ch, d in zip(chans, dirs):
            ch.close(peer)
            shutil.rmtree(d, ignore_errors=True)


def test_a_peer_still_on_rrsync_is_served_by_rsync_and_told_once(
    tmp_path: Path, control_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer whose key still runs rrsync: pushes and status reads go through rsync, and one
    warning says how to move it to the receiver."""
    server = Sshd(tmp_path / "old-peer", rrsync_authorized_keys_line)
    peer = Peer("lb2", "127.0.0.1", server.port)
    c = channel_to(server, control_dir)
    try:
        with caplog.at_level(logging.WARNING, logger="lbwatch.sync.channel"):
            for i in range(1, 4):
                local, name = version_file(tmp_path, f"v{i}\n".encode(), i)
                result = c.push(peer, local, name)
                assert result.outcome is Outcome.OK, result.detail
                assert (server.staging / name).read_bytes() == local.read_bytes()
            (server.staging / "status.json").write_text("{}")
            assert c.fetch(peer, "status.json", tmp_path / "st").outcome is Outcome.OK
        told = [r for r in caplog.records if "runs rrsync" in r.getMessage()]
        assert len(told) == 1
        assert receivers(server.staging) == []
    finally:
        c.close(peer)
        server.stop()


def test_an_unreachable_peer_is_said_in_ssh_words(control_dir: Path, tmp_path: Path) -> None:
    """No sshd on the port: the push fails with ssh's reason, as rsync's failures do."""
    from tests.conftest import free_port
    from tests.lab.ssh import keygen

    keygen(tmp_path / "key")
    port = free_port()
    c = Channel(Transport(tmp_path / "key", control_dir, None, timeout=3))
    peer = Peer("lb2", "127.0.0.1", port)
    local, name = version_file(tmp_path, b"x\n")
    result = c.push(peer, local, name)
    assert result.outcome is Outcome.FAILED
    assert result.detail == f"ssh: connection refused (127.0.0.1:{port})"
    c.close(peer)


def test_a_receiver_that_ended_just_before_a_push_costs_no_failure(
    sshd: Sshd, channel: tuple[Channel, Peer], tmp_path: Path
) -> None:
    """The receiver ends just before a push, before the sender's ssh has noticed (the same
    moment as the kept session's end, seen from the sender): the push goes over a new session
    and succeeds, every time, with no failed attempt for the backoff."""
    c, peer = channel
    for i in range(1, 6):
        local, name = version_file(tmp_path, f"round {i}\n".encode(), i)
        assert c.push(peer, local, name).outcome is Outcome.OK
        (old,) = receivers(sshd.staging)
        old.kill()
        local, name = version_file(tmp_path, f"after round {i}\n".encode(), 100 + i)
        result = c.push(peer, local, name)
        assert result.outcome is Outcome.OK, f"round {i}: {result.detail}"
        assert (sshd.staging / name).read_bytes() == local.read_bytes()


def test_close_does_not_wait_for_a_session_still_opening(control_dir: Path, tmp_path: Path) -> None:
    """A push still opening its session (the peer's port accepts but sshd never greets) is
    ended by ``close`` from another thread at once, not after the connect timeout: ``close``
    is what stopping or rebuilding the sync service waits for."""
    from tests.lab.ssh import keygen

    keygen(tmp_path / "key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    c = Channel(Transport(tmp_path / "key", control_dir, None, timeout=8))
    peer = Peer("lb2", "127.0.0.1", port)
    local, name = version_file(tmp_path, b"x\n")
    results = []
    pusher = threading.Thread(target=lambda: results.append(c.push(peer, local, name)))
    stack = contextlib.ExitStack()
    try:
        pusher.start()
        accepted, _ = listener.accept()  # ssh connected and waits for the greeting
        stack.callback(accepted.close)
        started = time.monotonic()
        c.close(peer)
        closed_in = time.monotonic() - started
        pusher.join(10)
        assert not pusher.is_alive()
        assert closed_in < 2, f"close took {closed_in:.1f} s"
        (result,) = results
        assert result.outcome is not Outcome.OK
    finally:
        stack.close()
        pusher.join(10)
        listener.close()


FAKE_RECEIVER = r"""
import sys
from pathlib import Path
out = sys.stdout.buffer
out.write(b"LBWATCH-SYNC 1 67108864\n")
out.flush()
sys.stdin.buffer.readline()
out.write(Path(sys.argv[1]).read_bytes())
out.write(bytes(int(sys.argv[2])))
out.flush()
sys.stdin.buffer.read()  # until the sender ends the session
"""


def fake_receiver(tmp_path: Path, answer: bytes, then: int) -> Callable[[Path, str], str]:
    """An authorized_keys entry whose forced command greets as a receiver, then answers the
    first request with ``answer`` followed by ``then`` zero bytes (a broken or hostile peer)."""
    script, said = tmp_path / "fake_receiver.py", tmp_path / "fake_answer"
    script.write_text(FAKE_RECEIVER)
    said.write_bytes(answer)

    def line(staging: Path, pub: str) -> str:
        return f'restrict,command="{sys.executable} {script} {said} {then}" {pub}'

    return line


@pytest.mark.parametrize(
    ("answer", "then"),
    [
        (b"DATA 1000000000000\n", 4 << 20),  # far more than any status file
        (b"DATA " + b"9" * 5000 + b"\n", 0),  # a number too long to read
    ],
)
def test_a_status_answer_over_the_limit_is_refused_at_once(
    tmp_path: Path, control_dir: Path, answer: bytes, then: int
) -> None:
    """A peer that answers a status read with more than any status file can be (the receiver
    never sends over 1 MiB) fails the read at once, as a refusal, not a stall: the sender does
    not keep reading it into memory until its timeout, and the link does not take the peer for
    down."""
    server = Sshd(tmp_path / "peer", fake_receiver(tmp_path, answer, then))
    c = channel_to(server, control_dir, timeout=4)
    peer = Peer("lb2", "127.0.0.1", server.port)
    try:
        started = time.monotonic()
        result = c.fetch(peer, "status.json", tmp_path / "status")
        took = time.monotonic() - started
        assert result.outcome is Outcome.FAILED, result
        assert not unanswered(result)
        assert took < 3, f"took {took:.1f} s"
        assert not (tmp_path / "status").exists()
    finally:
        c.close(peer)
        server.stop()


def test_a_status_read_answered_without_data_is_no_success(
    tmp_path: Path, control_dir: Path
) -> None:
    """A status read is done only when the status file came back: a peer answering it "OK"
    (as to a push) fails it, rather than leaving the caller to read a file never written."""
    server = Sshd(tmp_path / "peer", fake_receiver(tmp_path, b"OK\n", 0))
    c = channel_to(server, control_dir)
    peer = Peer("lb2", "127.0.0.1", server.port)
    try:
        result = c.fetch(peer, "status.json", tmp_path / "status")
        assert result.outcome is Outcome.FAILED, result
        assert not (tmp_path / "status").exists()
    finally:
        c.close(peer)
        server.stop()


def test_a_version_gone_before_its_push_fails_the_push_and_nothing_else(
    sshd: Sshd, channel: tuple[Channel, Peer], tmp_path: Path
) -> None:
    """The local copy of a version removed before its push could read it (the ledger removes
    the old copy when a newer version is recorded) fails that push with a result, as rsync's
    did, not an exception (a traceback in the log); the session goes on."""
    c, peer = channel
    local, name = version_file(tmp_path, b"one\n", 1)
    assert c.push(peer, local, name).outcome is Outcome.OK
    (before,) = receivers(sshd.staging)
    gone, gone_name = version_file(tmp_path, b"two\n", 2)
    gone.unlink()
    result = c.push(peer, gone, gone_name)
    assert result.outcome is Outcome.FAILED
    assert str(gone) in result.detail
    local, name = version_file(tmp_path, b"three\n", 3)
    assert c.push(peer, local, name).outcome is Outcome.OK
    assert receivers(sshd.staging) == [before]


def test_an_unchanged_status_comes_back_as_same_and_a_changed_one_whole(
    tmp_path: Path, control_dir: Path
) -> None:
    """A status read names the hash of the content it holds: unchanged, the receiver answers
    SAME (a keepalive's worth) and the local file still gets the content; changed, the new
    content comes back. The requests are logged on the peer's side by a tee in front of the
    real receiver."""
    requests = tmp_path / "requests"

    def logged(staging: Path, pub: str) -> str:
        return f'restrict,command="tee -a {requests} | {LBWATCH} receive {staging}" {pub}'

    server = Sshd(tmp_path / "peer", logged)
    peer = Peer("lb2", "127.0.0.1", server.port)
    c = channel_to(server, control_dir)
    try:
        first = b'{"haproxy.cfg": {"result": "applied"}}'
        (server.staging / "status.json").write_bytes(first)
        got = tmp_path / "status"
        for _ in range(2):
            got.unlink(missing_ok=True)
            assert c.fetch(peer, "status.json", got).outcome is Outcome.OK
            assert got.read_bytes() == first
        second = b'{"haproxy.cfg": {"result": "rejected"}}'
        (server.staging / "status.json").write_bytes(second)
        assert c.fetch(peer, "status.json", got).outcome is Outcome.OK
        assert got.read_bytes() == second
        digest = hashlib.sha256(first).hexdigest()
        wait_for(lambda: requests.read_bytes().count(b"\n") >= 3, 5, what="three requests")
        assert requests.read_bytes().splitlines() == [
            b"GET status.json",
            f"GET status.json {digest}".encode(),
            f"GET status.json {digest}".encode(),
        ]
    finally:
        c.close(peer)
        server.stop()


def test_a_key_moved_from_rrsync_to_the_receiver_is_used_at_once(
    tmp_path: Path, control_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer served by rsync (its key ran rrsync) whose key an operator moves to the receiver:
    once a new connection logs in, rsync is refused and the same push goes through the
    receiver, with no failed attempt."""
    server = Sshd(tmp_path / "peer", rrsync_authorized_keys_line)
    peer = Peer("lb2", "127.0.0.1", server.port)
    c = channel_to(server, control_dir)
    try:
        local, name = version_file(tmp_path, b"one\n", 1)
        assert c.push(peer, local, name).outcome is Outcome.OK
        assert receivers(server.staging) == []
        pub = server.client_key.with_suffix(".pub").read_text()
        server.auth.write_text(receiver_line(server.staging, pub) + "\n")
        c.rsync.close(peer)  # the kept connection ends; the next one logs in anew
        local, name = version_file(tmp_path, b"two\n", 2)
        with caplog.at_level(logging.INFO, logger="lbwatch.sync.channel"):
            result = c.push(peer, local, name)
        assert result.outcome is Outcome.OK, result.detail
        assert (server.staging / name).read_bytes() == b"two\n"
        assert len(receivers(server.staging)) == 1
        assert any("now runs lbwatch's receiver" in r.getMessage() for r in caplog.records)
    finally:
        c.close(peer)
        server.stop()


def test_ssh_s_stderr_of_a_kept_session_stays_bounded(tmp_path: Path) -> None:
    """What ssh wrote to stderr over a long session is dropped before a request once it passes
    the bound, and what it writes next lands at the start of the file."""
    from lbwatch.sync.channel import ERRORS_KEPT, _Session

    errors = (tmp_path / "errors").open("w+b")
    script = f"head -c {ERRORS_KEPT + 1} /dev/zero >&2; echo ready; read x; echo after >&2"
    proc = subprocess.Popen(
        ["sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        start_new_session=True,
    )
    session = _Session(proc, errors)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"ready\n"
        assert (tmp_path / "errors").stat().st_size == ERRORS_KEPT + 1
        session.trim()
        assert (tmp_path / "errors").stat().st_size == 0
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        proc.wait(10)
        assert (tmp_path / "errors").read_bytes() == b"after\n"
    finally:
        session.end()
