"""rsync over ssh to a real sshd on loopback, with the sync key restricted to rrsync, as peers
authorized before lbwatch had a receiver still have it (``channel`` falls back to this)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.events import Outcome
from lbwatch.services import CommandResult
from lbwatch.sync.transport import (
    Failure,
    Peer,
    Transport,
    diagnose,
    knock,
    rrsync_authorized_keys_line,
    unanswered,
)
from tests.conftest import free_port
from tests.lab.ssh import keygen
from tests.sshd import NEEDS_SSHD, Sshd

pytestmark = NEEDS_SSHD


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A peer whose sync key still runs rrsync, as authorized before lbwatch had a receiver:
    what ``Transport`` serves (``test_sync_channel`` tests the receiver)."""
    server = Sshd(tmp_path, rrsync_authorized_keys_line)
    yield server
    server.stop()


@pytest.fixture
def transport(sshd: Sshd, control_dir: Path) -> Iterator[tuple[Transport, Peer]]:
    t = Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=5)
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    yield t, peer
    t.close(peer)


def test_push_lands_in_staging_and_reads_back(
    sshd: Sshd, transport: tuple[Transport, Peer], tmp_path: Path
) -> None:
    """A pushed file arrives in the peer's staging directory; a file there can be fetched."""
    t, peer = transport
    local = tmp_path / "haproxy.cfg"
    local.write_text("global\n    maxconn 100\n")
    result = t.push(peer, local, "haproxy.cfg")
    assert result.outcome is Outcome.OK, result.detail
    assert (sshd.staging / "haproxy.cfg").read_text() == local.read_text()
    (sshd.staging / "status.json").write_text('{"applied": "abc"}')
    got = tmp_path / "peer-status.json"
    assert t.fetch(peer, "status.json", got).outcome is Outcome.OK
    assert got.read_text() == '{"applied": "abc"}'


def test_persistent_connection_makes_pushes_cheap(
    sshd: Sshd, transport: tuple[Transport, Peer], tmp_path: Path
) -> None:
    """After the first push the ControlMaster connection is reused: later pushes skip the
    handshake (printed; the benchmark has the figures)."""
    t, peer = transport
    local = tmp_path / "haproxy.cfg"
    times = []
    for i in range(4):
        local.write_text(f"global\n    maxconn {i}\n")
        started = time.monotonic()
        # Each version under its own name: staged files are never overwritten (rrsync from
        # rsync 3.4+ pins paths through /proc/self/fd and cannot replace a file in place).
        assert t.push(peer, local, f"haproxy.cfg.{i}").outcome is Outcome.OK
        times.append(time.monotonic() - started)
    assert list(t.control_dir.iterdir()), "no control socket: the connection is not kept"
    print("push times:", [f"{x * 1000:.0f} ms" for x in times])


@pytest.mark.parametrize("kind", ["parent", "absolute"])
def test_key_cannot_write_outside_staging(
    sshd: Sshd, transport: tuple[Transport, Peer], tmp_path: Path, kind: str
) -> None:
    """The restricted key cannot put a file anywhere but staging: not above it with "..", not
    at an absolute path. First the same push to a name in staging succeeds (a positive
    control: a broken ssh would refuse both)."""
    t, peer = transport
    local = tmp_path / "x.cfg"
    local.write_text("x\n")
    assert t.push(peer, local, "allowed.cfg").outcome is Outcome.OK
    assert (sshd.staging / "allowed.cfg").read_text() == "x\n"
    if kind == "parent":
        outside, remote = sshd.base / "escaped.cfg", "../escaped.cfg"
    else:
        outside = tmp_path / "abs-escaped.cfg"
        remote = str(outside)
    t.push(peer, local, remote)
    assert not outside.exists()


def test_key_cannot_run_commands(
    sshd: Sshd, transport: tuple[Transport, Peer], tmp_path: Path
) -> None:
    """ssh with the sync key and a command runs rrsync, which refuses it; the command never
    runs. First the key is shown to log in and push (a positive control)."""
    t, peer = transport
    local = tmp_path / "x.cfg"
    local.write_text("x\n")
    assert t.push(peer, local, "allowed.cfg").outcome is Outcome.OK
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [*t.ssh_argv(peer), peer.host, f"touch {marker}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert not marker.exists()


def wrong_known_hosts(sshd: Sshd, path: Path) -> Path:
    """known_hosts naming another key for the sshd's address."""
    path.write_text(
        f"[127.0.0.1]:{sshd.port} ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIHn0fSxiqJq0gHbP3b5UCtxdjuhwq4J2mdxgtv6p5Vvb\n"
    )
    return path


def test_unknown_host_key_refused(sshd: Sshd, tmp_path: Path, control_dir: Path) -> None:
    """With known_hosts given, a host key that does not match is refused (no TOFU); with the
    right one the same push lands (a positive control)."""
    local = tmp_path / "x.cfg"
    local.write_text("x\n")
    peer = Peer("lb2", "127.0.0.1", sshd.port)
    right = Transport(sshd.client_key, control_dir, sshd.known_hosts, timeout=5)
    assert right.push(peer, local, "allowed.cfg").outcome is Outcome.OK
    right.close(peer)
    wrong = wrong_known_hosts(sshd, tmp_path / "wrong_known_hosts")
    t = Transport(sshd.client_key, control_dir, wrong, timeout=5)
    result = t.push(peer, local, "x.cfg")
    assert result.outcome is not Outcome.OK
    assert not (sshd.staging / "x.cfg").exists()


class ClosingPort:
    """A TCP port that hangs up on a client once it has said hello, as sshd does past
    MaxStartups (reading the hello first: closing with it unread would send a reset)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(256)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("fault", "expected", "said"),
    [
        ("closed-port", Failure.REFUSED, "ssh: connection refused (127.0.0.1:{port})"),
        (
            "host-key-mismatch",
            Failure.HOST_KEY_CHANGED,
            "ssh: host key mismatch (127.0.0.1:{port})",
        ),
        ("host-key-unknown", Failure.HOST_KEY_UNKNOWN, "ssh: host key unknown (127.0.0.1:{port})"),
        (
            "key-not-authorized",
            Failure.DENIED,
            "ssh: permission denied (publickey) for root@127.0.0.1:{port}",
        ),
        ("outside-staging", Failure.RRSYNC, "rrsync on 127.0.0.1 refused: do not use .. in arg"),
        ("sshd-hangs-up", Failure.CLOSED, "ssh: connection closed by the peer (127.0.0.1:{port})"),
        ("missing-file", Failure.MISSING, "rsync: no status.json on 127.0.0.1"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else "",
)
def test_ssh_failure_is_said_in_ssh_words(
    sshd: Sshd,
    transport: tuple[Transport, Peer],
    tmp_path: Path,
    control_dir: Path,
    fault: str,
    expected: Failure,
    said: str,
) -> None:
    """A push that works (positive control), then the same push broken one way: the result's
    detail is ssh's (or rrsync's) reason with the peer's address, not "unexplained error (code
    255)"; only a port that did not answer counts as a peer that may be down."""
    t, peer = transport
    local = tmp_path / "haproxy.cfg"
    local.write_text("global\n")
    ok = t.push(peer, local, "control.cfg")
    assert ok.outcome is Outcome.OK, ok.detail
    t.close(peer)  # no kept connection: each fault below meets a fresh ssh
    hangs_up = ClosingPort()
    other_key = tmp_path / "other_key"
    keygen(other_key)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    t_bad, peer_bad, remote = t, peer, "x.cfg"
    if fault == "closed-port":
        peer_bad = Peer("lb2", "127.0.0.1", free_port())
    elif fault == "host-key-mismatch":
        wrong = wrong_known_hosts(sshd, tmp_path / "wrong_known_hosts")
        t_bad = Transport(sshd.client_key, control_dir, wrong, timeout=5)
    elif fault == "host-key-unknown":
        t_bad = Transport(sshd.client_key, control_dir, empty, timeout=5)
    elif fault == "key-not-authorized":
        t_bad = Transport(other_key, control_dir, sshd.known_hosts, timeout=5)
    elif fault == "outside-staging":
        remote = "../x.cfg"
    elif fault == "sshd-hangs-up":
        peer_bad = Peer("lb2", "127.0.0.1", hangs_up.port)
    try:
        if fault == "missing-file":
            result = t.fetch(peer, "status.json", tmp_path / "got")
        else:
            result = t_bad.push(peer_bad, local, remote)
    finally:
        hangs_up.close()
    print(result.detail)
    assert result.outcome is Outcome.FAILED
    assert diagnose(result.output)[0] is expected, result.output
    assert result.detail.startswith(said.format(port=peer_bad.port)), result.detail
    assert "unexplained" not in result.detail and "\n" not in result.detail
    assert unanswered(result) is (fault == "closed-port")
    assert not (sshd.staging / "x.cfg").exists() and not (sshd.base / "x.cfg").exists()


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("ssh: connect to host 192.0.2.12 port 22: Connection timed out", Failure.TIMED_OUT),
        ("ssh: connect to host lb2 port 22: Operation timed out", Failure.TIMED_OUT),
        ("ssh: connect to host 192.0.2.12 port 22: No route to host", Failure.NO_ROUTE),
        (
            "ssh: connect to host 192.0.2.12 port 22: Network is unreachable",
            Failure.NET_UNREACHABLE,
        ),
        (
            "ssh: Could not resolve hostname lb9: Name or service not known",
            Failure.UNRESOLVED,
        ),
        ("Connection timed out during banner exchange", Failure.GREETING),
        ("kex_exchange_identification: read: Connection reset by peer", Failure.RESET),
        ("Connection to 192.0.2.12 closed by remote host.", Failure.CLOSED),
        (
            "mux_client_request_session: read from master failed: Broken pipe",
            Failure.MASTER_LOST,
        ),
        ("Timeout, server 192.0.2.12 not responding.", Failure.STALLED),
        ("[sender] io timeout after 6 seconds -- exiting", Failure.STALLED),
        ("rrsync: Not invoked via sshd", Failure.RRSYNC),
        (
            'rsync: [sender] link_stat "/srv/status.json" failed: No such file or directory (2)',
            Failure.MISSING,
        ),
        (
            "rsync: [generator] delete_file: unlink(4) failed: Operation not permitted (1)",
            Failure.OTHER,
        ),
        ("", Failure.OTHER),
    ],
)
def test_diagnose_reads_the_reasons_not_met_on_loopback(output: str, expected: Failure) -> None:
    """ssh's words for a peer that is away at the network level, or a connection that went
    quiet, name their reason too (the lab's e2e tests meet them for real)."""
    tail = "\nrsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
    assert diagnose(output + tail)[0] is expected


@pytest.mark.parametrize(
    ("said", "expected"),
    [
        ("ssh: connect to host 192.0.2.12 port 22: Connection refused", True),
        ("ssh: connect to host 192.0.2.12 port 22: Connection timed out", True),
        ("ssh: connect to host 192.0.2.12 port 22: No route to host", True),
        ("[sender] io timeout after 6 seconds -- exiting", True),
        ("mux_client_request_session: read from master failed: Broken pipe", True),
        ("ssh: Could not resolve hostname lb9: Name or service not known", False),
        ("root@192.0.2.12: Permission denied (publickey).", False),
        ("Host key verification failed.", False),
        ("kex_exchange_identification: Connection closed by remote host", False),
        ("rsync error: some files/attrs were not transferred (code 23)", False),
    ],
)
def test_only_a_port_that_did_not_answer_counts_as_unanswered(said: str, expected: bool) -> None:
    """The peer may be down (worth knocking on) when its port did not answer or the connection
    went quiet; not when ssh got past the port, nor when the name does not resolve."""
    assert unanswered(CommandResult(Outcome.FAILED, "exit 255", 0.1, said + "\n")) is expected


def test_timeout_of_the_whole_command_counts_as_unanswered() -> None:
    """rsync killed at its deadline: the peer may be down, whatever it printed."""
    assert unanswered(CommandResult(Outcome.TIMEOUT, "rsync timed out after 20 s", 20.0))
    assert not unanswered(CommandResult(Outcome.OK, "exit 0", 0.1))


def test_knock_tells_an_open_port_from_a_closed_and_a_silent_one(sshd: Sshd) -> None:
    """A TCP connect to the peer's ssh port: sshd's port answers; a closed port is refused at
    once; a port whose accept queue is full drops the SYN, so the knock times out."""
    assert knock(Peer("lb2", "127.0.0.1", sshd.port), 1.0).outcome is Outcome.OK
    closed = knock(Peer("lb2", "127.0.0.1", free_port()), 1.0)
    assert closed.outcome is Outcome.FAILED and closed.detail == "connection refused"
    # listen(0) queues one connection; with one queued and never accepted, Linux drops
    # further SYNs (tcp_abort_on_overflow=0): the next connect sees no answer at all.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    port = int(silent.getsockname()[1])
    held = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            held.append(c)
        started = time.monotonic()
        result = knock(Peer("lb2", "127.0.0.1", port), 0.5)
        assert result.outcome is Outcome.TIMEOUT, result.detail
        assert 0.4 < time.monotonic() - started < 2.0
    finally:
        for c in held:
            c.close()
        silent.close()


def test_long_control_dir_is_a_clear_error(tmp_path: Path) -> None:
    """A control_dir too long for a socket path fails with a sentence, not ssh's exit 255."""
    t = Transport(tmp_path / "key", Path("/tmp/" + "x" * 80), None, timeout=5)
    result = t.push(Peer("lb2", "127.0.0.1"), tmp_path / "f", "f")
    assert result.outcome is Outcome.FAILED and "too long" in result.detail
