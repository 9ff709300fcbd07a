"""`lbwatch sync setup` against a real sshd on loopback standing for the peer, reached with
an operator's own (unrestricted) login key: the sync key made, the peer's host key trusted only
once accepted, the restricted entry installed (replacing an older one of the same key, never
twice), and the sync checks of `lbwatch doctor` proving the key works and is confined."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbwatch.cli import main
from lbwatch.sync.transport import rrsync_authorized_keys_line
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
