"""Properties of the policy over arbitrary event sequences (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.events import (
    ActionResult,
    Event,
    Outcome,
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    Service,
    Tick,
    UnitPlan,
    Verb,
)
from lbwatch.policy import State, decide, haproxy_ready
from tests.fakes import config, proc

CFGS = [
    config(),
    config(haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 1, "rise": 2}}),
    config(policy={"on_haproxy_restart": "restart", "keepalived_start_delay": 0}),
    # The last two on a host where systemd runs: an exit of haproxy's master is asked about.
    config(policy={"restart_grace": 3}),
    config(
        haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 1, "rise": 2}},
        policy={"on_haproxy_restart": "restart", "restart_grace": 3},
    ),
]
SYSTEMD = [False, False, False, True, True]

STEP = st.one_of(
    st.tuples(st.just("up"), st.sampled_from(list(Service)), st.integers(1, 4)),
    st.tuples(st.just("down"), st.sampled_from(list(Service)), st.integers(1, 4)),
    st.tuples(st.just("probe"), st.booleans(), st.just(0)),
    st.tuples(st.just("pause"), st.booleans(), st.just(0)),
    st.tuples(st.just("result"), st.sampled_from(list(Outcome)), st.integers(0, 1)),
    st.tuples(st.just("answer"), st.sampled_from(list(UnitPlan)), st.just(0)),
    st.tuples(st.just("tick"), st.just(0), st.just(0)),
)


def step_event(step: tuple, state: State, now: float) -> Event | None:
    """The event one drawn STEP stands for in ``state``; None: a result with nothing in
    flight, or systemd's answer with no question asked, skipped."""
    kind, a, b = step
    if kind == "up":
        return ProcessUp(a, proc(b, started=now, name=a.value), state.svc(a).proc)
    if kind == "down":
        return ProcessDown(a, state.svc(a).proc or proc(b, name=a.value), "scan")
    if kind == "probe":
        return ProbeResult(a, "probe")
    if kind == "pause":
        return PauseChanged(a)
    if kind == "result":
        inflight = state.svc(list(Service)[b]).inflight
        return None if inflight is None else ActionResult(inflight, a, "detail", 0.1)
    if kind == "answer":
        ask = state.haproxy.inflight
        if ask is None or ask.verb is not Verb.ASK:
            return None
        return ActionResult(ask, Outcome.OK, "systemd said", 0.02, plan=a)
    return Tick()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(STEP, st.floats(0, 20)), max_size=60), st.sampled_from(range(len(CFGS))))
def test_invariants_hold_for_any_sequence(steps: list, cfg_index: int) -> None:
    """keepalived is never started unless haproxy is ready, at most one action per service is in
    flight (a new one only once the last answered or passed its deadline), nothing happens while
    paused, systemd is asked only about haproxy and only where it runs, and every action says
    why."""
    cfg = CFGS[cfg_index]
    state, now = State(primed=True, systemd=SYSTEMD[cfg_index]), 0.0
    for step, dt in steps:
        now += dt
        event = step_event(step, state, now)
        if event is None:
            continue
        before = state
        d = decide(state, event, now, cfg)
        state = d.state
        if before.paused and not isinstance(event, PauseChanged):
            assert d.actions == ()
        services = [x.service for x in d.actions]
        assert len(services) == len(set(services))
        expired = {r.action.service for r in d.expired}
        for action in d.actions:
            assert action.reason
            assert (
                before.svc(action.service).inflight is None
                or isinstance(event, ActionResult)
                or action.service in expired
            )
            assert state.svc(action.service).inflight == action
            if action.service is Service.KEEPALIVED and action.verb is Verb.START:
                assert haproxy_ready(state, now, cfg)
            if action.verb is Verb.ASK:
                assert action.service is Service.HAPROXY and SYSTEMD[cfg_index]
        if d.wake_at is not None:
            assert d.wake_at > now
