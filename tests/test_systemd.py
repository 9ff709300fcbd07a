"""sd_notify against a real AF_UNIX datagram socket; journald's <N> prefixes."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.systemd import JournalFormatter, Notifier, readwrite_fix, sandbox_hint, under_journald


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def test_ready_status_watchdog_datagrams(notify_socket: tuple[socket.socket, str]) -> None:
    """READY=1 with STATUS, WATCHDOG=1 and STOPPING=1 arrive as sd_notify(3) datagrams."""
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.ready("haproxy up (1); keepalived up (2)")
    assert sock.recv(4096) == b"READY=1\nSTATUS=haproxy up (1); keepalived up (2)"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.reloading()
    msg = sock.recv(4096).decode()
    assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_abstract_socket() -> None:
    """A NOTIFY_SOCKET starting with '@' is an abstract socket name."""
    name = f"lbwatch-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.status("hello")
        assert sock.recv(100) == b"STATUS=hello"
        n.close()
    finally:
        sock.close()


def test_no_socket_is_a_quiet_no_op() -> None:
    """Outside systemd nothing is sent and nothing fails."""
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and n.watchdog_interval is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """Ping at half WATCHDOG_USEC, and only when the watchdog is meant for this PID."""
    assert Notifier(env).watchdog_interval == expected


def test_journal_formatter_prefixes_every_line() -> None:
    """Each line carries the syslog priority, so a traceback stays at error level."""
    fmt = JournalFormatter("%(message)s")
    rec = logging.LogRecord("lbwatch", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert fmt.format(rec) == "<4>a\n<4>b"
    rec = logging.LogRecord("lbwatch", logging.ERROR, __file__, 1, "x", None, None)
    assert fmt.format(rec) == "<3>x"


def test_under_journald_matches_stderr_inode(monkeypatch: pytest.MonkeyPatch) -> None:
    """JOURNAL_STREAM counts only when it names the device and inode of our stderr."""
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert under_journald()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not under_journald()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not under_journald()


def test_full_receiver_never_blocks(notify_socket: tuple[socket.socket, str]) -> None:
    """A receiver that does not drain its queue makes sends fail, never hang the agent."""
    _sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    results = [n.watchdog() for _ in range(5000)]
    assert results[0] and not results[-1]
    n.close()


@pytest.mark.parametrize(
    ("code", "exec_pid", "hinted"),
    [
        (errno.EROFS, "self", True),
        (errno.EACCES, "self", True),
        (errno.ENOSPC, "self", False),  # not the sandbox
        (errno.EROFS, "1", False),  # another process is the unit's: lbwatch run by hand
        (errno.EROFS, "", False),  # no systemd at all
    ],
)
def test_a_refused_write_of_the_units_process_gets_the_drop_in(
    monkeypatch: pytest.MonkeyPatch, code: int, exec_pid: str, hinted: bool
) -> None:
    """EROFS or EACCES in the unit's own process: the drop-in doctor gives; otherwise nothing."""
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.setenv("SYSTEMD_EXEC_PID", str(os.getpid()) if exec_pid == "self" else exec_pid)
    hint = sandbox_hint("/srv/metrics", OSError(code, os.strerror(code)))
    assert (readwrite_fix("/srv/metrics") in hint) is hinted
    assert bool(hint) is hinted
