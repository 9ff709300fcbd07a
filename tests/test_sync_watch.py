"""The config watcher on the real filesystem: every way of saving is exactly one change."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbwatch.sync.watch import Change, ConfigWatcher, FileChange, digest

DEBOUNCE = 0.05


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    d = tmp_path / "haproxy"
    d.mkdir()
    (d / "haproxy.cfg").write_text("global\n    maxconn 100\n")
    return d


@pytest.fixture
def watcher(cfg_dir: Path) -> Iterator[ConfigWatcher]:
    w = ConfigWatcher([str(cfg_dir / "haproxy.cfg"), str(cfg_dir / "*.map")], DEBOUNCE)
    yield w
    w.close()


def settle(w: ConfigWatcher, quiet: float = 0.3) -> list[FileChange]:
    """Run the watcher until nothing has happened for ``quiet`` seconds (bounded to 5 s)."""
    changes: list[FileChange] = []
    deadline = time.monotonic() + 5
    last_activity = time.monotonic()
    while time.monotonic() < deadline:
        due = w.due()
        now = time.monotonic()
        timeout = 0.05 if due is None else max(0.0, min(0.05, due - now))
        ready, _, _ = select.select([w.fileno()], [], [], timeout)
        now = time.monotonic()
        if ready:
            w.on_readable(now)
            last_activity = now
        got = w.collect(now)
        if got:
            changes += got
            last_activity = now
        if w.due() is None and now - last_activity > quiet:
            break
    return changes


def vim_save(path: Path) -> None:
    """The real vim, writing the way it does by default (a new file renamed into place)."""
    subprocess.run(
        [
            "vim",
            "-Nu",
            "NONE",
            "-i",
            "NONE",
            "-es",
            "-c",
            "%s/maxconn 100/maxconn 200/",
            "-c",
            "set backup writebackup backupcopy=no",
            "-c",
            "wq",
            str(path),
        ],
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def emacs_like(path: Path) -> None:
    """emacs: lock symlink .#name, rename the original to name~, write a new file."""
    lock = path.parent / f".#{path.name}"
    lock.symlink_to("root@host.1234:1")
    os.rename(path, path.parent / f"{path.name}~")
    path.write_text("global\n    maxconn 300\n")
    (path.parent / f"#{path.name}#").write_text("autosave")
    lock.unlink()


def nano_like(path: Path) -> None:
    """nano: truncate and rewrite in place, in several writes."""
    with path.open("r+") as f:
        f.truncate(0)
        f.write("global\n")
        f.flush()
        f.write("    maxconn 400\n")


def sed_inplace(path: Path) -> None:
    subprocess.run(["sed", "-i", "s/maxconn 100/maxconn 500/", str(path)], check=True)


def cp_over(path: Path) -> None:
    src = path.parent.parent / "new.cfg"
    src.write_text("global\n    maxconn 600\n")
    subprocess.run(["cp", str(src), str(path)], check=True)


def mv_over(path: Path) -> None:
    src = path.parent.parent / "new.cfg"
    src.write_text("global\n    maxconn 700\n")
    subprocess.run(["mv", str(src), str(path)], check=True)


def rsync_over(path: Path) -> None:
    src = path.parent.parent / "new.cfg"
    src.write_text("global\n    maxconn 800\n")
    # -I: same size and (to the second) same mtime would make rsync skip the copy.
    subprocess.run(["rsync", "-tI", str(src), str(path)], check=True)


def append(path: Path) -> None:
    with path.open("a") as f:
        f.write("# tuned\n")


STYLES: list[tuple[str, Callable[[Path], None]]] = [
    ("vim", vim_save),
    ("emacs", emacs_like),
    ("nano", nano_like),
    ("sed -i", sed_inplace),
    ("cp", cp_over),
    ("mv", mv_over),
    ("rsync", rsync_over),
    ("append", append),
]


@pytest.mark.parametrize("save", [s for _, s in STYLES], ids=[n for n, _ in STYLES])
def test_every_save_style_is_exactly_one_change(
    cfg_dir: Path, watcher: ConfigWatcher, save: Callable[[Path], None]
) -> None:
    """Whatever the tool, one CHANGED event carrying the new content's hash."""
    if save is vim_save and shutil.which("vim") is None:
        pytest.skip("vim is not installed")
    target = cfg_dir / "haproxy.cfg"
    save(target)
    changes = settle(watcher)
    assert changes == [FileChange(target, Change.CHANGED, digest(target))]


def test_same_content_rewritten_is_no_change(cfg_dir: Path, watcher: ConfigWatcher) -> None:
    """A save that leaves the content as it was reports nothing."""
    target = cfg_dir / "haproxy.cfg"
    target.write_text(target.read_text())
    subprocess.run(["touch", str(target)], check=True)
    assert settle(watcher) == []


def test_burst_is_coalesced(cfg_dir: Path, watcher: ConfigWatcher) -> None:
    """Fifty quick writes become one change with the final content."""
    target = cfg_dir / "haproxy.cfg"
    for i in range(50):
        target.write_text(f"global\n    maxconn {i}\n")
    assert settle(watcher) == [FileChange(target, Change.CHANGED, digest(target))]


def test_rename_into_place_skips_the_debounce(cfg_dir: Path) -> None:
    """A file renamed over the config is whole when it lands: due at once, while a write in
    place waits for the quiet time."""
    target = cfg_dir / "haproxy.cfg"
    w = ConfigWatcher([str(target)], debounce=5.0)
    try:
        target.write_text("global\n    maxconn 1\n")
        select.select([w.fileno()], [], [], 2)
        now = time.monotonic()
        w.on_readable(now)
        assert w.collect(now) == []  # in place: waits
        mv_over(target)
        select.select([w.fileno()], [], [], 2)
        now = time.monotonic()
        w.on_readable(now)
        assert w.collect(now) == [FileChange(target, Change.CHANGED, digest(target))]
    finally:
        w.close()


def test_editor_junk_and_other_files_ignored(cfg_dir: Path, watcher: ConfigWatcher) -> None:
    """Swap, backup, lock and unrelated files beside the config are not changes."""
    for name in (
        ".haproxy.cfg.swp",
        "haproxy.cfg~",
        "#haproxy.cfg#",
        "4913",
        "notes.txt",
        ".hosts.map.swp",
        "hosts.map~",
    ):
        (cfg_dir / name).write_text("x")
    assert settle(watcher) == []


def test_glob_pattern_picks_up_new_map_file(cfg_dir: Path, watcher: ConfigWatcher) -> None:
    """A new file matching a watched glob is a change; deleting it is reported as deleted."""
    new_map = cfg_dir / "hosts.map"
    new_map.write_text("example.org be1\n")
    assert settle(watcher) == [FileChange(new_map, Change.CHANGED, digest(new_map))]
    new_map.unlink()
    assert settle(watcher) == [FileChange(new_map, Change.DELETED, None)]


def test_deleted_config_reported(cfg_dir: Path, watcher: ConfigWatcher) -> None:
    """Removing haproxy.cfg is reported as DELETED (the caller never propagates it)."""
    target = cfg_dir / "haproxy.cfg"
    target.unlink()
    assert settle(watcher) == [FileChange(target, Change.DELETED, None)]


def test_directory_replaced_is_watched_again(cfg_dir: Path, watcher: ConfigWatcher) -> None:
    """The whole directory moved away and recreated: the new file's content is a change, and
    later saves in the new directory are seen."""
    target = cfg_dir / "haproxy.cfg"
    cfg_dir.rename(cfg_dir.parent / "haproxy.old")
    cfg_dir.mkdir()
    target.write_text("global\n    maxconn 900\n")
    assert settle(watcher) == [FileChange(target, Change.CHANGED, digest(target))]
    target.write_text("global\n    maxconn 901\n")
    assert settle(watcher) == [FileChange(target, Change.CHANGED, digest(target))]


def test_accepted_content_is_not_reported(cfg_dir: Path, watcher: ConfigWatcher) -> None:
    """A file lbwatch installs itself (from a peer) is accepted first and never reported."""
    target = cfg_dir / "haproxy.cfg"
    staged = cfg_dir.parent / "staged.cfg"
    staged.write_text("global\n    maxconn 1000\n")
    h = digest(staged)
    assert h is not None
    watcher.accept(target, h)
    os.rename(staged, target)
    assert settle(watcher) == []
