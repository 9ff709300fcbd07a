"""Cleaning the staging directory: the decision as a table, the sweep on a real directory in
tmp_path (symlinks, directories, files outside), and the refusal to clean a shared one."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from lbwatch.sync.fileset import FileSet
from lbwatch.sync.staging import Entry, Sweeper, stale, sweeper_for
from lbwatch.sync.versions import Version
from tests.fakes import config

GRACE = 600.0
NOW = 1_000_000.0


def version(edited: int, file: str = "haproxy.cfg", origin: str = "lb2") -> str:
    return Version(file, origin, edited, edited, f"{edited:064x}"[-64:]).staged_name()


NEWEST, OLDER = version(20), version(10)

# name, kind, age (s) -> removed?
TABLE = [
    ("status.json", "file", 10 * GRACE, False),  # what the peers read back
    (".receiver", "dir", 10 * GRACE, False),  # the receivers' limits and session slots
    (NEWEST, "file", 10 * GRACE, False),  # waits for its job (a pause may hold it)
    (OLDER, "file", GRACE, True),  # superseded: the job would drop it
    (version(5), "file", GRACE - 1, False),  # superseded but young: left for the job
    (".haproxy.cfg.Ab12Cd", "file", GRACE - 1, False),  # an rsync temporary, in flight
    (".haproxy.cfg.Zz99Yy", "file", GRACE, True),  # an rsync temporary of a cut-off push
    (version(30, file="haproxy.cfg.bundle"), "file", GRACE, True),  # a unit not synced here
    (version(40), "dir", GRACE, True),  # a directory named as a newer version: not a version
    ("junk", "other", GRACE, True),
    ("from-the-future", "file", -3600.0, False),  # changed after now: a clock stepped back
]


@pytest.mark.parametrize(("name", "kind", "age", "removed"), TABLE, ids=[t[0] for t in TABLE])
def test_what_is_stale(name: str, kind: str, age: float, removed: bool) -> None:
    """Everything unchanged for the grace period goes, except the status file, the receivers'
    directory and the newest staged version of the synced file; anything younger stays."""
    entries = [Entry(n, k, NOW - a) for n, k, a, _ in TABLE]  # type: ignore[arg-type]
    gone = {e.name for e in stale(entries, "haproxy.cfg", NOW, GRACE)}
    assert (name in gone) is removed


def _age(path: Path, changed: float) -> None:
    os.utime(path, (changed, changed), follow_symlinks=False)


def test_sweep_on_a_real_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real sweep removes litter, a symlink as a link (its target outside stays), an empty
    directory, and leaves a non-empty directory and what it holds, reported once."""
    staging = tmp_path / "incoming"
    staging.mkdir()
    outside = tmp_path / "precious"
    outside.write_text("not ours")
    for name in ("status.json", NEWEST, OLDER, ".haproxy.cfg.Zz99Yy", "junk", "young"):
        (staging / name).write_text(name)
    (staging / "link").symlink_to(outside)
    (staging / "empty").mkdir()
    (staging / "tree").mkdir()
    (staging / "tree" / "inside").write_text("x")
    # A sweep an hour and a grace period from now: everything is stale but "young", whose
    # mtime is set a second before then (ctime cannot be set back, so the clock moves instead).
    now = time.time() + 3600 + GRACE
    _age(staging / "young", now - 1)
    sweeper = Sweeper(staging, "haproxy.cfg", GRACE)
    with caplog.at_level(logging.INFO, logger="lbwatch.sync.staging"):
        removed = sweeper.sweep(now)
        assert sweeper.sweep(now) == []
    assert sorted(removed) == sorted([OLDER, ".haproxy.cfg.Zz99Yy", "junk", "link", "empty"])
    assert sorted(p.name for p in staging.iterdir()) == sorted(
        ["status.json", NEWEST, "young", "tree"]
    )
    assert outside.read_text() == "not ours" and (staging / "tree" / "inside").exists()
    assert sum("cannot remove tree" in r.message for r in caplog.records) == 1
    assert "staging: removed junk: unchanged for over 600 s and not a version in flight" in (
        caplog.text
    )


def test_nothing_is_removed_before_the_grace_period(tmp_path: Path) -> None:
    """A sweep now removes nothing just written, whatever its name or (old) mtime: the change
    time counts too, so a file pushed with an old mtime is not taken for litter."""
    staging = tmp_path / "incoming"
    staging.mkdir()
    for name in (OLDER, ".haproxy.cfg.Zz99Yy", "junk"):
        (staging / name).write_text(name)
        _age(staging / name, 0)  # mtime in 1970
    assert Sweeper(staging, "haproxy.cfg", GRACE).sweep(time.time()) == []
    assert len(list(staging.iterdir())) == 3


def test_a_staging_directory_that_holds_our_own_state_is_not_swept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The default staging directory is swept; one set to the state directory (the ledger,
    the pause flag) or to haproxy's config directory is refused, logged, and left alone."""
    state = tmp_path / "state"

    def sweeper(staging: Path) -> Sweeper:
        cfg = config(
            agent={"state_dir": str(state), "run_dir": str(tmp_path / "run")},
            sync={
                "enabled": True,
                "config": str(tmp_path / "etc" / "haproxy.cfg"),
                "staging_dir": str(staging),
            },
        )
        return sweeper_for(cfg, FileSet(cfg.sync.config))

    later = time.time() + 3600 + GRACE
    for staging in (state / "incoming", state, tmp_path / "etc", tmp_path):
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "paused").write_text("")
    assert sweeper(state / "incoming").sweep(later) == ["paused"]  # positive control
    with caplog.at_level(logging.ERROR, logger="lbwatch.sync.staging"):
        for staging in (state, tmp_path / "etc", tmp_path):
            assert sweeper(staging).sweep(later) == []
            assert (staging / "paused").exists()
    assert "give [sync] staging_dir a directory of its own" in caplog.text
