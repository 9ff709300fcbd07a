"""rsync over ssh to a real sshd on loopback, with the restricted sync key the peers use."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.events import Outcome
from lbwatch.sync.transport import Peer, Transport, authorized_keys_line
from tests.conftest import free_port, needs
from tests.lab.ssh import keygen, known_hosts_line, write_sshd_config
from tests.util import wait_for

pytestmark = [
    needs("ssh", "ssh-keygen", "rsync", "rrsync"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs sshd"),
]


class Sshd:
    """A private sshd on 127.0.0.1 whose only authorized key is the restricted sync key."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.staging = base / "staging"
        self.staging.mkdir()
        self.client_key = base / "sync_key"
        pub = keygen(self.client_key)
        host_key = base / "host_key"
        host_pub = keygen(host_key)
        auth = base / "authorized_keys"
        auth.write_text(authorized_keys_line(self.staging, pub) + "\n")
        auth.chmod(0o600)
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text(known_hosts_line("127.0.0.1", self.port, host_pub) + "\n")
        config = write_sshd_config(base, "127.0.0.1", self.port, host_key, auth, base / "sshd.pid")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        with (base / "sshd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for(self._listening, 10, what="sshd listening")

    def _listening(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def control_dir() -> Iterator[Path]:
    """Short, like /run/lbwatch/ssh: a socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="lbs", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
    at an absolute path."""
    t, peer = transport
    local = tmp_path / "x.cfg"
    local.write_text("x\n")
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
    runs."""
    t, peer = transport
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


def test_unknown_host_key_refused(sshd: Sshd, tmp_path: Path, control_dir: Path) -> None:
    """With known_hosts given, a host key that does not match is refused (no TOFU)."""
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(
        f"[127.0.0.1]:{sshd.port} ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIHn0fSxiqJq0gHbP3b5UCtxdjuhwq4J2mdxgtv6p5Vvb\n"
    )
    t = Transport(sshd.client_key, control_dir, wrong, timeout=5)
    local = tmp_path / "x.cfg"
    local.write_text("x\n")
    result = t.push(Peer("lb2", "127.0.0.1", sshd.port), local, "x.cfg")
    assert result.outcome is not Outcome.OK
    assert not (sshd.staging / "x.cfg").exists()


def test_long_control_dir_is_a_clear_error(tmp_path: Path) -> None:
    """A control_dir too long for a socket path fails with a sentence, not ssh's exit 255."""
    t = Transport(tmp_path / "key", Path("/tmp/" + "x" * 80), None, timeout=5)
    result = t.push(Peer("lb2", "127.0.0.1"), tmp_path / "f", "f")
    assert result.outcome is Outcome.FAILED and "too long" in result.detail
