"""The agent's heartbeat (``lbwatch.heartbeat``) on real files: renewed at most every half period
and due every period; a view is current only while its agent's own heartbeat is younger than
the bound; the VIPs a node's kernel holds are read from its interfaces; and in the agent, only
the loop renews it, so a loop that stops turning leaves it to go stale."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lbwatch import heartbeat, pstat
from lbwatch.daemon import Agent
from lbwatch.heartbeat import STALE_AFTER, Heartbeat, judge, kernel_holds, silent_for
from tests.conftest import free_port
from tests.fakes import FakeController, config
from tests.test_cluster_sink import ticks_of


def view_of(pid: int, ticks: int, beat: Path | None, vips: list[str] | None = None) -> Any:
    """A node view as the receiver parses it (only the parts it reads)."""
    agent: dict[str, Any] = {"pid": pid, "start_ticks": ticks, "version": "t"}
    if beat is not None:
        agent["heartbeat"] = str(beat)
    return {"node": "lb2", "agent": agent, "vrrp": {"VI_1": {"vips": vips or []}}}


def this_agent(beat: Path | None) -> Any:
    return view_of(os.getpid(), ticks_of(os.getpid()), beat)


def test_a_heartbeat_is_renewed_at_most_every_half_period_and_due_every_period(
    tmp_path: Path,
) -> None:
    """The first call renews it; a call before half a period has passed does not; one after
    does, and asks to be called again a period later."""
    beat = Heartbeat(tmp_path / "heartbeat")
    assert beat.renew(100.0)
    first = beat.path.read_bytes()
    assert beat.wake == 101.0
    assert not beat.renew(100.4)
    assert beat.path.read_bytes() == first
    assert beat.renew(100.5)
    assert beat.wake == 101.5
    words = beat.path.read_text().split()
    assert words[:3] == ["lbwatch-heartbeat", str(os.getpid()), str(ticks_of(os.getpid()))]
    assert abs(float(words[3]) - pstat.since_boot()) < 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat"]  # no temporary file left


def test_a_view_is_current_while_its_heartbeat_is_younger_than_the_bound(tmp_path: Path) -> None:
    """Just renewed: current, for about the bound; the same heartbeat judged the bound later
    (the agent stopped): "not responding", whatever the view says."""
    path = tmp_path / "heartbeat"
    Heartbeat(path).renew(0.0)
    now = pstat.since_boot()
    fresh = judge(this_agent(path), now)
    assert fresh.state == "current"
    assert STALE_AFTER - 0.5 < fresh.current_for <= STALE_AFTER
    stale = judge(this_agent(path), now + STALE_AFTER + 0.01)  # written to the millisecond
    assert stale.state == "silent"
    assert stale.why == (
        f"lbwatch is not responding (its agent, PID {os.getpid()}, has not renewed its "
        f"heartbeat for {STALE_AFTER:g} s)"
    )


def test_a_heartbeat_counts_only_for_its_own_agent(tmp_path: Path) -> None:
    """Missing, another agent's (PID or start time), damaged, a symlink or a directory: no
    heartbeat of this agent's, so its view is not current, however recent the file."""
    pid, ticks = os.getpid(), ticks_of(os.getpid())
    now = pstat.since_boot()
    path = tmp_path / "heartbeat"
    assert silent_for(str(path), pid, ticks, now) == math.inf
    for text in (
        f"lbwatch-heartbeat {pid + 1} {ticks} {now}\n",
        f"lbwatch-heartbeat {pid} {ticks + 1} {now}\n",
        f"lbwatch-heartbeat {pid} {ticks} nan\n",
        f"lbwatch-heartbeat {pid} {ticks}\n",
        f"other {pid} {ticks} {now}\n",
    ):
        path.write_text(text)
        assert silent_for(str(path), pid, ticks, now) == math.inf, text
    path.write_text(f"lbwatch-heartbeat {pid} {ticks} {now}\n")
    assert silent_for(str(path), pid, ticks, now + 1.5) == pytest.approx(1.5)
    link = tmp_path / "link"
    link.symlink_to(path)
    assert silent_for(str(link), pid, ticks, now) == math.inf
    assert silent_for(str(tmp_path), pid, ticks, now) == math.inf
    missing = judge(this_agent(tmp_path / "none"), now)
    assert missing.state == "silent" and "has no heartbeat at" in missing.why


def test_an_ended_agent_is_ended_and_an_older_agent_is_judged_by_its_pid(tmp_path: Path) -> None:
    """A view whose agent has ended is not current, whatever its heartbeat; a view that names
    no heartbeat (an agent older than it) is current while its agent runs, as before."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    path = tmp_path / "heartbeat"
    path.write_text(f"lbwatch-heartbeat {ended.pid} 1 {pstat.since_boot()}\n")
    verdict = judge(view_of(ended.pid, 1, path), pstat.since_boot())
    assert verdict.state == "ended" and "is not running" in verdict.why
    older = judge(this_agent(None), pstat.since_boot())
    assert older.state == "current" and older.current_for == math.inf


def test_the_kernel_holds_only_the_views_vips_that_are_on_an_interface() -> None:
    """Of the view's VIPs (as written, with a prefix length or a device), those on this node's
    interfaces now: loopback's address is, a TEST-NET address that no interface here has is not
    (the lab's live only inside its namespaces)."""
    view = view_of(1, 1, None, ["127.0.0.1/8 dev lo", "192.0.2.199/24", " "])
    assert kernel_holds(view) == ["127.0.0.1"]
    assert kernel_holds(view_of(1, 1, None, [])) == []


def test_a_renewal_that_fails_is_logged_once_and_its_recovery_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The run directory gone: one error, however many renewals fail; one line when it works
    again."""
    caplog.set_level(logging.INFO, logger="lbwatch")
    run = tmp_path / "run"
    beat = Heartbeat(run / "heartbeat")
    assert not beat.renew(0.0)
    assert not beat.renew(1.0)
    run.mkdir()
    assert beat.renew(2.0)
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if m.startswith("cannot renew the heartbeat")]) == 1
    assert len([m for m in said if m.endswith("renewed again")]) == 1


def test_the_staleness_bound_is_below_split_brain_afters_floor() -> None:
    """A view served just before it went stale must not be able to confirm a claim: the
    shortest split_brain_after allowed is longer than the bound."""
    from lbwatch.config import SPLIT_BRAIN_FLOOR

    assert SPLIT_BRAIN_FLOOR > STALE_AFTER + 0.1  # the receiver's look, a tenth of a second
    assert heartbeat.EVERY < STALE_AFTER / 1.5


def renewals(path: Path, seconds: float, turn: Any) -> list[float]:
    """The heartbeat's renewals (its content changing) seen over ``seconds``, calling ``turn``
    between looks."""
    seen: list[float] = []
    last = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        turn()
        data = path.read_bytes() if path.exists() else b""
        if data and data != last:
            seen.append(time.monotonic())
            last = data
        time.sleep(0.02)
    return seen


def test_only_the_agents_loop_renews_its_heartbeat(tmp_path: Path, control_dir: Path) -> None:
    """The agent with a peer to watch (one that never answers, its watch thread retrying):
    each second of its loop's turns renews the heartbeat; while the loop does not turn (a hung
    loop), nothing else renews it, so the view it wrote goes stale; the next turn renews it."""
    live = tmp_path / "haproxy.cfg"
    live.write_text("global\n")
    cfg = config(
        agent={"node_name": "lb1", "run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path)},
        haproxy={"pidfile": str(tmp_path / "none.pid"), "find_without_pidfile": False},
        keepalived={"pidfile": str(tmp_path / "none.pid"), "find_without_pidfile": False},
        notify={"fifo": str(tmp_path / "fifo")},
        sync={
            "config": str(live),
            "check": ["true", "{file}"],
            "control_dir": str(control_dir),
            "ssh_key": str(tmp_path / "no_key"),
            "peers": [{"name": "lb2", "host": "127.0.0.1", "port": free_port()}],
        },
    )
    (tmp_path / "run").mkdir()
    agent = Agent(cfg, controller=FakeController())
    try:
        agent.peering.start(cfg)
        agent._scan("start-up")  # publishes: the view is written, naming the heartbeat
        path = cfg.agent.run_dir / heartbeat.FILE
        view = json.loads((cfg.staging_path() / "node.json").read_bytes())
        assert view["agent"]["heartbeat"] == str(path)
        seen = renewals(path, 4.0, agent._once)
        gaps = [b - a for a, b in zip(seen, seen[1:])]
        print(f"\nrenewals {len(seen)} in 4 s, gaps {[round(g, 2) for g in gaps]}")
        assert len(seen) >= 3, seen
        assert max(gaps) <= heartbeat.EVERY + 0.3, gaps
        assert judge(view, pstat.since_boot()).state == "current"
        assert (
            agent.peering.cluster is not None
            and agent.peering.cluster.watches[0]._thread.is_alive()
        )
        # The loop stops turning; the watch's thread goes on.
        assert not renewals(path, STALE_AFTER + 0.5, lambda: None)[1:]
        assert judge(view, pstat.since_boot()).state == "silent"
        agent._once()
        assert judge(view, pstat.since_boot()).state == "current"
    finally:
        agent._shutdown()
