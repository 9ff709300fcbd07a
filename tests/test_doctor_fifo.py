"""doctor's look at keepalived's open files: the FIFO at lbwatch's path must be the very file
keepalived holds open. The writer here is a stand-in that opens the FIFO as keepalived does (read
and write) and stays; the lab's e2e test does the same with the real keepalived."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lbwatch.config import Config, load
from lbwatch.doctor import checks, fifo
from lbwatch.doctor.checks import Finding, Where
from lbwatch.status import write_status
from lbwatch.statusdoc import AgentInfo, NotifyView, StatusDoc
from tests.test_cluster_sink import ticks_of
from tests.util import wait_for


def config(tmp: Path, holder_pid: int | None, fifo_path: Path) -> Config:
    pidfile = tmp / "keepalived.pid"
    if holder_pid is not None:
        pidfile.write_text(f"{holder_pid}\n")
    toml = tmp / "lbwatch.toml"
    toml.write_text(f"""
[agent]
node_name = "lb1"
run_dir = "{tmp / "run"}"
state_dir = "{tmp / "state"}"

[keepalived]
config = "{tmp / "keepalived.conf"}"
pidfile = "{pidfile}"
process_name = "sleep"  # the stand-in
find_without_pidfile = false

[notify]
fifo = "{fifo_path}"
""")
    return load(toml)


def where(tmp: Path, fifo_path: Path) -> Where:
    ka = tmp / "keepalived.conf"
    ka.write_text(f"global_defs {{\n    notify_fifo {fifo_path}\n}}\n")
    return Where(keepalived_conf=ka, config_id="lb1")


def start_writer(path: Path | None) -> subprocess.Popen[bytes]:
    """A process named "sleep" that holds ``path`` open read-write (as keepalived holds its
    notify_fifo), or nothing when ``path`` is None."""
    opened = f'exec 3<>"{path}"; ' if path is not None else ""
    proc = subprocess.Popen(["sh", "-c", f"{opened}exec sleep 120"])
    wait_for(
        lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep",
        10,
        what="the stand-in to be sleep",
    )
    return proc


def findings(tmp: Path, pid: int | None, path: Path) -> list[Finding]:
    return list(fifo.check(config(tmp, pid, path), where(tmp, path)))


def test_the_fifo_keepalived_holds_is_ok_and_a_replaced_one_an_error(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Positive control first: the writer holds the FIFO there now (ok); the same writer after
    the FIFO was replaced, then after it was removed, writes to nobody (error, with the fix)."""
    path = tmp_path / "ka.fifo"
    os.mkfifo(path, 0o600)
    writer = start_writer(path)
    procs.append(writer)
    found = findings(tmp_path, writer.pid, path)
    assert [(f.level, f.what) for f in found] == [
        ("ok", f"keepalived (pid {writer.pid}) writes the FIFO lbwatch reads")
    ]

    path.unlink()
    os.mkfifo(path, 0o600)  # as lbwatch does when its FIFO went missing
    found = findings(tmp_path, writer.pid, path)
    assert [f.level for f in found] == ["error"], found
    assert "has been removed or replaced since it opened it" in found[0].what
    assert found[0].fix is not None and "reload keepalived" in found[0].fix

    path.unlink()
    found = findings(tmp_path, writer.pid, path)
    assert [f.level for f in found] == ["error"], found
    assert "has been removed or replaced" in found[0].what


def test_keepalived_without_the_fifo_open_is_an_error(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A keepalived that never opened the FIFO (started before notify_fifo was set) is found,
    while another process holding it is no excuse."""
    path = tmp_path / "ka.fifo"
    os.mkfifo(path, 0o600)
    procs.append(start_writer(path))  # not the one the pidfile names
    writer = start_writer(None)
    procs.append(writer)
    found = findings(tmp_path, writer.pid, path)
    assert [f.level for f in found] == ["error"], found
    assert f"keepalived (pid {writer.pid}) does not have {path} open" in found[0].what


def test_keepalived_not_running_is_ok_and_a_path_not_a_fifo_an_error(tmp_path: Path) -> None:
    """Nothing to look at without keepalived; a regular file where the FIFO should be is an
    error whether keepalived runs or not."""
    path = tmp_path / "ka.fifo"
    found = findings(tmp_path, None, path)
    assert [(f.level, f.what) for f in found] == [
        ("ok", "keepalived is not running: it opens the FIFO when it starts")
    ]
    path.write_text("")
    found = findings(tmp_path, None, path)
    assert [f.level for f in found] == ["error"], found
    assert found[0].what == f"{path} is not a FIFO: neither keepalived nor lbwatch can use it"


def test_the_agents_own_fifo_error_is_said(tmp_path: Path) -> None:
    """A running agent that cannot read its FIFO (its status says why) is an error."""
    path = tmp_path / "ka.fifo"
    cfg = config(tmp_path, None, path)
    me = os.getpid()
    doc = StatusDoc(
        agent=AgentInfo(node="lb1", pid=me, start_ticks=ticks_of(me), create_time=0, version="t"),
        summary="running",
        notify=NotifyView(fifo=str(path), fifo_error=f"{path} is owned by uid 7"),
    )
    write_status(cfg.agent.run_dir, doc)
    found = list(fifo.check(cfg, where(tmp_path, path)))
    assert (found[0].level, found[0].what) == (
        "error",
        f"lbwatch cannot read its FIFO: {path} is owned by uid 7",
    )


def test_nothing_is_said_when_keepalived_uses_another_fifo(tmp_path: Path) -> None:
    """keepalived's config naming another FIFO (or none) is the keepalived check's finding,
    not said twice here."""
    path = tmp_path / "ka.fifo"
    cfg = config(tmp_path, None, path)
    assert list(fifo.check(cfg, where(tmp_path, tmp_path / "other.fifo"))) == []


def test_a_fifo_named_through_a_symlinked_directory_is_the_same(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """keepalived.conf naming the FIFO through /var/run (a symlink to /run on Debian) while
    lbwatch's config names it under /run: the same FIFO, ok in both checks."""
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to(tmp_path / "run")
    path = tmp_path / "run" / "ka.fifo"
    os.mkfifo(path, 0o600)
    writer = start_writer(tmp_path / "var" / "run" / "ka.fifo")  # opened as keepalived names it
    procs.append(writer)
    cfg = config(tmp_path, writer.pid, path)
    w = where(tmp_path, tmp_path / "var" / "run" / "ka.fifo")
    found = list(fifo.check(cfg, w))
    assert [(f.level, f.what) for f in found] == [
        ("ok", f"keepalived (pid {writer.pid}) writes the FIFO lbwatch reads")
    ]
    said = [f for f in checks.keepalived(cfg, w) if "FIFO" in f.what]
    assert [f.level for f in said] == ["ok"], said
