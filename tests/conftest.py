"""Shared fixtures: a child subreaper so that daemons the tests start are reaped by this process
(PID 1 on these machines does not reap), and real haproxy configs on loopback."""

from __future__ import annotations

import contextlib
import ctypes
import email
import email.message
import email.policy
import errno
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.test_agent import Rig

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="session")
def subreaper() -> Iterator[None]:
    """Orphans of processes this session starts (haproxy -D's master, start-stop-daemon's
    background children) become our children, so they can be reaped and never linger."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    reap()


def reap() -> None:
    """Collect exited children that nobody waits for."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """In CI (CI set in the environment) every tier must run: a test skipped because a daemon,
    a tool or a privilege is missing is a failure there, not a quiet pass."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every tier must run: {report.longrepr}"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """One real agent (tests/test_agent.py's Rig), closed with everything it started."""
    from tests.test_agent import Rig

    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def needs(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def haproxy_config(path: Path, port: int, monitor_port: int) -> Path:
    path.write_text(
        f"""global
    log stderr format raw local0 err

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s

frontend web
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string ok

frontend monitor
    bind 127.0.0.1:{monitor_port}
    monitor-uri /health
"""
    )
    return path


def start_haproxy(cfg_file: Path, pidfile: Path, log: Path) -> subprocess.Popen[bytes]:
    """A real haproxy master-worker in the foreground, as our child, returned once the master
    says "Loading success.": a SIGUSR2 (reload) sent before that is lost (haproxy 2.6 has not
    set up its signal handling yet), which made reload tests fail now and then."""
    out = log.open("wb")
    master = subprocess.Popen(
        ["haproxy", "-W", "-f", str(cfg_file), "-p", str(pidfile)],
        stdin=subprocess.DEVNULL,
        stderr=out,
    )
    out.close()
    deadline = time.monotonic() + 10
    while b"Loading success" not in log.read_bytes():
        if master.poll() is not None or time.monotonic() > deadline:
            master.kill()
            master.wait()
            raise RuntimeError(f"haproxy did not start: {log.read_text(errors='replace')}")
        time.sleep(0.02)
    return master


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of 64 inodes of its own (root): a disk a test can fill without filling
    the host's."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    opts = "size=256k,nr_inodes=64"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` up: the file that takes its room (remove it to free the disk)."""
    filler = disk / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1_000_000):  # bounded: 4 GiB
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def use_up_inodes(disk: Path) -> None:
    """Take the last free inodes of ``disk`` (a small_disk): not even a directory can be made
    now, as on a full ext4 disk (a full tmpfs still makes directories)."""
    for i in range(64):
        try:
            (disk / f".inode{i}").touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return
    raise AssertionError(f"{disk} has inodes left")


class SmtpSink:
    """A real SMTP server on loopback (aiosmtpd) that keeps what it accepted; it can be stopped
    and started again on the same port to play an outage."""

    def __init__(
        self,
        port: int,
        auth: tuple[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        idle_timeout: float | None = None,
    ) -> None:
        """``idle_timeout``: the server closes a connection idle so long, as a real server's
        own timeout does (Postfix's smtpd_timeout)."""
        self.port = port
        self.idle_timeout = idle_timeout
        self.auth = auth
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.messages: list[email.message.EmailMessage] = []
        # Subject substring -> SMTP reply to give instead of accepting (e.g. "550 no").
        self.refuse: dict[str, str] = {}
        self.accepted_at: list[float] = []
        self.rcpts: list[list[str]] = []
        self.peers: list[Any] = []  # the client address of each accepted message's connection
        self.quits = self.noops = 0
        self.controller: Any = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        for needle, reply in self.refuse.items():
            if needle in str(parsed["Subject"]):
                return reply
        self.messages.append(parsed)  # type: ignore[arg-type]
        self.rcpts.append(list(envelope.rcpt_tos))
        self.accepted_at.append(time.time())
        self.peers.append(session.peer)
        return "250 OK"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        self.noops += 1
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 Bye"

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        ok = (
            isinstance(auth_data, LoginPassword)
            and self.auth is not None
            and (auth_data.login.decode(), auth_data.password.decode()) == self.auth
        )
        # handled=False: a refusal is answered "535 ..." (aiosmtpd's default, handled=True,
        # answers nothing and leaves the client waiting for its timeout).
        return AuthResult(success=ok, handled=False)

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        kwargs: dict[str, Any] = {}
        if self.auth is not None:
            kwargs = {"authenticator": self._authenticate, "auth_require_tls": False}
        if self.tls is not None and self.implicit_tls:
            kwargs["ssl_context"] = self.tls
        elif self.tls is not None:
            kwargs.update(tls_context=self.tls, require_starttls=True)
        if self.idle_timeout is not None:
            kwargs["timeout"] = self.idle_timeout
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.messages]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts and appends here: killed and reaped after it."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait(10)


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink(free_port())
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by openssl: (cert, key)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.fixture
def control_dir() -> Iterator[Path]:
    """A directory for ssh's control sockets: short, like /run/lbwatch/ssh, since a socket path
    must fit in 107 bytes (tmp_path is too long)."""
    path = Path(tempfile.mkdtemp(prefix="lbc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
