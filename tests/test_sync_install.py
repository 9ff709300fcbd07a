"""Checking configs with the real haproxy and installing them atomically with backups."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from lbwatch.fsutil import exchange
from lbwatch.sync.install import (
    ABSENT,
    Kept,
    LiveChanged,
    backups,
    install,
    keep_copy,
    kept,
    restore,
    validate,
)
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
    assert not list(tmp_path.glob(".*"))


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
    restore(live, done.previous or b"")
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


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _private(live: Path) -> None:
    """A config that holds secrets: 0640, group adm, not root's uid either."""
    live.chmod(0o640)
    os.chown(live, 65534, 4)


def _same_owner(copy: Path, live: Path) -> bool:
    a, b = copy.stat(), live.stat()
    return (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (b.st_uid, b.st_gid, 0o640)


def test_guarded_install_replaces_what_was_judged(tmp_path: Path) -> None:
    """Positive control: the live file holds what the decision was based on, so the install
    goes through and the replaced content is the backup."""
    live = tmp_path / "haproxy.cfg"
    live.write_text("recorded\n")
    done = install(b"theirs\n", live, keep=3, was=_sha(b"recorded\n"))
    assert live.read_text() == "theirs\n"
    assert done.backup is not None and done.backup.read_text() == "recorded\n"


def test_guarded_install_never_overwrites_an_edit(tmp_path: Path) -> None:
    """The live file holds an operator's save the decision did not see: nothing changes, not
    even a backup or a temporary file, and LiveChanged says so."""
    live = tmp_path / "haproxy.cfg"
    live.write_text("operator's save\n")
    _private(live)
    with pytest.raises(LiveChanged):
        install(b"theirs\n", live, keep=3, was=_sha(b"recorded\n"))
    assert live.read_text() == "operator's save\n" and _same_owner(live, live)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["haproxy.cfg"]


def test_guarded_install_of_a_new_file_never_replaces_one(tmp_path: Path) -> None:
    """A file the recorded version did not have (ABSENT) is created; one that appeared
    meanwhile is left alone."""
    new = tmp_path / "new.map"
    install(b"a 1\n", new, keep=3, was=ABSENT)
    assert new.read_text() == "a 1\n"
    with pytest.raises(LiveChanged):
        install(b"b 2\n", new, keep=3, was=ABSENT)
    assert new.read_text() == "a 1\n"


def test_exchange_swaps_two_files(tmp_path: Path) -> None:
    """The kernel swaps two paths in one step (the mechanism behind the guard)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("A")
    b.write_text("B")
    assert exchange(a, b)
    assert (a.read_text(), b.read_text()) == ("B", "A")


def test_every_kept_copy_is_as_private_as_the_live_file(tmp_path: Path) -> None:
    """Backups, lost and failed copies take the live file's owner, group and mode (0640, not
    the 0644 a plain write gives), and each kind is pruned to ``keep`` on its own."""
    live = tmp_path / "haproxy.cfg"
    live.write_text("secret v0\n")
    _private(live)
    for i in range(1, 5):
        install(f"secret v{i}\n".encode(), live, keep=2, now_wall=1_700_000_000 + i)
        keep_copy(live, b"lost\n", Kept.LOST, 2, "lb2", now_wall=1_700_000_000 + i)
        keep_copy(live, b"failed\n", Kept.FAILED, 2, now_wall=1_700_000_000 + i)
    copies = {kind: kept(live, kind) for kind in Kept}
    assert [len(c) for c in copies.values()] == [2, 2, 2]
    assert copies[Kept.LOST][0].name == "haproxy.cfg.lbwatch-lost-lb2-20231114T221323.000000"
    assert copies[Kept.FAILED][-1].name == "haproxy.cfg.lbwatch-failed-20231114T221324.000000"
    for path in [live, *copies[Kept.BACKUP], *copies[Kept.LOST], *copies[Kept.FAILED]]:
        assert _same_owner(path, live), path
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
