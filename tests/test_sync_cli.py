"""`lbwatch sync --status` and the sync lines of `lbwatch status`, read from a status document
written as the agent writes it (this test process stands in for the agent)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from lbwatch import pstat
from lbwatch.cli import main
from lbwatch.status import write_status
from lbwatch.statusdoc import AgentInfo, PeerVerdictView, StatusDoc, SyncReport, SyncView
from lbwatch.sync.cli import sync_lines
from lbwatch.sync.verdict import NOT_CONFIGURED

DIGEST = "ab" * 32


def sync_doc(**peers: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "file": "/etc/haproxy/haproxy.cfg",
        "staging": "/var/lib/lbwatch/incoming",
        "current": {"origin": "lb1", "counter": 12, "edited": now, "digest": DIGEST},
        "local": {"result": "applied", "message": "new worker(s) 7", "at": now},
        "received": None,
        "peers": {
            name: {
                "state": "in-sync",
                "since": now - 90,
                "message": "",
                "target": {"origin": "lb1", "counter": 12, "edited": now, "digest": DIGEST},
                "peer_digest": DIGEST,
                "pushes": 1,
                **p,
            }
            for name, p in peers.items()
        },
    }


def test_lines_show_each_peer_and_shout_problems() -> None:
    """In-sync peers read plainly; an unreachable or refusing peer is in capitals, with since
    when and why."""
    doc = sync_doc(
        lb2={},
        lb3={"state": "unreachable", "message": "exit 255: connection refused"},
        lb4={"state": "rejected", "message": "exit 1: parsing [haproxy.cfg:3]"},
    )
    text = "\n".join(sync_lines(SyncView.model_validate(doc)))
    assert "/etc/haproxy/haproxy.cfg: abababababab (edit 12 made on lb1" in text
    assert "lb2" in text and "in-sync (1 push(es))" in text
    assert "UNREACHABLE since " in text and "connection refused" in text
    assert "REJECTED: exit 1: parsing [haproxy.cfg:3]" in text


def test_a_local_invalid_edit_is_shown() -> None:
    """An invalid local edit stays visible with the checker's message."""
    doc = sync_doc(lb2={})
    doc["local"] = {"result": "invalid", "message": "exit 1: unknown keyword", "at": 0}
    lines = sync_lines(SyncView.model_validate(doc))
    assert any("INVALID: exit 1: unknown keyword" in line for line in lines)


@pytest.fixture
def agent_status(tmp_path: Path):
    """Write a status document whose agent is this (running) process."""
    run_dir = tmp_path / "run"
    conf = tmp_path / "lbwatch.toml"
    conf.write_text(f'[agent]\nrun_dir = "{run_dir}"\nstate_dir = "{tmp_path / "state"}"\n')

    def write(sync: dict[str, Any] | None) -> Path:
        me = pstat.read_stat(os.getpid())
        assert me is not None
        agent = AgentInfo(
            pid=os.getpid(), start_ticks=me.start_ticks, create_time=0.0, node="lb1", version="t"
        )
        view = SyncView.model_validate(sync) if sync is not None else None
        write_status(run_dir, StatusDoc(agent=agent, summary="", sync=view))
        return conf

    return write


def test_sync_status_exit_codes(agent_status, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0 when every peer holds our version, 1 when one does not, 3 with no agent."""
    conf = agent_status(sync_doc(lb2={}))
    assert main(["--config", str(conf), "sync", "--status"]) == 0
    assert "in-sync" in capsys.readouterr().out
    conf = agent_status(sync_doc(lb2={"state": "pending", "message": "pushed"}))
    assert main(["--config", str(conf), "sync", "--status"]) == 1
    # in-sync, but about an older version of ours: not done yet.
    older = {"origin": "lb1", "counter": 11, "edited": 1.0, "digest": "cd" * 32}
    conf = agent_status(sync_doc(lb2={"target": older}))
    assert main(["--config", str(conf), "sync", "--status"]) == 1
    conf = agent_status(None)
    assert main(["--config", str(conf), "sync", "--status"]) == 1
    assert "not configured" in capsys.readouterr().out
    (conf.parent / "run" / "status.json").unlink()
    assert main(["--config", str(conf), "sync", "--status"]) == 3


OTHER = "cd" * 32


def _local(result: str, message: str, at: float = 100.0) -> dict[str, Any]:
    return {"local": {"result": result, "message": message, "at": at}}


def _received(at: float) -> dict[str, Any]:
    return {"received": {"result": "applied", "message": "installed", "from": "lb2", "at": at}}


def _from(origin: str) -> dict[str, Any]:
    return {"current": {"origin": origin, "edited": 1.0, "digest": DIGEST}}


IDLE = {"state": "idle", "target": None, "peer_digest": OTHER}

# (what differs from an all-in-sync document of lb1's own version, exit code, a problem)
VERDICTS = {
    "all in sync": ({}, {}, 0, None),
    "invalid local edit": (_local("invalid", "exit 1: unknown keyword"), {}, 1, "INVALID"),
    "reload refused": (_local("reload-failed", "reload failed"), {}, 1, "RELOAD-FAILED"),
    "deleted": (_local("deleted", "was deleted"), {}, 1, "DELETED: was deleted"),
    "missing": (_local("missing", "No such file"), {}, 1, "MISSING"),
    "invalid, then a peer's version installed over it": (
        {**_local("invalid", "x", at=100.0), **_received(200.0)},
        {},
        0,
        None,
    ),
    "a peer's version installed, then an invalid edit": (
        {**_local("invalid", "x", at=200.0), **_received(100.0)},
        {},
        1,
        "INVALID",
    ),
    "no current version yet": (
        {"current": None, **_local("starting", "")},
        {},
        1,
        "no current version yet",
    ),
    "ours, a peer not checked yet": ({}, {"lb2": IDLE}, 1, "lb2: idle"),
    "ours, a peer pending": ({}, {"lb2": {"state": "pending", "message": "pushed"}}, 1, "PENDING"),
    "ours, a peer kept its newer edit": ({}, {"lb2": {"state": "peer-newer"}}, 1, "PEER-NEWER"),
    "from lb2, lb2 and lb3 hold it": (_from("lb2"), {"lb3": {}}, 0, None),
    "from lb2, lb3 not checked yet": (_from("lb2"), {"lb3": IDLE}, 1, "lb3: idle"),
    "from lb3, lb2 still in-sync with our older version": (
        _from("lb3"),
        {"lb2": {"target": {"origin": "lb1", "edited": 1.0, "digest": OTHER}}},
        1,
        "lb2: in-sync with an earlier version",
    ),
}


@pytest.mark.parametrize(("sync", "peers", "code", "problem"), VERDICTS.values(), ids=VERDICTS)
def test_sync_status_verdict(
    agent_status,
    capsys: pytest.CaptureFixture[str],
    sync: dict[str, Any],
    peers: dict[str, dict[str, Any]],
    code: int,
    problem: str | None,
) -> None:
    """Exit 0 only when the live file is fine and every peer holds the current version as far
    as this node knows; --json says the same with the reasons, and the same exit code."""
    doc = {**sync_doc(lb2={}), **sync}
    doc["peers"].update(sync_doc(**peers)["peers"])
    conf = agent_status(doc)
    assert main(["--config", str(conf), "sync", "--status"]) == code
    capsys.readouterr()
    assert main(["--config", str(conf), "sync", "--status", "--json"]) == code
    out = SyncReport.model_validate_json(capsys.readouterr().out)
    assert out.ok is (code == 0) and out.exit == code
    assert out.node == "lb1" and out.sync == SyncView.model_validate(doc)
    if problem is None:
        assert out.problems == []
    else:
        assert any(problem in p for p in out.problems), out.problems


def test_peer_verdicts_name_each_peer(agent_status, capsys: pytest.CaptureFixture[str]) -> None:
    """--json gives each peer's verdict with its reason: a received version is delivered by
    every node that holds it, so a peer that does not hold it is not in sync, whoever made it."""
    doc = {**sync_doc(lb2={}, lb3={"state": "pending", "message": "pushed"}), **_from("lb2")}
    conf = agent_status(doc)
    assert main(["--config", str(conf), "sync", "--status", "--json"]) == 1
    peers = SyncReport.model_validate_json(capsys.readouterr().out).peers
    assert peers["lb2"] == PeerVerdictView(sync="in-sync", why="holds the current version")
    assert peers["lb3"] == PeerVerdictView(sync="not-in-sync", why="PENDING: pushed")


def test_sync_status_json_without_agent_or_sync(
    agent_status, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json is one document also when sync is off (exit 1) or no agent runs (exit 3)."""
    conf = agent_status(None)
    assert main(["--config", str(conf), "sync", "--status", "--json"]) == 1
    out = SyncReport.model_validate_json(capsys.readouterr().out)
    assert out.ok is False and out.problems == [NOT_CONFIGURED]
    (conf.parent / "run" / "status.json").unlink()
    assert main(["--config", str(conf), "sync", "--status", "--json"]) == 3
    out = SyncReport.model_validate_json(capsys.readouterr().out)
    assert out.ok is False and out.exit == 3 and out.sync is None
    assert "not running" in out.problems[0]
