"""haproxy restarted by systemd on request (`systemctl restart haproxy`): keepalived is not
stopped while the new master comes up within ``restart_grace``; any other exit is acted on as
before. Tables and sequences of (state, event, time) -> (actions, reason)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from lbwatch.events import (
    Action,
    ActionResult,
    Observation,
    Outcome,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    Service,
    Tick,
    UnitPlan,
    Verb,
)
from lbwatch.policy import Decision, ServiceState, State, decide, summary
from tests.fakes import config, proc

HA, KA = Service.HAPROXY, Service.KEEPALIVED
CFG = config()  # haproxy through systemctl, restart_grace 5 s
PROBED = config(haproxy={"health": {"url": "http://127.0.0.1:8404/health", "fall": 2, "rise": 2}})
MASTER, NEW, KEEPALIVED = proc(4711), proc(5000, started=0.2), proc(99, name="keepalived")
EXIT = ProcessDown(HA, MASTER, "pidfd")


def running(**kw: object) -> State:
    """Both services up for a long time, on a host where systemd runs."""
    base = State(
        haproxy=ServiceState(proc=MASTER),
        keepalived=ServiceState(proc=KEEPALIVED),
        primed=True,
        systemd=True,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def verbs(decision: Decision) -> list[tuple[str, str]]:
    return [(a.service.value, a.verb.value) for a in decision.actions]


def answer(d: Decision, plan: UnitPlan | None, outcome: Outcome = Outcome.OK) -> ActionResult:
    """systemd's answer to the ASK ``d`` issued."""
    (ask,) = [a for a in d.actions if a.verb is Verb.ASK]
    said = "job 123 start; activating/start; 0 restarts"
    return ActionResult(ask, outcome, said, 0.02, plan=plan)


def result(action: Action, outcome: Outcome = Outcome.OK) -> ActionResult:
    return ActionResult(action, outcome, "exit 0", 0.1)


def asked(cfg: object = CFG, state: State | None = None) -> Decision:
    """haproxy's master exits at 0.0 on a systemd host: systemd is asked."""
    return decide(state or running(), EXIT, 0.0, cfg)  # type: ignore[arg-type]


def test_exit_is_asked_about_before_keepalived_is_stopped() -> None:
    """The master's exit asks systemd first: nothing is stopped or started meanwhile, and the
    ask says why it is made."""
    d = asked()
    assert verbs(d) == [("haproxy", "ask")]
    (ask,) = d.actions
    assert ask.target == MASTER and ask.deadline == 2.0
    assert ask.reason == (
        "haproxy master 4711 exited (pidfd); asking systemd whether it is restarting haproxy"
    )


def test_restart_keeps_keepalived_and_ends_when_the_new_master_runs() -> None:
    """systemd restarts the unit: keepalived keeps running and haproxy is not started by
    lbwatch; the new master ends the episode, said once; nothing ever stopped."""
    d = asked()
    d = decide(d.state, answer(d, UnitPlan.RESTART), 0.03, CFG)
    assert verbs(d) == [] and d.wake_at == 5.0
    assert [n.text for n in d.notes] == [
        "systemd is restarting haproxy: keepalived keeps running for up to 5 s while the new "
        "haproxy comes up"
    ]
    d = decide(d.state, Tick(), 1.0, CFG)
    assert verbs(d) == []  # lbwatch does not start haproxy beside systemd's job
    assert summary(d.state, CFG) == "haproxy down, systemd restarting it; keepalived up (99)"
    d = decide(d.state, ProcessUp(HA, NEW, MASTER), 1.2, CFG)
    assert verbs(d) == [] and d.state.comeback is None
    assert any(
        n.text == "haproxy is back: master 5000 1.20 s after master 4711 exited; keepalived "
        "kept running"
        for n in d.notes
    )
    assert verbs(decide(d.state, Tick(), 6.0, CFG)) == []


def test_new_master_before_the_answer_waits_for_it() -> None:
    """The new master may show up before systemd's answer: the answer still decides."""
    d = asked()
    up = decide(d.state, ProcessUp(HA, NEW, MASTER), 0.02, CFG)
    assert verbs(up) == [] and up.state.comeback is not None
    restart = decide(up.state, answer(d, UnitPlan.RESTART), 0.03, CFG)
    assert verbs(restart) == [] and restart.state.comeback is None
    crash = decide(up.state, answer(d, UnitPlan.AUTO_RESTART), 0.03, CFG)
    assert verbs(crash) == [("keepalived", "stop")]
    assert crash.actions[0].reason == (
        "haproxy master 4711 exited (pidfd); stopping keepalived so the VIP moves"
    )


@pytest.mark.parametrize(
    "plan", [UnitPlan.AUTO_RESTART, UnitPlan.STOP, UnitPlan.NONE, UnitPlan.UNKNOWN]
)
def test_other_answers_act_on_the_exit_as_before(plan: UnitPlan) -> None:
    """A crash restarted by Restart=, a stop, no job, an answer that does not tell: keepalived
    is stopped and haproxy started at once, in today's words and with today's alert."""
    d = asked()
    d = decide(d.state, answer(d, plan), 0.03, CFG)
    assert verbs(d) == [("keepalived", "stop"), ("haproxy", "start")]
    stop, start = d.actions
    assert stop.reason == "haproxy master 4711 exited (pidfd); stopping keepalived so the VIP moves"
    assert stop.alert == "haproxy_down"
    assert start.reason == "haproxy master 4711 exited (pidfd); starting haproxy (attempt 1)"
    assert d.state.comeback is None


@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.TIMEOUT])
def test_no_answer_acts_on_the_exit_as_before(outcome: Outcome) -> None:
    """systemctl failed or timed out: a warning (not an action failure alert), then the exit
    is acted on as a crash."""
    d = asked()
    d = decide(d.state, answer(d, None, outcome), 0.5, CFG)
    assert verbs(d) == [("keepalived", "stop"), ("haproxy", "start")]
    (note,) = [n for n in d.notes if "could not ask systemd" in n.text]
    assert note.level == logging.WARNING and not note.alert
    assert not d.state.haproxy.last_failure


def test_an_answer_that_never_comes_expires() -> None:
    """No result by the ask's deadline: it is failed on the executor's behalf and keepalived
    is stopped then, 2 s after the exit at most."""
    d = asked()
    assert d.wake_at == 2.0
    d = decide(d.state, Tick(), 2.0, CFG)
    assert [r.action.verb for r in d.expired] == [Verb.ASK]
    assert verbs(d) == [("keepalived", "stop"), ("haproxy", "start")]


def test_grace_runs_out_without_a_new_master() -> None:
    """systemd's restart brings no haproxy within the grace: keepalived is stopped and
    haproxy started, saying so."""
    d = asked()
    d = decide(d.state, answer(d, UnitPlan.RESTART), 0.03, CFG)
    assert verbs(decide(d.state, Tick(), 4.9, CFG)) == []
    d = decide(d.state, Tick(), 5.0, CFG)
    assert verbs(d) == [("keepalived", "stop"), ("haproxy", "start")]
    assert d.actions[0].reason == (
        "haproxy master 4711 exited (pidfd) and systemd's restart of haproxy brought no new "
        "haproxy master within restart_grace (5 s); stopping keepalived so the VIP moves"
    )
    assert d.actions[0].alert == "haproxy_down"


def test_failing_probe_holds_until_the_grace_then_stops() -> None:
    """With a probe: the new master failing it within the grace stops nothing; not passing it
    by the grace's end stops keepalived (haproxy runs: it is not started)."""
    d = asked(PROBED)
    d = decide(d.state, answer(d, UnitPlan.RESTART), 0.03, PROBED)
    d = decide(d.state, ProcessUp(HA, NEW, MASTER), 0.2, PROBED)
    for t in (0.3, 1.3, 2.3):
        d = decide(d.state, ProbeResult(False, "HTTP 503", master=NEW), t, PROBED)
        assert verbs(d) == []
    d = decide(d.state, Tick(), 5.0, PROBED)
    assert verbs(d) == [("keepalived", "stop")]
    assert "brought no healthy haproxy within restart_grace (5 s)" in d.actions[0].reason


def test_probe_passing_ends_the_episode_then_failing_stops_at_once() -> None:
    """With a probe the new master is back once it passes `rise` probes; a later failure is an
    ordinary one."""
    d = asked(PROBED)
    d = decide(d.state, answer(d, UnitPlan.RESTART), 0.03, PROBED)
    d = decide(d.state, ProcessUp(HA, NEW, MASTER), 0.2, PROBED)
    d = decide(d.state, ProbeResult(True, "HTTP 200", master=NEW), 0.3, PROBED)
    assert d.state.comeback is not None
    d = decide(d.state, ProbeResult(True, "HTTP 200", master=NEW), 1.3, PROBED)
    assert d.state.comeback is None and verbs(d) == []
    for t in (2.3, 3.3):
        d = decide(d.state, ProbeResult(False, "HTTP 503", master=NEW), t, PROBED)
    assert verbs(d) == [("keepalived", "stop")]
    assert d.actions[0].reason.startswith("haproxy health check failing (HTTP 503)")


def test_second_exit_within_the_episode_keeps_the_first_deadline() -> None:
    """The new master dies before it proved itself: systemd is asked again, and the grace
    still counts from the first exit."""
    d = asked(PROBED)
    d = decide(d.state, answer(d, UnitPlan.RESTART), 0.03, PROBED)
    d = decide(d.state, ProcessUp(HA, NEW, MASTER), 0.2, PROBED)
    d = decide(d.state, ProcessDown(HA, NEW, "pidfd"), 3.0, PROBED)
    assert verbs(d) == [("haproxy", "ask")] and d.actions[0].target == NEW
    d = decide(d.state, answer(d, UnitPlan.RESTART), 3.1, PROBED)
    assert verbs(d) == [] and d.wake_at == 5.0
    assert verbs(decide(d.state, Tick(), 5.0, PROBED)) == [
        ("keepalived", "stop"),
        ("haproxy", "start"),
    ]


def test_restart_option_restarts_keepalived_once_haproxy_is_back() -> None:
    """on_haproxy_restart = "restart": keepalived is restarted (by design), once systemd's
    restart has brought the new master, not stopped at the exit."""
    cfg = config(policy={"on_haproxy_restart": "restart"})
    d = asked(cfg)
    up = decide(d.state, ProcessUp(HA, NEW, MASTER), 0.02, cfg)
    assert verbs(up) == []  # the answer is not in yet
    d = decide(up.state, answer(d, UnitPlan.RESTART), 0.03, cfg)
    assert verbs(d) == [("keepalived", "restart")]


@pytest.mark.parametrize(
    ("cfg", "state"),
    [
        (CFG, running(systemd=False)),
        (config(policy={"restart_grace": 0}), running()),
        (config(haproxy={"start": ["haproxy", "-W", "-D", "-f", "/etc/haproxy.cfg"]}), running()),
        (CFG, running(haproxy=ServiceState(proc=MASTER, inflight=Action(HA, Verb.SYNC, "x", "y")))),
    ],
    ids=["no systemd", "grace 0", "own start command", "haproxy's slot busy"],
)
def test_not_asked_where_systemd_cannot_tell(cfg: object, state: State) -> None:
    """Without systemd, with the grace off, with commands other than systemctl's, or with
    haproxy's slot taken: keepalived is stopped at once, as before."""
    d = asked(cfg, state)
    assert ("keepalived", "stop") in verbs(d)
    assert ("haproxy", "ask") not in verbs(d) and d.state.comeback is None


def test_exit_of_a_failing_master_asks_nothing() -> None:
    """haproxy was failing its probe, keepalived's stop already asked (here: failed): its exit
    holds nothing back."""
    d = decide(running(), ProbeResult(False, "HTTP 503"), 0.0, PROBED)
    d = decide(d.state, ProbeResult(False, "HTTP 503"), 1.0, PROBED)
    (stop,) = d.actions
    d = decide(d.state, result(stop, Outcome.FAILED), 1.1, PROBED)
    d = decide(d.state, ProcessDown(HA, MASTER, "pidfd"), 1.5, PROBED)
    assert ("haproxy", "ask") not in verbs(d) and d.state.comeback is None
    assert ("haproxy", "start") in verbs(d)
    assert verbs(decide(d.state, Tick(), 2.1, PROBED)) == [("keepalived", "terminate")]


def test_exit_and_new_master_in_one_scan_ask_nothing() -> None:
    """One scan saw the old master gone and a new one running: as before, nothing is asked,
    nothing stopped."""
    d = decide(running(), Observation((EXIT, ProcessUp(HA, NEW, MASTER))), 0.0, CFG)
    assert verbs(d) == [] and d.state.comeback is None


def test_keepalived_not_running_needs_no_grace() -> None:
    """keepalived was down anyway: a crash answer ends the episode and haproxy is started."""
    d = asked(state=running(keepalived=ServiceState()))
    d = decide(d.state, answer(d, UnitPlan.AUTO_RESTART), 0.03, CFG)
    assert verbs(d) == [("haproxy", "start")] and d.state.comeback is None
