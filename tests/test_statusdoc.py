"""The status document's model: what the agent writes reads back the same, a document from a
newer or older agent still reads, and one that is not a status document is a one-line problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lbwatch import pstat
from lbwatch.status import is_paused, pause_info, read_status, set_paused, write_status
from lbwatch.statusdoc import (
    AgentInfo,
    JobView,
    PauseInfo,
    PeerDoc,
    ReceivedView,
    StatusDoc,
    SyncView,
    VersionView,
)


def me() -> AgentInfo:
    st = pstat.read_stat(os.getpid())
    assert st is not None
    return AgentInfo(
        pid=os.getpid(), start_ticks=st.start_ticks, create_time=1.0, node="lb1", version="t"
    )


V = VersionView(origin="lb2", counter=3, edited=2.5, digest="ab" * 32)


def test_what_is_written_reads_back_the_same(tmp_path: Path) -> None:
    """A document with a sync part (a received version, a peer) is read back equal, from this
    running process, and its received version's origin is written as "from"."""
    sync = SyncView(
        file="/etc/haproxy/haproxy.cfg",
        current=V,
        local=JobView(result="applied", message="ok", at=5.0),
        received=ReceivedView(result="applied", origin="lb2", version=V, at=6.0),
        peers={"lb2": PeerDoc(state="in-sync", since=7.0, target=V, pushes=2)},
    )
    doc = StatusDoc(agent=me(), summary="all fine", sync=sync, updated=8.0)
    write_status(tmp_path, doc)
    raw = json.loads((tmp_path / "status.json").read_text())
    assert raw["sync"]["received"]["from"] == "lb2"
    read = read_status(tmp_path)
    assert read.agent_running and read.problem == ""
    assert read.data == doc


def test_a_newer_or_older_agents_document_still_reads(tmp_path: Path) -> None:
    """Fields this version does not know are ignored; parts an older agent did not write take
    their defaults."""
    raw = {
        "agent": {**me().model_dump(), "state_dir": None, "later": 1},
        "summary": "s",
        "a_later_section": {"x": 1},
    }
    raw["agent"].pop("state_dir")
    (tmp_path / "status.json").write_text(json.dumps(raw))
    read = read_status(tmp_path)
    assert read.data is not None and read.agent_running
    assert read.data.agent.state_dir == "" and read.data.sync is None
    assert read.data.services == {} and read.data.recent_actions == []


def test_a_file_that_is_no_status_document_is_one_line(tmp_path: Path) -> None:
    """A document without its agent part (or not JSON) is no status: the problem names the
    file in one line, and no agent counts as running."""
    for content in ('{"summary": "no agent part"}', "not json"):
        (tmp_path / "status.json").write_text(content)
        read = read_status(tmp_path)
        assert read.data is None and not read.agent_running
        assert read.problem.startswith(f"cannot read {tmp_path / 'status.json'}: ")
        assert "\n" not in read.problem


def test_a_pause_flag_edited_by_hand_still_reads(tmp_path: Path) -> None:
    """The flag as `lbwatch pause` writes it reads back with its reason; one with the wrong
    types, or not JSON, reads as a pause with nothing more said (it must not break the agent's
    status, which reads it every scan)."""
    set_paused(tmp_path, True, "kernel update")
    info = pause_info(tmp_path)
    assert info.reason == "kernel update" and info.since > 0
    for content in ('{"since": "yesterday", "reason": 7}', "garbage", "[]"):
        (tmp_path / "paused").write_text(content)
        assert is_paused(tmp_path) and pause_info(tmp_path) == PauseInfo()
