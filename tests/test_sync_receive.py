"""The receiving side on the real filesystem, with the real haproxy checker."""

from __future__ import annotations

import functools
import hashlib
import stat
from pathlib import Path

import pytest

from lbwatch.config import HaproxyCfg
from lbwatch.services import reload_haproxy, run_command
from lbwatch.sync import peerstatus
from lbwatch.sync.fileset import FileSet
from lbwatch.sync.install import backups
from lbwatch.sync.peerstatus import STATUS, FileStatus
from lbwatch.sync.receive import ApplySettings, receive
from lbwatch.sync.versions import Version
from tests.conftest import free_port, haproxy_config, needs
from tests.fakes import Expectations
from tests.util import confined

pytestmark = needs("haproxy")
CHECK = ["haproxy", "-c", "-f", "{file}"]


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(staging, live config, reload marker)."""
    staging, etc = tmp_path / "staging", tmp_path / "etc"
    staging.mkdir()
    etc.mkdir()
    live = haproxy_config(etc / "haproxy.cfg", free_port(), free_port())
    return staging, live, tmp_path / "reloaded"


def stage(staging: Path, content: bytes, edited: int, origin: str = "lb1") -> tuple[Path, Version]:
    v = Version("haproxy.cfg", origin, edited, edited, hashlib.sha256(content).hexdigest())
    path = staging / v.staged_name()
    path.write_bytes(content)
    return path, v


def run(
    staged: Path,
    live: Path,
    marker: Path,
    current: Version | None,
    accepted: list[tuple[Path, str]],
):
    settings = ApplySettings(
        CHECK, lambda: run_command(["touch", str(marker)], 30), 3, 30, confined()
    )
    expect = Expectations()
    rec = receive(staged, FileSet(live), current, 0, settings, expect)
    accepted += expect.accepted
    return rec


def status(staging: Path) -> FileStatus:
    return peerstatus.parse((staging / STATUS).read_bytes())["haproxy.cfg"]


def test_newer_valid_version_applied(node: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Valid and newer: the watcher is told first, then installed, reloaded, reported."""
    staging, live, marker = node
    new = haproxy_config(tmp_path / "new.cfg", free_port(), free_port()).read_bytes()
    staged, v = stage(staging, new, 2_000)
    accepted: list[tuple[Path, str]] = []
    rec = run(staged, live, marker, None, accepted)
    assert rec.result == "applied" and rec.current == v
    assert live.read_bytes() == new and marker.exists()
    assert accepted == [(live, v.digest)]
    assert len(backups(live)) == 1
    assert status(staging).result == "applied" and not staged.exists()


def test_invalid_version_rejected_with_checker_message(node: tuple[Path, Path, Path]) -> None:
    """Invalid: not installed, not reloaded; the checker's words go back to the sender."""
    staging, live, marker = node
    before = live.read_bytes()
    staged, _ = stage(staging, b"global\n    no-such-keyword\n", 2_000)
    rec = run(staged, live, marker, None, [])
    assert rec.result == "rejected" and rec.message.startswith("exit 1")
    assert live.read_bytes() == before and not marker.exists()
    assert status(staging).message == rec.message


def test_older_version_kept_aside(node: tuple[Path, Path, Path]) -> None:
    """Our version is newer: theirs is kept in staging's .kept (never beside the live file,
    where a later config could load it), root's alone, and reported; ours stays."""
    staging, live, marker = node
    before = live.read_bytes()
    ours = Version("haproxy.cfg", "lb2", 5_000, 5_000, hashlib.sha256(before).hexdigest())
    staged, _ = stage(staging, b"global\n    maxconn 1\n", 1_000, origin="lb1")
    rec = run(staged, live, marker, ours, [])
    assert rec.result == "kept-local" and rec.current == ours
    assert live.read_bytes() == before and not marker.exists()
    assert not list(live.parent.glob("haproxy.cfg.lbwatch-lost-*"))
    (lost,) = (staging / ".kept").glob("haproxy.cfg.lbwatch-lost-lb1-*")
    assert lost.read_bytes() == b"global\n    maxconn 1\n"
    assert str(lost) in rec.message and stat.S_IMODE(lost.stat().st_mode) == 0o600


def test_damaged_file_rejected(node: tuple[Path, Path, Path]) -> None:
    """Content that does not match the hash in its name is refused."""
    staging, live, marker = node
    staged, _ = stage(staging, b"global\n", 2_000)
    staged.write_bytes(b"tampered\n")
    rec = run(staged, live, marker, None, [])
    assert rec.result == "rejected" and "hash" in rec.message


def test_same_content_is_nothing(node: tuple[Path, Path, Path]) -> None:
    """The content we already run: no install, no reload, but the later version is kept."""
    staging, live, marker = node
    content = live.read_bytes()
    ours = Version("haproxy.cfg", "lb2", 1_000, 1_000, hashlib.sha256(content).hexdigest())
    staged, v = stage(staging, content, 2_000)
    rec = run(staged, live, marker, ours, [])
    assert rec.result == "same" and rec.current == v and not marker.exists()


def test_failed_reload_restores_previous_config(
    node: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Valid but the reload fails: the previous config goes back live (the watcher told of
    each), and the failure is reported."""
    staging, live, _ = node
    before = live.read_bytes()
    new = haproxy_config(tmp_path / "new.cfg", free_port(), free_port()).read_bytes()
    staged, v = stage(staging, new, 2_000)
    settings = ApplySettings(CHECK, lambda: run_command(["false"], 30), 3, 30, confined())
    expect = Expectations()
    rec = receive(staged, FileSet(live), None, 0, settings, expect)
    assert rec.result == "reload-failed" and "previous config restored" in rec.message
    assert live.read_bytes() == before and rec.current is None
    assert [d for _, d in expect.accepted] == [v.digest, hashlib.sha256(before).hexdigest()]


def test_install_with_haproxy_not_running_does_not_claim_a_reload(
    node: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """No haproxy to reload: the version is installed and applied, and the report (to the
    sender and in the logs) says it takes effect at haproxy's next start, not "reloaded"."""
    staging, live, _ = node
    new = haproxy_config(tmp_path / "new.cfg", free_port(), free_port()).read_bytes()
    staged, _ = stage(staging, new, 2_000)
    gone = HaproxyCfg(pidfile=tmp_path / "none.pid", find_without_pidfile=False, reload=["false"])
    settings = ApplySettings(
        CHECK, functools.partial(reload_haproxy, gone, 5, 1), 3, 30, confined()
    )
    rec = receive(staged, FileSet(live), None, 0, settings, Expectations())
    assert rec.result == "applied" and live.read_bytes() == new
    assert rec.message.startswith(
        "installed; haproxy not running, takes effect at its next start; previous files kept as "
    ), rec.message
    assert "reloaded" not in rec.message
    assert status(staging).message == rec.message
