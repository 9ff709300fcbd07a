"""Adversarial tests of the running agent (tests/test_agent.py's Rig: a real agent process,
real haproxy, a stand-in keepalived): a daemon's launcher seen during a start, READY=1 while
config sync works, and a SIGHUP that changes how haproxy is reloaded.

A test here that fails shows a bug in lbwatch (see the report on branch ``adv``); it is not
marked xfail on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from lbwatch.procs import read_pidfile
from tests.test_adversarial_sync import STEP, _seed
from tests.test_agent import Rig
from tests.util import wait_for

pytestmark = [pytest.mark.usefixtures("subreaper")]
q = json.dumps


def _step_script(tmp: Path) -> tuple[Path, Path]:
    script, log = tmp / "step.sh", tmp / "steps.log"
    script.write_text(STEP)
    script.chmod(0o755)
    return script, log


def _set_haproxy_reload(rig: Rig, argv: list[str]) -> None:
    """Give [haproxy] a reload command in the Rig's config file."""
    text = rig.config.read_text()
    marker = "command_timeout = 5\n\n[haproxy.health]"
    assert marker in text
    line = "reload = [" + ", ".join(q(a) for a in argv) + "]"
    rig.config.write_text(
        text.replace(marker, f"command_timeout = 5\n{line}\n\n[haproxy.health]", 1)
    )


def _kinds(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("begin ")]


# ---------------------------------------------------------------------------------------------
# A launcher is not haproxy


@pytest.fixture(scope="module")
def big_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A map file large enough that haproxy spends a second or two loading it (3 million
    entries, 40 MB), as a config with many maps or certificates does on a real node."""
    path = tmp_path_factory.mktemp("map") / "big.map"
    with path.open("w") as f:
        for i in range(3_000_000):
            f.write(f"/p/{i} b{i % 7}\n")
    return path


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy")
def test_haproxys_launcher_is_not_taken_for_haproxy(
    rig: Rig, tmp_path: Path, big_map: Path
) -> None:
    """haproxy -W -D parses its configuration and binds in the process that was started (the
    launcher), then forks the master, which detaches, writes the pidfile and forks the workers;
    the launcher exits. Started through a wrapper (an init script, `sh -c`, a Type=forking unit),
    the launcher is not lbwatch's child, and with find_without_pidfile (the default) a rescan
    finds it: a process of the right name whose parent is not of that name. It must not count
    as haproxy's master: keepalived may only be started once haproxy really runs (README: "up
    for keepalived_start_delay seconds"), and the launcher's exit is no haproxy failure."""
    binary = tmp_path / "lbwadvha"  # its own name: other haproxy on this host are not ours
    shutil.copy(shutil.which("haproxy") or "/usr/sbin/haproxy", binary)
    cfg_file = tmp_path / "big.cfg"
    cfg_file.write_text(
        rig.cfg_file.read_text().replace(
            "    http-request return status 200",
            f"    http-request set-var(txn.b) path,map({big_map})\n"
            "    http-request return status 200",
        )
    )
    launcher_pid = tmp_path / "launcher.pid"
    start = f"{binary} -W -D -f {cfg_file} -p {rig.ha_pid} & echo $! > {launcher_pid}; wait $!"
    rig.config.write_text(
        f"""
[agent]
node_name = "t1"
run_dir = {q(str(tmp_path / "run"))}
state_dir = {q(str(tmp_path / "state"))}
scan_interval = 0.1
log_level = "debug"

[haproxy]
pidfile = {q(str(rig.ha_pid))}
process_name = "lbwadvha"
find_without_pidfile = true
start = ["sh", "-c", {q(start)}]
stop = ["start-stop-daemon", "--stop", "--quiet", "--oknodo", "--pidfile",
        {q(str(rig.ha_pid))}, "--retry", "TERM/5/KILL/2"]
command_timeout = 20

[keepalived]
pidfile = {q(str(rig.ka_pid))}
process_name = "fakeka"
find_without_pidfile = false
start = ["start-stop-daemon", "--start", "--quiet", "--background", "--make-pidfile",
         "--pidfile", {q(str(rig.ka_pid))}, "--exec", {q(str(rig.fakeka))}, "--", "1000"]
stop = ["start-stop-daemon", "--stop", "--quiet", "--oknodo", "--pidfile",
        {q(str(rig.ka_pid))}, "--retry", "TERM/5/KILL/2"]
command_timeout = 5

[policy]
keepalived_start_delay = 0.3

[notify]
fifo = {q(str(tmp_path / "run" / "keepalived.fifo"))}
"""
    )
    rig.start()
    wait_for(
        lambda: (
            rig.both_up()
            and rig.doc().services["haproxy"].pid == read_pidfile(rig.ha_pid)
            and "start keepalived done" in rig.text()
        ),
        30,
        what="haproxy's master and keepalived up",
    )
    launcher = read_pidfile(launcher_pid)
    master = read_pidfile(rig.ha_pid)
    assert launcher is not None and master is not None and launcher != master
    text = rig.text()
    started = [ln for ln in text.splitlines() if "starting keepalived" in ln]
    assert started, text
    # keepalived was started for the master, never for the launcher ...
    assert f"haproxy is running: lbwadvha {launcher}" not in text, started
    assert all(f"haproxy master {launcher} " not in ln for ln in started), started
    # ... and the launcher's exit was no failure of haproxy.
    assert f"haproxy master {launcher} exited" not in text
    assert "stopping keepalived" not in text


# ---------------------------------------------------------------------------------------------
# READY=1 and config sync


def test_ready_is_not_held_back_by_a_config_sync_job(rig: Rig, tmp_path: Path) -> None:
    """READY=1 says the first reconcile of the services has played out (the unit's
    TimeoutStartSec=120s is sized for a start of haproxy and one of keepalived). Config sync's
    start-up job is now an action on haproxy's slot; a slow one (a checker that takes its
    time, an unconfirmed reload and its roll-back, a staged version after it, up to 6 *
    sync.timeout + 4 * reload_confirm) must not hold READY=1 back, or systemd kills the agent
    at start-up and Restart=always starts it, and the job, again."""
    script, log = _step_script(tmp_path)
    rig.write_config(
        extra=f"""
[sync]
enabled = true
config = {q(str(rig.cfg_file))}
check = [{q(str(script))}, {q(str(log))}, "check", "4", "{{file}}"]
timeout = 10
reload_confirm = 1
"""
    )
    _set_haproxy_reload(rig, [str(script), str(log), "reload", "0"])
    state_dir = tmp_path / "state"
    _seed(state_dir, tmp_path / "no-staging", rig.cfg_file, "t1")
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    wait_for(lambda: "sync haproxy done in" in rig.text(), 30, what="the start-up sync job's end")
    wait_for(lambda: "<6>ready: " in rig.text(), 15, what="READY=1")
    lines = rig.text().splitlines()
    ready = next(i for i, ln in enumerate(lines) if "<6>ready: " in ln)
    synced = next(i for i, ln in enumerate(lines) if "sync haproxy done in" in ln)
    assert ready < synced, lines[min(ready, synced) : max(ready, synced) + 1]


# ---------------------------------------------------------------------------------------------
# SIGHUP and config sync


def test_a_sighup_that_changes_haproxys_reload_command_reaches_config_sync(
    rig: Rig, tmp_path: Path
) -> None:
    """A SIGHUP applies the whole new configuration ("configuration reloaded"): when it changes
    [haproxy] reload (or its pidfile), config sync's next reload uses the new command. The
    control: before the SIGHUP an edit is reloaded with the old command."""
    script, log = _step_script(tmp_path)
    rig.write_config(
        extra=f"""
[sync]
enabled = true
config = {q(str(rig.cfg_file))}
check = [{q(str(script))}, {q(str(log))}, "check", "0", "{{file}}"]
debounce = 0
reload_confirm = 0.5
"""
    )
    _set_haproxy_reload(rig, [str(script), str(log), "reload-old", "0"])
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    wait_for(lambda: "sync haproxy done in" in rig.text(), 15, what="the start-up sync job")

    def edit_and_wait(n: int) -> None:
        done = rig.text().count("sync haproxy done in")
        rig.cfg_file.write_text(rig.cfg_file.read_text() + f"\n# edit {n}\n")
        wait_for(
            lambda: rig.text().count("sync haproxy done in") >= done + 1,
            20,
            what=f"sync job of edit {n}",
        )

    edit_and_wait(1)
    assert "reload-old" in _kinds(log)  # the control
    before = len(_kinds(log))
    text = rig.config.read_text().replace('"reload-old"', '"reload-new"')
    assert '"reload-new"' in text
    rig.config.write_text(text)
    assert rig.agent is not None
    rig.agent.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in rig.text(), 10, what="the SIGHUP applied")
    # The sync service is rebuilt with the new settings and reconciles first.
    wait_for(
        lambda: rig.text().count("sync haproxy done in") >= 3, 20, what="the rebuilt sync's start"
    )
    edit_and_wait(2)
    after = [k for k in _kinds(log)[before:] if k.startswith("reload")]
    assert after and set(after) == {"reload-new"}, after


def _keepalived_restart_logged(rig: Rig) -> str:
    """Kill the stand-in keepalived and wait for the agent to have a new one up: what the agent
    logged meanwhile."""
    mark, old = len(rig.text()), rig.pid("keepalived")
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: rig.pid("keepalived") not in (None, old), 15, what="a new keepalived")
    wait_for(rig.both_up, 15, what="both services up again")
    return rig.text()[mark:]


def test_a_sighup_applies_a_new_log_level(rig: Rig) -> None:
    """`systemctl reload lbwatch` with a new [agent] log_level takes it: at "info", keepalived's
    restart is logged at info (the control); after a reload to "warning", the same restart
    logs nothing under warning."""
    level = 'log_level = "{}"'.format
    rig.config.write_text(rig.config.read_text().replace(level("debug"), level("info")))
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    # The agent's lines carry journald's priority prefix: <6> info, <7> debug.
    assert "<6>" in _keepalived_restart_logged(rig)
    rig.config.write_text(rig.config.read_text().replace(level("info"), level("warning")))
    assert rig.agent is not None
    before = len(rig.received())
    rig.agent.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (
            any("READY=1" in n for n in rig.received()[before:] if "RELOADING" not in n)
            and any("RELOADING=1" in n for n in rig.received()[before:])
        ),
        10,
        what="the reload done (RELOADING=1, then READY=1)",
    )
    said = _keepalived_restart_logged(rig)
    assert "<4>" in said and "<6>" not in said and "<7>" not in said, said


def test_a_sighup_that_switches_sync_off_with_a_job_in_flight_and_one_queued(
    rig: Rig, tmp_path: Path
) -> None:
    """Config sync is switched off by a SIGHUP while its start-up job runs and a local edit's
    job waits: the running job finishes and its result frees haproxy's slot, the waiting job
    is dropped with the sync service that queued it, no handler or job fails, and the agent
    keeps supervising."""
    script, log = _step_script(tmp_path)
    sync = f"""
[sync]
enabled = true
config = {q(str(rig.cfg_file))}
check = [{q(str(script))}, {q(str(log))}, "check", "3", "{{file}}"]
debounce = 0
reload_confirm = 0.5
"""
    rig.write_config(extra=sync)
    _set_haproxy_reload(rig, [str(script), str(log), "reload", "0"])
    _seed(tmp_path / "state", tmp_path / "no-staging", rig.cfg_file, "t1")
    rig.start()
    wait_for(lambda: "begin check" in (log.read_text() if log.exists() else ""), 15, what="job")
    rig.cfg_file.write_text(rig.cfg_file.read_text() + "\n# edited while the job runs\n")
    wait_for(lambda: "is running: fakeka" in rig.text(), 15, what="keepalived up")
    rig.config.write_text(rig.config.read_text().replace("enabled = true", "enabled = false"))
    assert rig.agent is not None
    rig.agent.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in rig.text(), 10, what="the SIGHUP applied")
    wait_for(lambda: "sync haproxy done in" in rig.text(), 20, what="the running job's end")
    wait_for(
        lambda: (doc := rig.status()) is not None and doc.services["haproxy"].in_progress is None,
        10,
        what="haproxy's slot free",
    )
    text = rig.text()
    # The SIGHUP came while the job ran; the queued job was dropped, never run.
    assert text.index("configuration reloaded") < text.index("sync haproxy done in")
    assert text.count("sync haproxy done in") == 1, text
    assert "config sync is off; nothing done" not in text
    assert "internal error" not in text and "Traceback" not in text, text
    assert rig.agent.poll() is None
    # Still supervising: keepalived killed is started again.
    ka = rig.pid("fakeka")
    assert ka is not None
    os.kill(ka, signal.SIGKILL)
    wait_for(lambda: rig.pid("fakeka") not in (None, ka), 10, what="keepalived restarted")
