"""`lbwatch sync setup` against a real sshd on loopback standing for the peer, reached with
an operator's own (unrestricted) login key: the sync key made, the peer's host key trusted only
once accepted, the restricted entry installed (replacing an older one of the same key, never
twice), and the sync checks of `lbwatch doctor` proving the key works and is confined. When
the peer cannot serve the key yet, the check says which of its own steps is missing: sshd not
answering, lbwatch not found there, lbwatch there not set up for sync, or a user who may not
use its staging directory."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.cli import main
from lbwatch.config import load
from lbwatch.doctor import remote
from lbwatch.sync import limits
from lbwatch.sync.transport import rrsync_authorized_keys_line
from tests.conftest import needs
from tests.sshd import NEEDS_SSHD, Sshd, tree_lbwatch

pytestmark = NEEDS_SSHD


class Peer:
    def __init__(self, tmp: Path, control_dir: Path) -> None:
        # The key sshd authorizes is the operator's: unrestricted, as a root login is.
        self.sshd = Sshd(tmp / "peer", lambda staging, pub: pub)
        self.operator_line = self.sshd.auth.read_text().strip()
        self.key = tmp / "node" / "sync_key"
        self.known_hosts = tmp / "node" / "known_hosts"
        self.config = tmp / "lbwatch.toml"
        self.own_staging = tmp / "state" / "incoming"  # this node's: its agent's default
        self.program = tree_lbwatch(tmp)  # the peer's lbwatch: this tree's
        self.config.write_text(f"""
[agent]
node_name = "lb1"
run_dir = "{tmp / "run"}"
state_dir = "{tmp / "state"}"

[sync]
config = "{tmp / "haproxy.cfg"}"
ssh_key = "{self.key}"
known_hosts = "{self.known_hosts}"
control_dir = "{control_dir}"
timeout = 5.0
peers = [{{ name = "lb2", host = "127.0.0.1", port = {self.sshd.port} }}]
""")

    def setup(self, *extra: str) -> int:
        return main(
            ["--config", str(self.config), "sync", "setup", "lb2",
             "--identity", str(self.sshd.client_key),
             "--authorized-keys", str(self.sshd.auth),
             "--program", self.program, "--staging", str(self.sshd.staging), *extra]
        )  # fmt: skip

    def entries(self) -> list[str]:
        return [ln for ln in self.sshd.auth.read_text().splitlines() if ln.strip()]


@pytest.fixture
def peer(tmp_path: Path, control_dir: Path) -> Peer:
    p = Peer(tmp_path, control_dir)
    yield p  # type: ignore[misc]
    p.sshd.stop()


def test_setup_makes_the_key_trusts_the_host_installs_the_entry_and_proves_it(
    peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert peer.setup("--install", "--accept") == 0
    out = capsys.readouterr().out
    assert peer.key.exists() and peer.key.stat().st_mode & 0o777 == 0o600
    assert f"[127.0.0.1]:{peer.sshd.port} " in peer.known_hosts.read_text()
    assert "SHA256:" in out  # the fingerprint shown
    blob = peer.key.with_name("sync_key.pub").read_text().split()[1]
    mine = [e for e in peer.entries() if blob in e]
    assert len(mine) == 1 and mine[0].startswith('restrict,command="')
    # The peer counts this key's sessions as lb1's; this node's own receivers know its unit.
    assert f" receive --peer lb1 {peer.sshd.staging}" in mine[0]
    assert b'"unit": "haproxy.cfg"' in (peer.own_staging / ".receiver" / "limits.json").read_bytes()
    assert peer.operator_line in peer.entries()  # the operator's own entry is left alone
    assert "answers through lbwatch's receiver" in out
    assert "the sync key runs nothing else" in out
    # Again: nothing changes, still one entry.
    before = peer.sshd.auth.read_text()
    assert peer.setup("--install", "--accept") == 0
    assert peer.sshd.auth.read_text() == before
    assert "host key already in" in capsys.readouterr().out


def test_an_older_entry_of_the_key_is_replaced(peer: Peer) -> None:
    """A peer authorized through rrsync before lbwatch had a receiver: its entry for the key
    becomes the receiver's, not a second one beside it."""
    assert peer.setup("--accept") == 1  # the key made, nothing installed: checks fail
    pub = peer.key.with_name("sync_key.pub").read_text()
    with peer.sshd.auth.open("a") as f:
        f.write(rrsync_authorized_keys_line(peer.sshd.staging, pub) + "\n")
    assert peer.setup("--install", "--accept") == 0
    mine = [e for e in peer.entries() if pub.split()[1] in e]
    assert len(mine) == 1 and "rrsync" not in mine[0], mine


def test_a_host_key_is_not_trusted_unseen(peer: Peer, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --accept (and no terminal to ask at), the fingerprints are shown and nothing is
    written or installed."""
    assert peer.setup("--install") == 1
    captured = capsys.readouterr()
    assert "then run again with --accept" in captured.err
    assert not peer.known_hosts.exists()
    assert peer.entries() == [peer.operator_line]


def test_without_install_the_entry_is_printed(
    peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The line to add is printed; the checks then fail, since the peer does not know the key."""
    assert peer.setup("--accept") == 1
    out = capsys.readouterr().out
    pub = peer.key.with_name("sync_key.pub").read_text().strip()
    assert f" {pub}" in out and 'restrict,command="' in out
    assert peer.entries() == [peer.operator_line]


def not_about_sshd(captured: pytest.CaptureResult[str]) -> bool:
    """Nothing in setup's output sends the operator to the peer's sshd, nor is a traceback."""
    said = captured.out + captured.err
    return "sshd reachable" not in said and "is sshd up" not in said and "Traceback" not in said


def _finding(out: str, level: str) -> tuple[str, str]:
    """The one finding of ``level`` in setup's output, and the fix printed under it."""
    lines = out.splitlines()
    at = [i for i, ln in enumerate(lines) if ln.startswith(level)]
    assert len(at) == 1, out
    fix = lines[at[0] + 1].strip()
    assert fix.startswith("fix: "), out
    return lines[at[0]], fix


def test_a_peer_not_set_up_for_sync_yet_is_named_with_the_step_there(
    peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Set up before the peer's lbwatch has [sync] (so no staging directory there, which its
    agent makes): the entry goes in all the same and the key is proved confined; the check
    says the peer's lbwatch takes no sync yet and what to do on the peer, not to look at sshd,
    as a warning, since nothing needs running again here. `lbwatch doctor` counts it as an
    error. Once the peer's agent has made its staging, the same check passes."""
    shutil.rmtree(peer.sshd.staging)
    assert peer.setup("--install", "--accept") == 0
    captured = capsys.readouterr()
    what, fix = _finding(captured.out, "WARN")
    assert "peer lb2 (127.0.0.1)" in what and "takes no config sync yet" in what, what
    assert f"{peer.sshd.staging} does not exist there" in what, what
    assert "on lb2:" in fix and "[sync]" in fix and "lb1" in fix, fix
    assert "systemctl reload-or-restart lbwatch" in fix, fix
    assert not_about_sshd(captured)
    assert "the sync key runs nothing else" in captured.out  # confined, proved all the same
    blob = peer.key.with_name("sync_key.pub").read_text().split()[1]
    assert len([e for e in peer.entries() if blob in e]) == 1
    doctor = [f for f in remote.peers(load(peer.config)) if "takes no config sync" in f.what]
    assert [f.level for f in doctor] == ["error"], doctor
    # What the peer's agent does once [sync] is configured there (and `sync setup` there).
    limits.publish(peer.sshd.staging, limits.Limits("haproxy.cfg"))
    assert peer.setup("--accept") == 0
    out = capsys.readouterr().out
    assert "answers through lbwatch's receiver" in out and "WARN" not in out, out


@pytest.mark.parametrize("program", ["lbwatch-not-installed", "/nonexistent/bin/lbwatch"])
def test_lbwatch_not_found_on_the_peer_is_said_so(
    peer: Peer, capsys: pytest.CaptureFixture[str], program: str
) -> None:
    """The entry's command is not on the peer (not installed, not on sshd's PATH there, or
    a wrong path): the check says so with the command's name, and how to name it, not to
    look at sshd; one finding, not a second one about the forbidden command."""
    assert peer.setup("--install", "--accept", "--program", program) == 1
    captured = capsys.readouterr()
    what, fix = _finding(captured.out, "ERROR")
    assert "peer lb2 (127.0.0.1)" in what and f"{program} is not found on 127.0.0.1" in what
    assert "install lbwatch on lb2" in fix and "--program /usr/bin/lbwatch" in fix, fix
    assert not_about_sshd(captured)
    assert "WARN" not in captured.out, captured.out


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may pass through, as /var/lib is (tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="lbws", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs("setpriv")
def test_a_staging_the_keys_user_may_not_use_is_a_permission_problem(
    peer: Peer, capsys: pytest.CaptureFixture[str], open_dir: Path
) -> None:
    """The key authorized for a user other than root (its receiver runs as nobody here) on
    a peer whose staging is root's, as its agent makes it: the check names that user, the
    directory and the permission denied, not sshd."""
    staging = open_dir / "incoming"
    staging.mkdir(mode=0o755)
    limits.publish(staging, limits.Limits("haproxy.cfg"))  # .receiver: root's, 0700
    peer.program = tree_lbwatch(open_dir, "nobody")
    assert peer.setup("--install", "--accept", "--staging", str(staging)) == 1
    captured = capsys.readouterr()
    what, fix = _finding(captured.out, "ERROR")
    assert "peer lb2 (127.0.0.1)" in what and "runs as nobody" in what, what
    assert str(staging) in what and "Permission denied" in what, what
    assert "nobody" in fix and str(staging) in fix, fix
    assert not_about_sshd(captured)


def test_a_peer_whose_sshd_does_not_answer_is_said_to_be(
    peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """sshd not answering: before its host key is known, setup stops at that step with the
    one line asking whether sshd is up, nothing written; once it is known, the check says
    the connection was refused and asks for the peer's sshd (where that hint is right)."""
    assert peer.setup("--install", "--accept") == 0
    capsys.readouterr()
    peer.sshd.stop()
    assert peer.setup("--accept") == 1
    captured = capsys.readouterr()
    what, fix = _finding(captured.out, "ERROR")
    assert f"ssh: connection refused (127.0.0.1:{peer.sshd.port})" in what, what
    assert "sshd reachable" in fix, fix
    peer.known_hosts.unlink()
    assert peer.setup("--install", "--accept") == 1
    captured = capsys.readouterr()
    assert captured.err == (
        f"lbwatch sync setup: lb2: no host key from 127.0.0.1:{peer.sshd.port} (is sshd up?)\n"
    )
    assert not peer.known_hosts.exists()
