"""Notifications end to end on one host: the agent process reading its FIFO, a real SMTP server
on loopback, outages, agent crashes and `lbwatch notify`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lbwatch.notify.fifo import write_line
from lbwatch.statusdoc import StatusDoc
from tests.conftest import SmtpSink, free_port, needs
from tests.test_agent import Rig
from tests.util import wait_for

pytestmark = [needs("haproxy", "start-stop-daemon"), pytest.mark.usefixtures("subreaper")]


NOTIFY_KEYS = """
retry_initial = 0.2
retry_max = 0.5
flap_window = 2.0
flap_max = 2
"""


def email_section(port: int) -> str:
    return f"""
[notify.email]
host = "127.0.0.1"
port = {port}
security = "plain"
sender = "lb@example.org"
to = ["ops@example.org"]
timeout = 2
"""


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink(free_port())  # not started: each test decides
    yield s
    s.stop()


@pytest.fixture
def rig(tmp_path: Path, sink: SmtpSink) -> Iterator[Rig]:
    r = Rig(tmp_path)
    r.write_config(notify=NOTIFY_KEYS, extra=email_section(sink.port))
    try:
        yield r
    finally:
        r.close()


def fifo(rig: Rig) -> Path:
    return rig.tmp / "run" / "keepalived.fifo"


def spooled(rig: Rig) -> list[Path]:
    return sorted((rig.tmp / "state" / "spool").glob("*.email.json"))


def emails_delivered(rig: Rig) -> int | None:
    """The email channel's delivered count as `lbwatch status --json` shows it (its "status"
    is the status document); None while it shows no such channel."""
    shown = json.loads(rig.cli("status", "--json").stdout)["status"]
    doc = StatusDoc.model_validate(shown) if shown is not None else None
    if doc is None or doc.notify is None or "email" not in doc.notify.channels:
        return None
    return doc.notify.channels["email"].delivered


def test_fifo_transition_becomes_an_email(rig: Rig, sink: SmtpSink) -> None:
    """keepalived's line on the FIFO -> a MASTER email naming the transition."""
    sink.start()
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    assert write_line(fifo(rig), 'INSTANCE "VI_1" BACKUP 97')
    assert write_line(fifo(rig), 'INSTANCE "VI_1" MASTER 97')
    wait_for(lambda: sink.messages, 10, what="the email")
    assert sink.subjects() == ["[lbwatch] t1: VI_1 BACKUP -> MASTER (priority 97)"]
    assert 'keepalived: INSTANCE "VI_1" MASTER 97' in rig.text()


def test_spooled_mail_survives_smtp_outage_and_kill_9(rig: Rig, sink: SmtpSink) -> None:
    """SMTP down: the message is spooled; the agent is killed -9; with SMTP back, the restarted
    agent delivers it."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    assert write_line(fifo(rig), 'INSTANCE "VI_1" MASTER 100')
    wait_for(lambda: len(spooled(rig)) == 1, 10, what="the message spooled")
    wait_for(lambda: "email delivery failed" in rig.text(), 10, what="a failed attempt")
    wait_for(lambda: "FAILING" in rig.cli("status").stdout, 5, what="failure in the status")
    status = rig.cli("status").stdout
    assert "    email     0 sent, 1 waiting; FAILING x" in status, status
    assert "SMTP 127.0.0.1" in status
    rig.stop_agent(signal.SIGKILL)
    assert len(spooled(rig)) == 1
    sink.start()
    rig.start()
    wait_for(lambda: sink.messages, 15, what="delivery after restart")
    assert sink.subjects() == ["[lbwatch] t1: VI_1 MASTER (priority 100)"]
    wait_for(lambda: not spooled(rig), 5, what="spool emptied")


def test_flood_of_transitions_becomes_one_digest(rig: Rig, sink: SmtpSink) -> None:
    """Twenty transitions in a burst: the first ones one by one, the rest as one digest."""
    sink.start()
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    for i in range(20):
        state = "MASTER" if i % 2 == 0 else "BACKUP"
        assert write_line(fifo(rig), f'INSTANCE "VI_1" {state} 100')
    wait_for(lambda: any("flapping" in s for s in sink.subjects()), 10, what="the digest")
    subjects = sink.subjects()
    assert subjects[0] == "[lbwatch] t1: VI_1 MASTER (priority 100)"
    assert subjects[1] == "[lbwatch] t1: VI_1 BACKUP -> MASTER (priority 100)"
    assert len(subjects) == 3  # flap_max is 2
    assert "flapping, 16 more transitions in 2 s, now BACKUP" in subjects[2]


def test_notify_verb_without_agent_spools_and_agent_delivers(rig: Rig, sink: SmtpSink) -> None:
    """`lbwatch notify` with no agent running spools the message; the agent sends it later."""
    out = rig.cli("notify", "INSTANCE", "VI_1", "MASTER", "100")
    assert out.returncode == 0, out.stderr
    assert len(spooled(rig)) == 1
    sink.start()
    rig.start()
    wait_for(lambda: sink.messages, 15, what="delivery by the agent")
    assert sink.subjects() == ["[lbwatch] t1: VI_1 MASTER (priority 100)"]


def test_notify_verb_with_agent_goes_through_the_fifo(rig: Rig, sink: SmtpSink) -> None:
    """With the agent running, `lbwatch notify` hands the event over the FIFO."""
    sink.start()
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    out = rig.cli("notify", "GROUP", "G1", "FAULT", "0")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: sink.messages, 10, what="the FAULT email")
    assert sink.subjects() == ["[lbwatch] t1: G1 FAULT (priority 0)"]
    assert 'keepalived: SCRIPT GROUP "G1" FAULT 0' in rig.text()  # the source shows
    bad = rig.cli("notify", "INSTANCE", 'VI"1', "MASTER")
    assert bad.returncode == 2 and "lbwatch notify:" in bad.stderr


def test_notify_test_reports_each_channel(rig: Rig, sink: SmtpSink) -> None:
    """`lbwatch notify --test` sends through every channel and says how each went: the
    reason it failed, or the server and the recipients that took it."""
    out = rig.cli("notify", "--test")
    assert out.returncode == 1
    assert out.stdout.startswith(f"email: FAILED: SMTP 127.0.0.1:{sink.port}: Connection refused")
    sink.start()
    out = rig.cli("notify", "--test")
    assert out.returncode == 0
    assert out.stdout.startswith(
        f"email: ok: 127.0.0.1:{sink.port} (plain) accepted it for ops@example.org ("
    )
    assert sink.subjects() == ["[lbwatch] t1: test message via email"]


def test_own_failures_are_mailed(rig: Rig, sink: SmtpSink) -> None:
    """haproxy dying (and keepalived being stopped for it) is an email too."""
    sink.start()
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    master = rig.pid("haproxy")
    assert master
    for p in [master, *(c.pid for c in psutil.Process(master).children())]:
        with contextlib.suppress(ProcessLookupError):  # a worker may go with its master
            os.kill(p, signal.SIGKILL)
    wait_for(lambda: sink.messages, 10, what="the alert")
    assert sink.subjects()[0] == (
        f"[lbwatch] t1: haproxy master {master} exited (pidfd); stopping keepalived so the "
        "VIP moves"
    )
    # The server answers 250 after keeping the message; the agent counts it when it reads that.
    wait_for(lambda: emails_delivered(rig) == 1, 10, what="counted")


def test_replaced_fifo_is_reopened(rig: Rig, sink: SmtpSink) -> None:
    """Someone removes and recreates the FIFO: the agent notices and reads the new one."""
    sink.start()
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    path = fifo(rig)
    path.unlink()
    os.mkfifo(path, 0o600)
    wait_for(
        lambda: "notify FIFO" in rig.text() and "reopened" in rig.text(), 10, what="the reopen"
    )
    assert write_line(path, 'INSTANCE "VI_9" MASTER 50')
    wait_for(lambda: sink.messages, 10, what="mail from the new FIFO")
    assert sink.subjects() == ["[lbwatch] t1: VI_9 MASTER (priority 50)"]


def test_unsafe_fifo_refused_but_supervision_goes_on(rig: Rig, sink: SmtpSink) -> None:
    """A regular file where the FIFO should be: a clear error, and the agent still supervises."""
    path = fifo(rig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a fifo")
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    assert (
        f"notify FIFO unusable, keepalived events are not read: {path} exists and is not a FIFO"
        in rig.text()
    )
    assert "FIFO UNUSABLE" in rig.cli("status").stdout


def test_message_spooled_by_notify_while_the_agent_runs_is_sent_at_once(
    rig: Rig, sink: SmtpSink
) -> None:
    """`lbwatch notify` spools the message itself when the FIFO write fails (here: a regular
    file stands where the FIFO was, which the agent cannot replace); the running agent, with
    nothing else happening, sends it within 1 s, woken by the spool, not by an unrelated
    event."""
    sink.start()
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    wait_for(lambda: not spooled(rig), 10, what="nothing queued")
    aside = fifo(rig).with_name("keepalived.fifo.aside")
    fifo(rig).rename(aside)
    fifo(rig).write_text("")
    try:
        out = rig.cli("notify", "INSTANCE", "VI_1", "FAULT", "0")
        assert out.returncode == 0, out.stderr
        spooled_at = time.monotonic()
        wait_for(lambda: sink.messages, 5, what="the FAULT email")
        took = time.monotonic() - spooled_at
    finally:
        aside.rename(fifo(rig))
    print(f"sent {took:.3f} s after `lbwatch notify` spooled it")
    assert sink.subjects() == ["[lbwatch] t1: VI_1 FAULT (priority 0)"]
    assert took < 1.0


@contextlib.contextmanager
def keepalived_fifo(rig: Rig) -> Iterator[int]:
    """The FIFO held open as keepalived holds its notify_fifo (O_RDWR): lines written while no
    agent runs wait in the pipe for it."""
    path = fifo(rig)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        yield fd
    finally:
        os.close(fd)


def test_a_transition_spooled_by_the_script_at_boot_is_mailed_once(
    rig: Rig, sink: SmtpSink
) -> None:
    """keepalived starts first: for MASTER, BACKUP, MASTER it writes the FIFO and runs
    `lbwatch notify`, which, with no agent, spools the two MASTERs. The agent starts and reads
    the same three lines: two MASTER mails, not four; a transition after start still goes out."""
    with keepalived_fifo(rig) as ka:
        for state in ("MASTER", "BACKUP", "MASTER"):
            os.write(ka, f'INSTANCE "VI_1" {state} 100\n'.encode())
            out = rig.cli("notify", "INSTANCE", "VI_1", state, "100")
            assert out.returncode == 0, out.stderr
        assert len(spooled(rig)) == 2  # positive control: the script did spool
        sink.start()
        rig.start()
        wait_for(rig.both_up, 10, what="both services up")
        wait_for(lambda: 'keepalived: INSTANCE "VI_1" MASTER 100' in rig.text(), 10)
        os.write(ka, b'INSTANCE "VI_1" FAULT 0\n')  # after start: sent, and sent last
        wait_for(lambda: any("FAULT" in s for s in sink.subjects()), 10, what="the FAULT")
    assert sink.subjects() == [
        "[lbwatch] t1: VI_1 MASTER (priority 100)",
        "[lbwatch] t1: VI_1 MASTER (priority 100)",
        "[lbwatch] t1: VI_1 MASTER -> FAULT (priority 0)",
    ]


def test_a_master_after_start_is_mailed_though_a_script_spooled_one_before(
    rig: Rig, sink: SmtpSink
) -> None:
    """keepalived restarted while no agent ran, so the FIFO lost its lines; the script's
    spooled MASTER is sent, and a new MASTER on the FIFO after start is a transition of its
    own, mailed too."""
    out = rig.cli("notify", "INSTANCE", "VI_1", "MASTER", "100")
    assert out.returncode == 0, out.stderr
    sink.start()
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    wait_for(lambda: len(sink.messages) == 1, 10, what="the spooled MASTER")
    assert write_line(fifo(rig), 'INSTANCE "VI_1" BACKUP 100')
    assert write_line(fifo(rig), 'INSTANCE "VI_1" MASTER 100')
    wait_for(lambda: len(sink.messages) == 2, 10, what="the new MASTER")
    assert sink.subjects()[1] == "[lbwatch] t1: VI_1 BACKUP -> MASTER (priority 100)"


def test_keepalived_writing_a_removed_fifo_is_alerted_once_and_shown(
    rig: Rig, sink: SmtpSink
) -> None:
    """A keepalived (here a stand-in holding the FIFO open as keepalived does) that still writes
    the FIFO after it was removed and lbwatch made a new one: one error in the log, one
    `agent:fifo_unread` mail with the fix, the status shows it; keepalived restarted on the new
    FIFO clears it. Positive control first: nothing is said while it writes the FIFO."""
    q = json.dumps
    textfile = rig.tmp / "lbwatch.prom"
    holder = f'exec 3<>"{fifo(rig)}"; exec {rig.fakeka} 1000'
    rig.write_config(
        notify=NOTIFY_KEYS,
        extra=email_section(sink.port)
        + f"\n[metrics]\ntextfile = {q(str(textfile))}\ntextfile_interval = 0.2\n",
        ka_start=(
            '["start-stop-daemon", "--start", "--quiet", "--background", "--make-pidfile", '
            f'"--pidfile", {q(str(rig.ka_pid))}, "--startas", "/bin/sh", "--", "-c", '
            f"{q(holder)}]"
        ),
        ka_extra=f"config = {q(str(rig.tmp / 'keepalived.conf'))}",
    )
    (rig.tmp / "keepalived.conf").write_text(f"global_defs {{\n  notify_fifo {fifo(rig)}\n}}\n")
    sink.start()
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    first = rig.pid("keepalived")
    assert first is not None
    wait_for(lambda: f"{fifo(rig)}" in os.readlink(f"/proc/{first}/fd/3"), 5, what="the holder")
    # A mark through the FIFO, mailed: keepalived's writes reach the agent, nothing said.
    assert write_line(fifo(rig), 'INSTANCE "VI_1" MASTER 100')
    wait_for(lambda: sink.messages, 10, what="the MASTER mail")
    assert rig.doc().notify is not None and rig.doc().notify.fifo_unread is None  # type: ignore[union-attr]

    fifo(rig).unlink()
    wait_for(lambda: "reopened" in rig.text(), 10, what="the agent's new FIFO")

    def unread() -> str | None:
        notify = rig.doc().notify
        return notify.fifo_unread if notify is not None else None

    wait_for(lambda: unread() is not None, 15, what="the status to say it (after GRACE)")
    assert f"keepalived (pid {first}) writes a FIFO at {fifo(rig)}" in str(unread())
    wait_for(lambda: any("removed or replaced" in s for s in sink.subjects()), 10, what="mail")
    status = rig.cli("status").stdout
    assert "NOT WRITTEN" in status and "reload keepalived" in status
    wait_for(lambda: "lbwatch_notify_fifo_unread 1.0" in textfile.read_text(), 10,
             what="the metric")  # fmt: skip

    os.kill(first, signal.SIGKILL)  # keepalived restarted: it opens the FIFO there now
    wait_for(lambda: rig.pid("keepalived") not in (None, first), 10, what="a new keepalived")
    wait_for(lambda: unread() is None, 10, what="the status to clear")
    wait_for(lambda: "lbwatch_notify_fifo_unread 0.0" in textfile.read_text(), 10,
             what="the metric back to 0")  # fmt: skip
    assert sum("removed or replaced" in s for s in sink.subjects()) == 1
    errors = [ln for ln in rig.text().splitlines() if ln.startswith("<3>")]
    assert sum("has been removed or replaced since it opened it" in ln for ln in errors) == 1
