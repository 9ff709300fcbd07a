"""The policy under combined faults, as tables: one scan as one observation, actions that never
answer, config sync on haproxy's slot, and log lines that say each thing once and truly."""

from __future__ import annotations

import logging
from dataclasses import replace

from lbwatch.events import (
    Action,
    ActionResult,
    Health,
    LeftoversGone,
    Observation,
    Outcome,
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    Service,
    SyncJob,
    SyncWanted,
    Tick,
    Verb,
)
from lbwatch.policy import DownCause, ServiceState, State, decide, health_line
from tests.fakes import config, proc

HA, KA = Service.HAPROXY, Service.KEEPALIVED
CFG = config(policy={"keepalived_start_delay": 2.0})
PROBED = config(haproxy={"health": {"url": "http://127.0.0.1:8404/health", "fall": 2, "rise": 2}})
OLD, NEW, KEEPALIVED = proc(4711), proc(4790), proc(99, name="keepalived")
LOCAL = SyncJob("local", "/etc/haproxy/haproxy.cfg", seen_ns=5)
STAGED = SyncJob("staged", "/etc/haproxy/haproxy.cfg")


def running(**kw: object) -> State:
    base = State(haproxy=ServiceState(proc=OLD), keepalived=ServiceState(proc=KEEPALIVED))
    return replace(replace(base, primed=True), **kw)  # type: ignore[arg-type]


def verbs(actions: tuple[Action, ...]) -> list[tuple[str, str]]:
    return [(a.service.value, a.verb.value) for a in actions]


# ---------------------------------------------------------------------------------------------
# One scan, one observation


def test_master_replaced_within_one_scan_touches_nothing() -> None:
    """A scan that finds the old master gone and a new one running is applied as one: keepalived
    is not stopped and no haproxy start is issued for the moment in between."""
    seen = Observation((ProcessDown(HA, OLD, "scan"), ProcessUp(HA, NEW, previous=OLD)))
    d = decide(running(), seen, 100.0, CFG)
    assert d.actions == ()
    assert d.state.haproxy.proc == NEW and d.state.keepalived.proc == KEEPALIVED
    texts = [n.text for n in d.notes]
    assert texts == [
        "haproxy master 4711 exited (scan)",
        "haproxy is running: haproxy 4790 (was 4711)",
    ]


def test_the_same_changes_fed_one_by_one_would_fail_over() -> None:
    """The control for the test above: the down alone (what the agent used to feed) stops
    keepalived, so the one-observation rule is what prevents the needless failover."""
    d = decide(running(), ProcessDown(HA, OLD, "scan"), 100.0, CFG)
    assert ("keepalived", "stop") in verbs(d.actions)


# ---------------------------------------------------------------------------------------------
# Nothing wedges


def test_an_action_without_a_result_fails_at_its_deadline() -> None:
    """A start whose executor never answers counts as failed once its deadline passes: the slot
    is freed, the failure is said and alerted, and the next attempt follows the backoff."""
    d = decide(State(), ProcessDown(KA, KEEPALIVED, "scan"), 0.0, CFG)
    d = decide(replace(d.state, primed=True, haproxy=ServiceState(proc=OLD)), Tick(), 0.0, CFG)
    start = d.state.keepalived.inflight
    assert start is not None and start.verb is Verb.START
    assert d.wake_at is not None and d.wake_at <= start.deadline
    before = decide(d.state, Tick(), start.deadline - 0.01, CFG)
    assert before.state.keepalived.inflight == start and before.expired == ()
    after = decide(d.state, Tick(), start.deadline, CFG)
    assert [r.action for r in after.expired] == [start]
    assert after.expired[0].outcome is Outcome.TIMEOUT
    assert after.state.keepalived.inflight != start
    failed = [n for n in after.notes if n.alert == "action_failed"]
    assert failed and "no result within" in failed[0].text
    # The answer that finally comes is stale and changes nothing.
    late = decide(after.state, ActionResult(start, Outcome.OK, "exit 0", 99.0), 41.0, CFG)
    assert late.state.keepalived == after.state.keepalived


def test_a_probe_that_could_not_run_counts_neither_way() -> None:
    """An internal error of the prober is no evidence about haproxy: no fall, no rise, one
    error note."""
    state = running(health=Health.UP, probe_streak=3)
    d = decide(
        state, ProbeResult(False, "OSError: too many open files", internal=True), 1.0, PROBED
    )
    assert d.state.health is Health.UP and d.state.probe_streak == 3 and d.actions == ()
    assert [n.level for n in d.notes] == [logging.ERROR]


# ---------------------------------------------------------------------------------------------
# Config sync through the policy


def test_sync_job_runs_on_haproxys_slot() -> None:
    """A sync job becomes a SYNC action on haproxy, with its reason."""
    d = decide(running(), SyncWanted(LOCAL), 1.0, CFG)
    assert verbs(d.actions) == [("haproxy", "sync")]
    action = d.actions[0]
    assert action.job == LOCAL and d.state.haproxy.inflight == action
    assert action.reason == ("/etc/haproxy/haproxy.cfg changed; checking, reloading and pushing it")


def test_sync_waits_for_a_start_of_haproxy_and_its_confirmation() -> None:
    """haproxy down: its start goes first; the sync job waits while the start is in flight and
    while the started haproxy may still show up, then runs."""
    down = running(haproxy=ServiceState(down_cause=DownCause.UNEXPECTED))
    d = decide(down, SyncWanted(STAGED), 1.0, CFG)
    assert verbs(d.actions) == [("keepalived", "stop"), ("haproxy", "start")]
    start = d.state.haproxy.inflight
    assert start is not None
    d = decide(d.state, SyncWanted(LOCAL), 1.1, CFG)
    assert ("haproxy", "sync") not in verbs(d.actions)
    d = decide(d.state, ActionResult(start, Outcome.OK, "exit 0", 0.1), 1.2, CFG)
    assert ("haproxy", "sync") not in verbs(d.actions)  # confirming the start
    d = decide(d.state, ProcessUp(HA, NEW, previous=OLD), 1.3, CFG)
    assert verbs(d.actions) == [("haproxy", "sync")]
    assert d.actions[0].job == STAGED  # first come, first served
    assert d.state.sync_queue == (LOCAL,)


def test_sync_never_runs_beside_a_haproxy_action() -> None:
    """While a SYNC runs, haproxy dying does not start haproxy beside it; the start follows the
    sync's result."""
    d = decide(running(), SyncWanted(LOCAL), 1.0, CFG)
    sync = d.actions[0]
    d = decide(d.state, ProcessDown(HA, OLD, "pidfd"), 1.5, CFG)
    assert verbs(d.actions) == [("keepalived", "stop")]
    d = decide(d.state, ActionResult(sync, Outcome.OK, "applied", 0.5), 2.0, CFG)
    assert verbs(d.actions) == [("haproxy", "start")]


def test_pause_holds_sync_and_resume_runs_it() -> None:
    """Paused: sync jobs wait and are noted once; on resume the waiting job runs."""
    d = decide(running(paused=True), SyncWanted(STAGED), 1.0, CFG)
    assert d.actions == ()
    assert [n.text for n in d.notes] == [
        "paused: would sync haproxy: a peer staged a new version; "
        "checking and installing it as /etc/haproxy/haproxy.cfg"
    ]
    d = decide(d.state, SyncWanted(STAGED), 2.0, CFG)
    assert d.actions == () and d.notes == ()
    assert d.state.sync_queue == (STAGED,)
    d = decide(d.state, PauseChanged(False), 3.0, CFG)
    assert verbs(d.actions) == [("haproxy", "sync")]


def test_sync_jobs_of_one_kind_coalesce_with_the_latest_edit_time() -> None:
    """Two local edits seen before the job ran are one job, carrying the later edit time."""
    state = running(haproxy=ServiceState(proc=OLD, inflight=Action(HA, Verb.START, "x", "y")))
    d = decide(state, SyncWanted(LOCAL), 1.0, CFG)
    d = decide(d.state, SyncWanted(STAGED), 1.0, CFG)
    later = replace(LOCAL, seen_ns=9)
    d = decide(d.state, SyncWanted(later), 1.0, CFG)
    assert d.state.sync_queue == (later, STAGED)


# ---------------------------------------------------------------------------------------------
# Log lines that tell the truth, once


def test_health_failure_is_said_once_with_the_stop() -> None:
    """The probe's fall and the stop it causes make one line (the action's), not two."""
    state = running(health=Health.UP, probe_streak=-1)
    d = decide(state, ProbeResult(False, "GET /health: HTTP 503"), 1.0, PROBED)
    assert verbs(d.actions) == [("keepalived", "stop")]
    assert d.actions[0].cause == "haproxy health check failing (GET /health: HTTP 503)"
    assert d.notes == ()


def test_after_a_hang_keepalived_returns_because_haproxy_is_healthy_again() -> None:
    """keepalived stopped for a failing probe and the same master recovers: the start says it is
    healthy again, never that a master that never went down "is up again"."""
    state = running(health=Health.UP, probe_streak=-1)
    d = decide(state, ProbeResult(False, "GET /health: no answer"), 1.0, PROBED)
    stop = d.actions[0]
    # The agent scans before it takes a result: the exit is seen first.
    d = decide(d.state, ProcessDown(KA, KEEPALIVED, "pidfd"), 1.1, PROBED)
    d = decide(d.state, ActionResult(stop, Outcome.OK, "exit 0", 0.1), 1.2, PROBED)
    for t in (2.0, 3.0):
        d = decide(d.state, ProbeResult(True, "GET /health: HTTP 200"), t, PROBED)
    assert verbs(d.actions) == [("keepalived", "start")]
    assert d.actions[0].cause == "haproxy master 4711 is healthy again"


def test_after_a_new_master_keepalived_returns_because_haproxy_is_up_again() -> None:
    """The control: stopped because the master died, started once a new master is up."""
    d = decide(running(), ProcessDown(HA, OLD, "pidfd"), 1.0, CFG)
    stop = next(a for a in d.actions if a.service is KA)
    d = decide(d.state, ProcessDown(KA, KEEPALIVED, "pidfd"), 1.1, CFG)
    d = decide(d.state, ActionResult(stop, Outcome.OK, "exit 0", 0.1), 1.2, CFG)
    d = decide(d.state, ProcessUp(HA, proc(4790, started=1.3), previous=OLD), 1.3, CFG)
    d = decide(d.state, Tick(), 3.4, CFG)
    assert d.actions[0].cause == "haproxy master 4790 is up again"


def test_give_up_is_announced_once_per_episode() -> None:
    """A service that gives up, shows up briefly and relapses is not announced as given up a
    second time; once it has been stable, a new give-up is news again."""
    cfg = config(
        keepalived={"backoff": {"max_attempts": 1, "giveup_retry": 10, "stable_after": 5}},
        policy={"keepalived_start_delay": 0},
    )
    state = running(keepalived=ServiceState(down_cause=DownCause.UNEXPECTED))
    d = decide(state, Tick(), 0.0, cfg)
    start = d.actions[0]
    d = decide(d.state, ActionResult(start, Outcome.FAILED, "exit 1", 0.1), 0.1, cfg)
    assert [n.alert for n in d.notes].count("giveup") == 1
    up = proc(100, started=0.2, name="keepalived")
    d = decide(d.state, ProcessUp(KA, up, None), 0.2, cfg)
    d = decide(d.state, ProcessDown(KA, up, "pidfd"), 0.3, cfg)
    assert "giveup" not in [n.alert for n in d.notes]
    assert d.state.keepalived.given_up
    # Stable for stable_after: the episode ends; the next give-up is announced.
    up2 = proc(101, started=20.0, name="keepalived")
    d = decide(d.state, ProcessUp(KA, up2, None), 20.0, cfg)
    d = decide(d.state, Tick(), 25.0, cfg)
    assert not d.state.keepalived.giveup_announced and d.state.keepalived.attempts == ()
    d = decide(d.state, ProcessDown(KA, up2, "pidfd"), 26.0, cfg)
    start = d.actions[0]
    d = decide(d.state, ActionResult(start, Outcome.FAILED, "exit 1", 0.1), 26.1, cfg)
    assert [n.alert for n in d.notes].count("giveup") == 1


def test_a_start_that_exits_0_without_a_process_is_a_warning_once() -> None:
    """The start command succeeds but nothing shows up within start_confirm: a WARNING the first
    time, not on every later attempt."""
    cfg = config(policy={"start_confirm": 1.0}, haproxy={"backoff": {"max_attempts": 10}})
    d = decide(State(primed=True), Tick(), 0.0, cfg)
    warnings = []
    now = 0.0
    for _ in range(4):
        start = d.state.haproxy.inflight
        assert start is not None and start.verb is Verb.START
        d = decide(d.state, ActionResult(start, Outcome.OK, "exit 0", 0.1), now, cfg)
        now = max(now + 1.0, d.wake_at or 0.0)
        while d.state.haproxy.inflight is None:
            d = decide(d.state, Tick(), now, cfg)
            warnings += [n for n in d.notes if n.level == logging.WARNING]
            now = d.wake_at or now + 1.0
    assert len(warnings) == 1
    assert warnings[0].text.startswith("start haproxy exited 0 but no haproxy process appeared")


def test_health_line_agrees_with_the_state() -> None:
    """Unknown health with passing probes says how many of `rise` passed; after haproxy went
    away it says so instead of showing a stale HTTP 200."""
    state = running(probe_streak=1, probe_detail="GET /health: HTTP 200")
    assert health_line(state, PROBED) == "1 of 2 passing probes so far; last: GET /health: HTTP 200"
    d = decide(state, ProcessDown(HA, OLD, "pidfd"), 1.0, PROBED)
    assert health_line(d.state, PROBED) == "haproxy is not running"
    d = decide(d.state, ProcessUp(HA, NEW, previous=OLD), 1.0, PROBED)
    assert health_line(d.state, PROBED) == "not probed yet"
    assert health_line(running(), CFG) == ""


# ---------------------------------------------------------------------------------------------
# keepalived's leftovers


def test_keepalived_start_waits_for_the_children_a_killed_parent_left() -> None:
    """keepalived refuses to start while its last instance's children run: the start waits for
    them (one line says so), goes ahead the moment they are gone, and says why."""
    cfg = config(policy={"keepalived_start_delay": 0})
    d = decide(running(), ProcessDown(KA, KEEPALIVED, "pidfd", leftovers=1), 1.0, cfg)
    assert d.actions == ()
    assert [n.text for n in d.notes] == [
        "keepalived 99 exited (pidfd); waiting up to 5 s for the 1 child process(es) it left "
        "to exit before starting keepalived again"
    ]
    assert d.wake_at == 6.0
    d = decide(d.state, Observation((LeftoversGone(KA, KEEPALIVED),)), 2.0, cfg)
    assert verbs(d.actions) == [("keepalived", "start")]
    assert d.actions[0].reason == (
        "keepalived 99 exited (pidfd); the child processes it left have exited; "
        "starting keepalived (attempt 1)"
    )


def test_keepalived_start_goes_ahead_when_the_children_linger() -> None:
    """Children that do not exit hold the start back for a bounded time only."""
    cfg = config(policy={"keepalived_start_delay": 0})
    d = decide(running(), ProcessDown(KA, KEEPALIVED, "pidfd", leftovers=2), 1.0, cfg)
    assert decide(d.state, Tick(), 5.9, cfg).actions == ()
    assert verbs(decide(d.state, Tick(), 6.0, cfg).actions) == [("keepalived", "start")]


def test_haproxy_never_waits_for_its_old_workers() -> None:
    """haproxy starts beside old workers (SO_REUSEPORT): its start is not delayed by them."""
    d = decide(running(), ProcessDown(HA, OLD, "pidfd", leftovers=4), 1.0, CFG)
    assert verbs(d.actions) == [("keepalived", "stop"), ("haproxy", "start")]
