"""Checking configs with the real haproxy and installing them atomically with backups."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lbwatch.sync.install import backups, install, restore, validate
from tests.conftest import free_port, haproxy_config, needs

CHECK = ["haproxy", "-c", "-f", "{file}"]


@needs("haproxy")
def test_valid_config_passes(tmp_path: Path) -> None:
    """haproxy -c exit 0: valid."""
    cfg = haproxy_config(tmp_path / "ok.cfg", free_port(), free_port())
    assert validate(CHECK, cfg, 30).ok


@needs("haproxy")
def test_broken_config_rejected_with_the_checkers_words(tmp_path: Path) -> None:
    """A syntax error is invalid, and the checker's message comes back."""
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("global\n    no-such-keyword\n")
    result = validate(CHECK, cfg, 30)
    assert not result.ok
    assert result.message.startswith("exit 1")
    assert "no-such-keyword" in result.message or "ALERT" in result.message


@needs("haproxy")
def test_no_listener_exit_2_is_not_valid(tmp_path: Path) -> None:
    """haproxy 2.x exits 2 for a config without a listener: that must not go live either."""
    cfg = tmp_path / "empty.cfg"
    cfg.write_text("global\n    maxconn 10\n")
    result = validate(CHECK, cfg, 30)
    assert not result.ok and result.message.startswith("exit 2")


def test_install_keeps_owner_mode_and_backups(tmp_path: Path) -> None:
    """The new content replaces the live file with its owner and mode; the old one is kept."""
    live = tmp_path / "haproxy.cfg"
    live.write_text("old\n")
    live.chmod(0o640)
    os.chown(live, 0, 4)  # root:adm, as a packaged file might be
    done = install(b"new\n", live, keep=3, now_wall=1_700_000_000.5)
    assert live.read_text() == "new\n"
    st = live.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (0, 4)
    assert done.backup is not None and done.backup.read_text() == "old\n"
    assert done.backup.name == "haproxy.cfg.lbwatch-20231114T221320.500000"
    assert not list(tmp_path.glob(".*lbwatch-new"))


def test_install_prunes_to_n_generations(tmp_path: Path) -> None:
    """Only the newest ``keep`` backups remain, oldest dropped first."""
    live = tmp_path / "haproxy.cfg"
    live.write_text("v0\n")
    for i in range(1, 6):
        install(f"v{i}\n".encode(), live, keep=2, now_wall=1_700_000_000 + i)
    kept = backups(live)
    assert [p.read_text() for p in kept] == ["v3\n", "v4\n"]
    assert live.read_text() == "v5\n"


def test_restore_puts_the_backup_back(tmp_path: Path) -> None:
    """After a failed reload the previous config goes live again."""
    live = tmp_path / "haproxy.cfg"
    live.write_text("good\n")
    done = install(b"bad\n", live, keep=5, now_wall=1_700_000_000)
    assert done.backup is not None
    restore(live, done.backup)
    assert live.read_text() == "good\n"


def test_install_without_live_file(tmp_path: Path) -> None:
    """A first install creates the file 0644 and has no backup."""
    live = tmp_path / "haproxy.cfg"
    done = install(b"first\n", live, keep=3)
    assert done.backup is None and stat.S_IMODE(live.stat().st_mode) == 0o644


def test_keep_zero_keeps_no_backup(tmp_path: Path) -> None:
    """keep = 0: no backups pile up."""
    live = tmp_path / "haproxy.cfg"
    live.write_text("a\n")
    install(b"b\n", live, keep=0)
    assert backups(live) == []
