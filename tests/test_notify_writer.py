"""The agent's running look at whether keepalived writes the FIFO it reads (``WriterWatch``),
with a stand-in writer that holds the FIFO open as keepalived does."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from lbwatch.events import ProcId
from lbwatch.notify import writer
from lbwatch.notify.fifo import fifo_ident
from tests.test_cluster_sink import ticks_of
from tests.test_doctor_fifo import start_writer


def ident(proc: subprocess.Popen[bytes]) -> ProcId:
    """``proc`` as the agent's scan would see it."""
    return ProcId(proc.pid, ticks_of(proc.pid), "keepalived", time.monotonic(), time.time())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_replaced_fifo_is_said_once_and_cleared_by_a_keepalived_that_opens_the_new_one(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Positive control first (the writer holds the FIFO there: nothing said); the FIFO
    replaced: the problem is returned once, kept while it lasts; a new keepalived holding the
    new FIFO clears it."""
    path = tmp_path / "ka.fifo"
    os.mkfifo(path, 0o600)
    first = start_writer(path)
    procs.append(first)
    clock = Clock()
    watch = writer.WriterWatch(clock)
    ka = ident(first)
    assert watch.check(str(path), fifo_ident(path), ka, [first.pid]) is None
    assert watch.problem is None

    path.unlink()
    os.mkfifo(path, 0o600)
    assert watch.check(str(path), fifo_ident(path), ka, [first.pid]) is None  # not yet
    clock.now += writer.GRACE
    said = watch.check(str(path), fifo_ident(path), ka, [first.pid])
    assert said == writer.problem("old", first.pid, str(path))
    assert said is not None and "removed or replaced" in said
    assert watch.check(str(path), fifo_ident(path), ka, [first.pid]) is None  # said once
    assert watch.problem == said

    second = start_writer(path)  # keepalived restarted (or reloaded): it opens the new FIFO
    procs.append(second)
    assert watch.check(str(path), fifo_ident(path), ident(second), [second.pid]) is None
    assert watch.problem is None


def test_a_keepalived_without_the_fifo_is_said_only_once_it_lasts(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """keepalived's VRRP process opens the FIFO a moment after it starts, and a reload closes
    and reopens it: a keepalived without the FIFO is said only once that has lasted GRACE
    seconds, and a moment without it in between starts the wait again."""
    path = tmp_path / "ka.fifo"
    os.mkfifo(path, 0o600)
    bare = start_writer(None)
    holder = start_writer(path)  # the same keepalived after its VRRP process opened the FIFO
    procs += [bare, holder]
    clock = Clock()
    watch = writer.WriterWatch(clock)
    ka = ident(bare)
    assert watch.check(str(path), fifo_ident(path), ka, [bare.pid]) is None
    clock.now += writer.GRACE - 0.5
    assert watch.check(str(path), fifo_ident(path), ka, [bare.pid]) is None
    assert watch.check(str(path), fifo_ident(path), ka, [bare.pid, holder.pid]) is None
    clock.now += 1.0  # a reload's moment without it: the wait starts again
    assert watch.check(str(path), fifo_ident(path), ka, [bare.pid]) is None
    assert watch.problem is None
    clock.now += writer.GRACE
    said = watch.check(str(path), fifo_ident(path), ka, [bare.pid])
    assert said is not None and f"does not have {path} open" in said


def test_keepalived_stopped_forgets_the_problem_silently(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """With no keepalived there is nothing to write the FIFO: the problem is no longer shown,
    and one found again later, in the keepalived started next, is said again."""
    path = tmp_path / "ka.fifo"
    os.mkfifo(path, 0o600)
    bare, again = start_writer(None), start_writer(None)
    procs += [bare, again]
    clock = Clock()
    watch = writer.WriterWatch(clock)
    ka = ident(bare)
    assert watch.check(str(path), fifo_ident(path), ka, [bare.pid]) is None
    clock.now += writer.GRACE
    assert watch.check(str(path), fifo_ident(path), ka, [bare.pid]) is not None
    assert watch.check(str(path), fifo_ident(path), None, []) is None
    assert watch.problem is None
    assert watch.check(str(path), fifo_ident(path), ident(again), [again.pid]) is None  # waits
    clock.now += writer.GRACE
    assert watch.check(str(path), fifo_ident(path), ident(again), [again.pid]) is not None


def test_the_same_keepalived_is_not_said_again_after_a_scan_with_the_check_off(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A scan with the check off (keepalived.conf unreadable mid-edit: the hub passes no
    keepalived) hides the problem, which is shown again but not alerted again for the same
    keepalived; once it has written the FIFO, a new fault of it is said again."""
    path = tmp_path / "ka.fifo"
    os.mkfifo(path, 0o600)
    bare = start_writer(None)
    procs.append(bare)
    clock = Clock()
    watch = writer.WriterWatch(clock)
    ka = ident(bare)
    watch.check(str(path), fifo_ident(path), ka, [bare.pid])
    clock.now += writer.GRACE
    said = watch.check(str(path), fifo_ident(path), ka, [bare.pid])
    assert said is not None  # positive control: said the first time
    for _ in range(3):
        clock.now += 120.0  # past notify.dedupe_window
        assert watch.check(str(path), fifo_ident(path), None, []) is None
        watch.check(str(path), fifo_ident(path), ka, [bare.pid])
        clock.now += writer.GRACE
        assert watch.check(str(path), fifo_ident(path), ka, [bare.pid]) is None
        assert watch.problem == said

    holder = start_writer(path)  # the same keepalived's VRRP process opens the FIFO
    procs.append(holder)
    assert watch.check(str(path), fifo_ident(path), ka, [bare.pid, holder.pid]) is None
    assert watch.problem is None
    path.unlink()
    os.mkfifo(path, 0o600)
    watch.check(str(path), fifo_ident(path), ka, [bare.pid, holder.pid])
    clock.now += writer.GRACE
    assert watch.check(str(path), fifo_ident(path), ka, [bare.pid, holder.pid]) is not None


def test_nothing_is_read_while_all_is_well(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """keepalived's open files are read once per keepalived and FIFO while it writes the FIFO
    (the agent checks at each scan), and again as soon as either changes."""
    path = tmp_path / "ka.fifo"
    os.mkfifo(path, 0o600)
    proc = start_writer(path)
    procs.append(proc)
    reads: list[int] = []
    real = writer.held

    def counted(pids: list[int], p: str) -> list[writer.Ident]:
        reads.append(1)
        return real(pids, p)

    monkeypatch.setattr(writer, "held", counted)
    clock = Clock()
    watch = writer.WriterWatch(clock)
    ka = ident(proc)
    for _ in range(5):
        watch.check(str(path), fifo_ident(path), ka, [proc.pid])
    assert len(reads) == 1
    path.unlink()
    os.mkfifo(path, 0o600)
    watch.check(str(path), fifo_ident(path), ka, [proc.pid])
    clock.now += writer.GRACE
    assert watch.check(str(path), fifo_ident(path), ka, [proc.pid]) is not None
    assert len(reads) == 3  # read each time while it is bad


def test_a_fifo_opened_through_a_symlinked_directory_is_the_one_read(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """keepalived and lbwatch both naming the FIFO through a symlinked directory (Debian's
    /var/run -> /run), where /proc shows keepalived's open file by its resolved name: it writes
    the FIFO lbwatch reads, and nothing is said (positive control: the resolved name)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "var-run").symlink_to(tmp_path / "run")
    real, via = tmp_path / "run" / "ka.fifo", tmp_path / "var-run" / "ka.fifo"
    os.mkfifo(real, 0o600)
    proc = start_writer(via)
    procs.append(proc)
    assert writer.judge(fifo_ident(real), writer.held([proc.pid], str(real))) == "writes"
    clock = Clock()
    watch = writer.WriterWatch(clock)
    ka = ident(proc)
    assert watch.check(str(via), fifo_ident(via), ka, [proc.pid]) is None
    clock.now += writer.GRACE
    assert watch.check(str(via), fifo_ident(via), ka, [proc.pid]) is None
    assert watch.problem is None


def test_a_fifo_whose_own_name_ends_in_deleted_is_not_taken_for_a_removed_one(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """/proc marks a removed file by appending " (deleted)" to its name; a FIFO whose name
    already ends so, still there, is the one lbwatch reads (and once removed, it is "old")."""
    path = tmp_path / f"ka.fifo{writer.DELETED}"
    os.mkfifo(path, 0o600)
    proc = start_writer(path)
    procs.append(proc)
    assert writer.judge(fifo_ident(path), writer.held([proc.pid], str(path))) == "writes"
    path.unlink()
    os.mkfifo(path, 0o600)
    assert writer.judge(fifo_ident(path), writer.held([proc.pid], str(path))) == "old"


def test_a_fifo_name_is_the_same_however_it_is_spelt(tmp_path: Path) -> None:
    """keepalived.conf may name the FIFO through a symlinked directory (/var/run -> /run):
    the same FIFO; another file, or no name, is not."""
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to(tmp_path / "run")
    real = str(tmp_path / "run" / "ka.fifo")
    assert writer.names_fifo(real, real)
    assert writer.names_fifo(str(tmp_path / "var" / "run" / "ka.fifo"), real)
    assert writer.names_fifo(str(tmp_path / "run" / ".." / "run" / "ka.fifo"), real)
    assert not writer.names_fifo(str(tmp_path / "run" / "other.fifo"), real)
    assert not writer.names_fifo(None, real)


def test_no_access_to_keepalived_files_is_warned_once(
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without the right to read keepalived's open files nothing is judged, and the log says
    so once, not at every scan."""
    path = tmp_path / "ka.fifo"
    os.mkfifo(path, 0o600)
    proc = start_writer(None)
    procs.append(proc)

    def refused(pids: list[int], p: str) -> list[writer.Ident]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writer, "held", refused)
    clock = Clock()
    watch = writer.WriterWatch(clock)
    for _ in range(3):
        assert watch.check(str(path), fifo_ident(path), ident(proc), [proc.pid]) is None
        clock.now += writer.GRACE
    assert watch.problem is None
    said = [r for r in caplog.records if "cannot read keepalived's open files" in r.message]
    assert len(said) == 1
