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
from lbwatch.sync.cli import sync_lines

DIGEST = "ab" * 32


def sync_doc(**peers: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "file": "/etc/haproxy/haproxy.cfg",
        "staging": "/var/lib/lbwatch/incoming",
        "current": {"origin": "lb1", "edited": now, "digest": DIGEST},
        "local": {"result": "applied", "message": "new worker(s) 7", "at": now},
        "received": None,
        "peers": {
            name: {
                "state": "in-sync",
                "since": now - 90,
                "message": "",
                "target": {"origin": "lb1", "edited": now, "digest": DIGEST},
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
    text = "\n".join(sync_lines(doc))
    assert "/etc/haproxy/haproxy.cfg: abababababab (edited on lb1" in text
    assert "lb2" in text and "in-sync (1 push(es))" in text
    assert "UNREACHABLE since " in text and "connection refused" in text
    assert "REJECTED: exit 1: parsing [haproxy.cfg:3]" in text


def test_a_local_invalid_edit_is_shown() -> None:
    """An invalid local edit stays visible with the checker's message."""
    doc = sync_doc(lb2={})
    doc["local"] = {"result": "invalid", "message": "exit 1: unknown keyword", "at": 0}
    assert any("INVALID: exit 1: unknown keyword" in line for line in sync_lines(doc))


@pytest.fixture
def agent_status(tmp_path: Path):
    """Write a status document whose agent is this (running) process."""
    run_dir = tmp_path / "run"
    conf = tmp_path / "lbwatch.toml"
    conf.write_text(f'[agent]\nrun_dir = "{run_dir}"\nstate_dir = "{tmp_path / "state"}"\n')

    def write(sync: dict[str, Any] | None) -> Path:
        me = pstat.read_stat(os.getpid())
        assert me is not None
        write_status(
            run_dir,
            {
                "agent": {"pid": os.getpid(), "start_ticks": me.start_ticks, "node": "lb1"},
                "sync": sync,
            },
        )
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
    conf = agent_status(sync_doc(lb2={"target": {"digest": "cd" * 32}}))
    assert main(["--config", str(conf), "sync", "--status"]) == 1
    conf = agent_status(None)
    assert main(["--config", str(conf), "sync", "--status"]) == 1
    assert "not configured" in capsys.readouterr().out
    (conf.parent / "run" / "status.json").unlink()
    assert main(["--config", str(conf), "sync", "--status"]) == 3
