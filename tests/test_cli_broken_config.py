"""status, pause and resume while the config file on disk is broken: the running agent keeps its
last good config, so these verbs use its run directory and the state directory it publishes;
check-config and the other verbs stay strict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lbwatch import pstat
from lbwatch.cli import main
from lbwatch.status import write_status
from lbwatch.statusdoc import AgentInfo, StatusDoc, StatusReport
from tests.conftest import needs
from tests.test_agent import Rig
from tests.util import wait_for

BROKEN_SCAN = 'scan_interval = "x"'


def break_config(rig: Rig) -> Path:
    """Make the file invalid and point its state_dir elsewhere, so only the agent's published
    state_dir can lead `pause` to the flag the agent watches. Returns that other directory."""
    text = rig.config.read_text()
    elsewhere = rig.tmp / "elsewhere"
    good_state = f"state_dir = {json.dumps(str(rig.tmp / 'state'))}"
    assert "scan_interval = 0.5" in text and good_state in text
    text = text.replace("scan_interval = 0.5", BROKEN_SCAN)
    rig.config.write_text(text.replace(good_state, f"state_dir = {json.dumps(str(elsewhere))}"))
    return elsewhere


@needs("haproxy", "start-stop-daemon")
@pytest.mark.usefixtures("subreaper")
def test_status_pause_resume_use_the_running_agent_when_the_file_is_broken(rig: Rig) -> None:
    """With a valid file status is silent on stderr; with a broken one status, pause and resume
    still work through the running agent (one warning line), check-config and sync stay strict,
    and once the agent is gone status exits 2 with the config problem."""
    rig.start()
    wait_for(rig.both_up, 10, what="both services up")
    good = rig.cli("status")
    assert good.returncode == 0 and good.stderr == "", good.stderr
    assert good.stdout.startswith("lbwatch ") and " on t1 " in good.stdout

    elsewhere = break_config(rig)
    problem = f"{rig.config}: agent.scan_interval: Input should be a valid number"
    strict = rig.cli("check-config")
    assert strict.returncode == 2 and strict.stderr.startswith(problem), strict.stderr
    assert rig.cli("sync", "--status").returncode == 2

    out = rig.cli("status")
    assert out.returncode == 0, out.stderr
    warning = out.stderr.splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: {problem}"), warning
    assert "using the running agent's own settings" in warning[0]
    assert out.stdout.startswith("lbwatch ") and "paused      no" in out.stdout
    as_json = rig.cli("status", "--json")
    assert (
        as_json.returncode == 0
        and StatusReport.model_validate_json(as_json.stdout).agent_running is True
    )

    out = rig.cli("pause", "--reason", "config being edited")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("paused: lbwatch on t1 observes only")
    assert len(out.stderr.splitlines()) == 1
    wait_for(lambda: "maintenance pause on" in rig.text(), 10, what="pause logged")
    assert rig.doc().paused is True
    assert (rig.tmp / "state" / "paused").exists() and not (elsewhere / "paused").exists()
    status = rig.cli("status").stdout
    assert "paused      YES since" in status and "config being edited" in status

    out = rig.cli("resume")
    assert out.returncode == 0 and "acts again" in out.stdout, out.stderr
    wait_for(lambda: "maintenance pause off" in rig.text(), 10, what="resume logged")
    assert rig.doc().paused is False
    assert not (rig.tmp / "state" / "paused").exists()

    assert rig.stop_agent() == 0
    gone = rig.cli("status")
    assert gone.returncode == 2 and gone.stderr.startswith(problem), gone.stderr
    assert rig.cli("pause").returncode == 2
    assert not (rig.tmp / "state" / "paused").exists()


def test_no_agent_and_broken_config_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No agent has ever run: status, pause and resume exit 2 with the config line, as before,
    and pause writes no flag; with a valid file status says the agent is not running (exit 3)."""
    run, state = json.dumps(str(tmp_path / "run")), json.dumps(str(tmp_path / "state"))
    path = tmp_path / "lbwatch.toml"
    path.write_text(f"[agent]\nrun_dir = {run}\nstate_dir = {state}\nscan_interval = 0.5\n")
    assert main(["--config", str(path), "status"]) == 3
    assert "lbwatch is not running" in capsys.readouterr().err
    path.write_text(f"[agent]\nrun_dir = {run}\nstate_dir = {state}\n{BROKEN_SCAN}\n")
    line = f"{path}: agent.scan_interval: Input should be a valid number"
    for verb in ("status", "pause", "resume"):
        assert main(["--config", str(path), verb]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(line), err
    assert not (tmp_path / "state").exists()


def test_pause_needs_the_published_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running agent that does not publish its state_dir (one started before it did): status
    works on a broken file, pause refuses with the config line and writes no flag anywhere."""
    me = pstat.read_stat(os.getpid())
    assert me is not None
    run = tmp_path / "run"
    run.mkdir()
    # A status naming this live test process, without the state_dir an older agent did not
    # publish.
    agent = AgentInfo(
        pid=me.pid, start_ticks=me.start_ticks, create_time=0.0, node="t1", version="0.0.9"
    )
    write_status(run, StatusDoc(agent=agent, summary=""))
    path = tmp_path / "lbwatch.toml"
    path.write_text(f"[agent]\nrun_dir = {json.dumps(str(run))}\n{BROKEN_SCAN}\n")
    assert main(["--config", str(path), "status", "--json"]) == 0
    out = capsys.readouterr()
    assert StatusReport.model_validate_json(out.out).agent_running is True
    assert out.err.startswith(f"warning: {path}: agent.scan_interval: ")
    assert main(["--config", str(path), "pause"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{path}: agent.scan_interval: "), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["lbwatch.toml", "run", "status.json"]
