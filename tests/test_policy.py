"""The supervision policy as tables of (state, event, time) -> (actions, reason)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from lbwatch import backoff
from lbwatch.events import (
    Action,
    ActionResult,
    HaproxyReloaded,
    Health,
    Outcome,
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    Tick,
    Verb,
)
from lbwatch.policy import (
    Decision,
    ServiceState,
    State,
    decide,
    summary,
)
from tests.fakes import config, proc

HA, KA = Service.HAPROXY, Service.KEEPALIVED
CFG = config(policy={"keepalived_start_delay": 2.0})
PROBED = config(haproxy={"health": {"url": "http://127.0.0.1:8404/health", "fall": 2, "rise": 2}})
MASTER, KEEPALIVED = proc(4711), proc(99, name="keepalived")


def running(**kw: object) -> State:
    """A primed state with both services up for a long time."""
    base = State(
        haproxy=ServiceState(proc=MASTER), keepalived=ServiceState(proc=KEEPALIVED), primed=True
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def verbs(decision: Decision) -> list[tuple[str, str]]:
    return [(a.service.value, a.verb.value) for a in decision.actions]


def result(action: Action, outcome: Outcome = Outcome.OK) -> ActionResult:
    return ActionResult(action, outcome, "exit 0" if outcome is Outcome.OK else "exit 1: boom", 0.1)


# ---------------------------------------------------------------------------------------------
# One event, one answer


TABLE = [
    # (description, state, event, expected actions)
    ("both up: nothing to do", running(), Tick(), []),
    (
        "haproxy dies: stop keepalived at once and start haproxy",
        running(),
        ProcessDown(HA, MASTER, "pidfd"),
        [("keepalived", "stop"), ("haproxy", "start")],
    ),
    (
        "keepalived dies on its own: restart it",
        running(),
        ProcessDown(KA, KEEPALIVED, "pidfd"),
        [("keepalived", "start")],
    ),
    (
        "a reload keeps the master: keepalived untouched",
        running(),
        HaproxyReloaded(MASTER, frozenset({1, 2}), frozenset({3, 4})),
        [],
    ),
    (
        "start-up reconcile: haproxy down, keepalived up -> stop keepalived, start haproxy",
        running(haproxy=ServiceState()),
        Tick(),
        [("keepalived", "stop"), ("haproxy", "start")],
    ),
    (
        "start-up reconcile: haproxy up, keepalived down -> start keepalived",
        running(keepalived=ServiceState()),
        Tick(),
        [("keepalived", "start")],
    ),
    (
        "a death reported for another process (PID reused) changes nothing",
        running(),
        ProcessDown(HA, ProcId(4711, start_ticks=1, name="haproxy", started=0.0), "scan"),
        [],
    ),
    (
        "not primed: no action on half a picture",
        running(primed=False, keepalived=ServiceState()),
        Tick(),
        [],
    ),
    (
        "an in-flight start is not repeated",
        running(haproxy=ServiceState(inflight=Action(HA, Verb.START, "x", "starting haproxy"))),
        Tick(),
        [("keepalived", "stop")],
    ),
]


@pytest.mark.parametrize(
    ("state", "event", "expected"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_table(state: State, event: object, expected: list[tuple[str, str]]) -> None:
    """Each row: the actions the policy asks for, from that state and event."""
    decision = decide(state, event, 0.0, CFG)  # type: ignore[arg-type]
    assert verbs(decision) == expected  # in the order promised: keepalived stops first
    assert all(a.reason for a in decision.actions)


def test_haproxy_death_reason_names_the_master_and_the_vip() -> None:
    """The stop action's reason says which master died and why keepalived is stopped; the death
    is not noted a second time on its own, since the actions state it."""
    decision = decide(running(), ProcessDown(HA, MASTER, "pidfd"), 0.0, CFG)
    stop = next(a for a in decision.actions if a.verb is Verb.STOP)
    assert stop.reason == "haproxy master 4711 exited (pidfd); stopping keepalived so the VIP moves"
    # The keepalived it is aimed at: that process gets SIGTERM as the action is issued.
    assert stop.target == running().keepalived.proc and stop.target is not None
    start = next(a for a in decision.actions if a.verb is Verb.START)
    assert start.reason == "haproxy master 4711 exited (pidfd); starting haproxy (attempt 1)"
    assert not any("exited" in n.text for n in decision.notes)


def test_keepalived_never_started_while_haproxy_down() -> None:
    """Whatever happens to keepalived, with haproxy down it is never started."""
    state = State(primed=True, haproxy=ServiceState(), keepalived=ServiceState())
    for now in (0.0, 5.0, 100.0, 1000.0):
        d = decide(state, Tick(), now, CFG)
        assert ("keepalived", "start") not in verbs(d)
        state = d.state
        for a in d.actions:
            state = decide(state, result(a, Outcome.FAILED), now, CFG).state


def test_keepalived_waits_for_haproxy_to_settle() -> None:
    """keepalived starts only keepalived_start_delay after haproxy came up, and says so."""
    state = running(haproxy=ServiceState(proc=proc(5000, started=10.0)), keepalived=ServiceState())
    early = decide(state, Tick(), 11.0, CFG)
    assert verbs(early) == [] and early.wake_at == 12.0
    late = decide(early.state, Tick(), 12.0, CFG)
    assert verbs(late) == [("keepalived", "start")]
    assert late.actions[0].reason.startswith("haproxy master 5000 is up and keepalived is not")


def test_keepalived_restarted_after_haproxy_heals() -> None:
    """haproxy dies, keepalived is stopped, haproxy comes back: keepalived starts again."""
    d = decide(running(), ProcessDown(HA, MASTER, "pidfd"), 100.0, CFG)
    stop = next(a for a in d.actions if a.service is KA)
    start_ha = next(a for a in d.actions if a.service is HA)
    d = decide(d.state, ProcessDown(KA, KEEPALIVED, "pidfd"), 100.3, CFG)
    assert verbs(d) == []  # keepalived's death while we stop it is no reason to restart it
    d = decide(d.state, result(stop), 100.4, CFG)
    d = decide(d.state, result(start_ha), 100.5, CFG)
    new_master = proc(5000, started=100.5)
    d = decide(d.state, ProcessUp(HA, new_master, MASTER), 100.6, CFG)
    assert verbs(d) == [] and d.wake_at == 102.5
    d = decide(d.state, Tick(), 102.5, CFG)
    assert verbs(d) == [("keepalived", "start")]
    assert d.actions[0].reason == "haproxy master 5000 is up again; starting keepalived (attempt 1)"


# ---------------------------------------------------------------------------------------------
# Backoff and give-up


def test_backoff_delay_is_exponential_and_capped() -> None:
    """initial * factor^(n-1), never above max."""
    b = CFG.haproxy.backoff
    delays = [backoff.delay(n, b.initial, b.max, b.factor) for n in range(1, 8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30]


def test_failed_starts_back_off_then_give_up_then_retry_slowly() -> None:
    """Start attempts at 0, 1, 3, 7, 15 s; once the fifth has failed lbwatch gives up loudly
    and tries again only every giveup_retry seconds."""
    state = State(primed=True)
    times: list[float] = []
    given_up_notes = []
    now = 0.0
    while now < 700.0:
        d = decide(state, Tick(), now, CFG)
        state = d.state
        given_up_notes += [n for n in d.notes if n.level == logging.ERROR]
        for a in d.actions:
            if a.service is HA:
                times.append(now)
            d = decide(state, result(a, Outcome.FAILED), now, CFG)
            state = d.state
            given_up_notes += [n for n in d.notes if n.text.startswith("giving up")]
        now += 0.5
    assert times[:5] == [0.0, 1.0, 3.0, 7.0, 15.0]
    assert times[5:] == [15.0 + 300.0, 15.0 + 600.0]  # given up as the fifth failed
    assert state.haproxy.given_up
    assert [n.text[:40] for n in given_up_notes] == ["giving up on haproxy: 5 start attempts w"]
    assert "DOWN, given up" in summary(state, CFG)


def test_running_long_enough_resets_backoff() -> None:
    """A process up for stable_after seconds clears the attempt count and the give-up."""
    state = running(
        haproxy=ServiceState(proc=proc(1, started=50.0), attempts=(40.0, 45.0), given_up=True)
    )
    assert decide(state, Tick(), 55.0, CFG).state.haproxy.attempts == (40.0, 45.0)
    reset = decide(state, Tick(), 60.0, CFG).state.haproxy
    assert reset.attempts == () and not reset.given_up


def test_successful_start_waits_for_the_process_to_show() -> None:
    """After a start command succeeded, no second start before start_confirm has passed."""
    state = State(primed=True, keepalived=ServiceState(proc=KEEPALIVED))
    d = decide(state, Tick(), 0.0, CFG)
    (start,) = [a for a in d.actions if a.service is HA]
    d = decide(d.state, result(start), 0.1, CFG)
    assert [a for a in d.actions if a.service is HA] == []
    assert d.wake_at == pytest.approx(1.0)  # the backoff
    assert [a for a in decide(d.state, Tick(), 1.0, CFG).actions if a.service is HA] == []
    d = decide(d.state, Tick(), 5.1, CFG)
    assert [a.reason[-11:] for a in d.actions if a.service is HA] == ["(attempt 2)"]


def test_start_confirm_ends_when_the_process_shows() -> None:
    """Once the started process was seen, its death is retried on the backoff alone."""
    state = State(primed=True, keepalived=ServiceState(proc=KEEPALIVED))
    d = decide(state, Tick(), 0.0, CFG)
    (start,) = [a for a in d.actions if a.service is HA]
    d = decide(d.state, result(start), 0.1, CFG)
    new = proc(5000, started=0.1)
    d = decide(d.state, ProcessUp(HA, new, None), 0.2, CFG)
    d = decide(d.state, ProcessDown(HA, new, "pidfd"), 1.5, CFG)
    assert ("haproxy", "start") in verbs(d)


# ---------------------------------------------------------------------------------------------
# Health probe


def test_hung_haproxy_counts_as_down_after_fall_failures() -> None:
    """Two failed probes mark haproxy down and stop keepalived; haproxy is not restarted."""
    state = running()
    d = decide(state, ProbeResult(False, "GET: no answer"), 0.0, PROBED)
    assert verbs(d) == []
    d = decide(d.state, ProbeResult(False, "GET: no answer"), 1.0, PROBED)
    assert verbs(d) == [("keepalived", "stop")]
    assert d.actions[0].reason.startswith("haproxy health check failing (GET: no answer)")
    assert d.state.health is Health.DOWN


def test_keepalived_starts_only_after_rise_successes() -> None:
    """With a probe, keepalived waits for haproxy to pass `rise` checks in a row."""
    state = running(keepalived=ServiceState(), health=Health.DOWN, probe_streak=-3)
    d = decide(state, ProbeResult(True, "HTTP 200"), 0.0, PROBED)
    assert verbs(d) == []
    d = decide(d.state, ProbeResult(True, "HTTP 200"), 1.0, PROBED)
    assert verbs(d) == [("keepalived", "start")]


def test_unknown_health_keeps_keepalived_running() -> None:
    """A restarted agent does not stop keepalived before it has probed haproxy."""
    assert verbs(decide(running(health=Health.UNKNOWN), Tick(), 0.0, PROBED)) == []


# ---------------------------------------------------------------------------------------------
# Pause, restart option, stop failures


def test_pause_observes_and_notes_once() -> None:
    """Paused: no action, one 'would' note per held action, and acting again on resume."""
    state = running(paused=True)
    d = decide(state, ProcessDown(HA, MASTER, "pidfd"), 0.0, CFG)
    assert d.actions == ()
    would = [n.text for n in d.notes if n.text.startswith("paused: would")]
    assert len(would) == 2
    d2 = decide(d.state, Tick(), 1.0, CFG)
    assert not [n for n in d2.notes if n.text.startswith("paused")]
    d3 = decide(d2.state, PauseChanged(False), 2.0, CFG)
    assert verbs(d3) == [("keepalived", "stop"), ("haproxy", "start")]


@pytest.mark.parametrize(
    ("option", "expected"), [("ensure", []), ("restart", [("keepalived", "restart")])]
)
def test_haproxy_restarted_by_someone_else(option: str, expected: list[tuple[str, str]]) -> None:
    """A new master: 'ensure' leaves a running keepalived alone, 'restart' restarts it."""
    cfg = config(policy={"on_haproxy_restart": option})
    new = proc(5000, started=10.0)
    d = decide(running(), ProcessUp(HA, new, MASTER), 10.0, cfg)
    assert verbs(d) == expected


def test_failed_stop_falls_back_to_sigterm() -> None:
    """If the stop command fails, keepalived gets SIGTERM through its identity after stop_retry."""
    d = decide(running(haproxy=ServiceState()), Tick(), 0.0, CFG)
    stop = next(a for a in d.actions if a.service is KA)
    d = decide(d.state, result(stop, Outcome.FAILED), 0.2, CFG)
    assert [a for a in d.actions if a.service is KA] == []
    assert d.wake_at == pytest.approx(1.2)
    d = decide(d.state, Tick(), 1.2, CFG)
    (term,) = [a for a in d.actions if a.service is KA]
    assert term.verb is Verb.TERMINATE and term.target == KEEPALIVED


def test_process_up_clears_give_up_but_keeps_attempts() -> None:
    """Started by hand after a give-up: not 'given up' any more, but a quick relapse gives up
    again at once rather than starting a fresh burst of attempts."""
    burst = (1.0, 2.0, 3.0, 4.0, 5.0)
    state = State(
        primed=True,
        keepalived=ServiceState(proc=KEEPALIVED),
        haproxy=ServiceState(attempts=burst, given_up=True, not_before=400.0),
    )
    new = proc(6000, started=10.0)
    d = decide(state, ProcessUp(HA, new, None), 10.0, CFG)
    assert not d.state.haproxy.given_up and d.state.haproxy.attempts == burst
    d = decide(d.state, ProcessDown(HA, new, "pidfd"), 11.0, CFG)
    assert ("haproxy", "start") not in verbs(d)
    assert d.state.haproxy.given_up
