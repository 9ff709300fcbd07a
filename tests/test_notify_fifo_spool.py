"""The notify FIFO and the spool against the real filesystem."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lbwatch.notify.fifo import FifoError, FifoReader, ensure_fifo, write_line
from lbwatch.notify.message import agent
from lbwatch.notify.spool import Spool


def test_fifo_created_private(tmp_path: Path) -> None:
    """A missing FIFO is created, mode 0600, owned by us."""
    path = tmp_path / "run" / "keepalived.fifo"
    ensure_fifo(path)
    st = os.lstat(path)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("kind", ["file", "not-ours", "symlink"])
def test_unsafe_paths_refused(tmp_path: Path, kind: str) -> None:
    """A regular file, a FIFO another user owns, or a symlink: refused with the reason."""
    path = tmp_path / "keepalived.fifo"
    if kind == "file":
        path.write_text("x")
    elif kind == "not-ours":
        os.mkfifo(path, 0o600)
        os.chown(path, 65534, 65534)
    else:
        os.mkfifo(tmp_path / "real", 0o600)
        path.symlink_to(tmp_path / "real")
    with pytest.raises(FifoError) as err:
        ensure_fifo(path)
    assert str(path) in str(err.value)


def test_a_fragment_never_swallows_the_next_line(tmp_path: Path) -> None:
    """Whole lines are read as written, and writers opening and closing never end the stream;
    a piece without its newline left once the pipe is drained is dropped and counted, and the
    real line written next is read whole (glued to the piece, it was lost before)."""
    path = tmp_path / "f"
    reader = FifoReader(path)
    reader.open()
    try:
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b'INSTANCE "VI_1" MASTER 100\nGROUP "G" BACKUP 0\n\n')
        os.close(fd)
        assert reader.read_lines() == [b'INSTANCE "VI_1" MASTER 100', b'GROUP "G" BACKUP 0']
        assert reader.fragments == 0
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"garbage without a newline")
        os.close(fd)
        assert reader.read_lines() == []
        assert reader.fragments == 1 and reader.last_fragment == b"garbage without a newline"
        assert write_line(path, 'INSTANCE "VI_2" FAULT 0')
        assert reader.read_lines() == [b'INSTANCE "VI_2" FAULT 0']
    finally:
        reader.close()


def test_replaced_fifo_is_noticed(tmp_path: Path) -> None:
    """Removing or recreating the FIFO shows as replaced(); reopening reads the new one."""
    path = tmp_path / "f"
    reader = FifoReader(path)
    reader.open()
    assert not reader.replaced()
    path.unlink()
    assert reader.replaced()
    os.mkfifo(path, 0o600)
    assert reader.replaced()
    reader.open()
    assert not reader.replaced()
    assert write_line(path, "VS x UP")
    assert reader.read_lines() == [b"VS x UP"]
    reader.close()


def test_write_line_without_reader_fails_fast(tmp_path: Path) -> None:
    """No reader: write_line returns False at once instead of blocking."""
    path = tmp_path / "f"
    os.mkfifo(path, 0o600)
    assert write_line(path, "x") is False
    assert write_line(tmp_path / "missing", "x") is False


def test_spool_order_bound_and_drop_count(tmp_path: Path) -> None:
    """Messages come back oldest first; beyond the bound the oldest go and are counted."""
    spool = Spool(tmp_path / "spool", max_per_channel=3)
    for i in range(5):
        spool.put("email", agent("lb1", "test", f"message {i}", float(i)))
    spool.put("chat", agent("lb1", "test", "other channel", 9.0))
    pending = spool.pending("email")
    texts = [spool.load(p).fields["text"] for p in pending]  # type: ignore[union-attr]
    assert texts == ["message 2", "message 3", "message 4"]
    assert spool.dropped("email") == 2 and spool.dropped("chat") == 0
    assert spool.channels_waiting() == {"email": 3, "chat": 1}
    spool.clear_dropped("email", 2)
    assert spool.dropped("email") == 0
    spool.remove(pending[0])
    assert len(spool.pending("email")) == 2
    assert not list((tmp_path / "spool").glob(".*.tmp"))


def test_corrupt_spool_file_set_aside(tmp_path: Path) -> None:
    """An unreadable message is moved to bad/ rather than blocking its channel forever."""
    spool = Spool(tmp_path / "spool", 10)
    path = spool.put("email", agent("lb1", "test", "ok", 1.0))
    path.write_text("{not json")
    assert spool.load(path) is None
    assert spool.pending("email") == []
    assert (tmp_path / "spool" / "bad" / path.name).exists()


def test_fifo_keepalived_made_is_accepted(tmp_path: Path) -> None:
    """keepalived creates a missing notify_fifo with mode 0644: readable by others is fine,
    only writable by others is not."""
    path = tmp_path / "keepalived-lbwatch.fifo"
    os.mkfifo(path, 0o644)
    path.chmod(0o644)
    ensure_fifo(path)
    reader = FifoReader(path)
    reader.open()
    assert write_line(path, 'INSTANCE "VI_1" BACKUP 97')
    assert reader.read_lines() == [b'INSTANCE "VI_1" BACKUP 97']
    reader.close()


def _opens_as_nobody(path: Path) -> bool:
    """Whether an unprivileged user (uid 65534) can open ``path`` to read it."""
    probe = (
        "import os, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK))\n"
        "except PermissionError:\n"
        "    sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(path)], check=False, timeout=30)
    return done.returncode == 0


@pytest.mark.parametrize("mode", [0o644, 0o666, 0o640])
def test_a_fifo_open_to_others_is_made_private(mode: int) -> None:
    """A FIFO others may read (and steal keepalived's events from) or write (and forge them):
    made 0600 when lbwatch opens it, with a notice for the log and the status; before, any
    user could open it (positive control), after, none can; a 0600 FIFO gets no notice."""
    # pytest's tmp_path sits in a 0700 directory of root's, which no other user can cross.
    with tempfile.TemporaryDirectory(prefix="lbwatch-fifo-") as where:
        Path(where).chmod(0o755)
        _made_private(Path(where) / "keepalived.fifo", mode)


def _made_private(path: Path, mode: int) -> None:
    os.mkfifo(path, 0o600)
    assert ensure_fifo(path) is None
    path.chmod(mode)
    assert _opens_as_nobody(path) is bool(mode & 0o004)
    notice = ensure_fifo(path)
    assert notice is not None and f"{mode:04o}" in notice and "made 0600" in notice
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not _opens_as_nobody(path)


def test_a_flood_of_garbage_on_the_fifo_logs_a_few_lines_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1 MB of random bytes on the FIFO: a few WARNING lines, then one line with the count once
    the interval is over, not thousands (journald's rate limit would then drop real lines);
    a real line in the middle of it is still read (positive control)."""
    import logging
    import random

    from lbwatch.loop import Selector
    from lbwatch.notify import hub as hub_module
    from lbwatch.notify.hub import NotifyHub
    from tests.fakes import config

    now = [1000.0]
    cfg = config(
        agent={"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
        notify={"fifo": str(tmp_path / "keepalived.fifo")},
    )
    hub = NotifyHub(cfg, Selector(), lambda: now[0], lambda: "lb1")
    hub.start()
    routed: list[object] = []
    hub.route = routed.append  # type: ignore[method-assign]
    rng = random.Random(9)
    garbage = bytes(rng.randrange(256) for _ in range(1 << 20)).replace(b'"', b"x")
    caplog.set_level(logging.WARNING, logger="lbwatch.notify.hub")
    try:
        fd = os.open(tmp_path / "keepalived.fifo", os.O_WRONLY | os.O_NONBLOCK)
        try:
            for i in range(0, len(garbage), 4000):
                os.write(fd, garbage[i : i + 4000] + b"\n")
                if i == 512_000:
                    os.write(fd, b'INSTANCE "VI_1" MASTER 100\n')
                hub.on_fifo()
        finally:
            os.close(fd)
        during = len(caplog.records)
        now[0] += hub_module.NOISE_EVERY + 1
        assert write_line(tmp_path / "keepalived.fifo", "junk")
        hub.on_fifo()
    finally:
        hub.close()
    assert hub.malformed > 200
    assert during <= hub_module.NOISE_FIRST
    summaries = [r.getMessage() for r in caplog.records if "not logged" in r.getMessage()]
    assert len(summaries) == 1 and "more malformed notify line(s)" in summaries[0]
    assert len(caplog.records) <= hub_module.NOISE_FIRST + 2
    assert len(routed) == 1


def test_the_agent_waits_for_a_spooling_script_but_not_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripts share the scripts' lock; the agent's start takes it alone: it gets it once no
    script holds it, and gives up waiting after AGENT_WAIT when one hangs holding it."""
    import lbwatch.notify.spool as spool_module

    monkeypatch.setattr(spool_module, "AGENT_WAIT", 0.2)
    spool = Spool(tmp_path / "spool", 10)
    # Two scripts at once (shared), then the agent: it waits 0.2 s, then goes on without it.
    with spool.scripts_lock(), spool.scripts_lock(), spool.scripts_lock(agent=True) as got:
        assert got is False
    with spool.scripts_lock(agent=True) as got:
        assert got is True  # positive control: free, the agent has it
        other = os.open(tmp_path / "spool" / ".scripts.lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # and a script waits for it
                fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(other)
