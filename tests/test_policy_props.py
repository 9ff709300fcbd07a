"""Properties of the policy over arbitrary event sequences (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.events import (
    ActionResult,
    Outcome,
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    Service,
    Tick,
    Verb,
)
from lbwatch.policy import State, decide, haproxy_ready
from tests.fakes import config, proc

CFGS = [
    config(),
    config(haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 1, "rise": 2}}),
    config(policy={"on_haproxy_restart": "restart", "keepalived_start_delay": 0}),
]

STEP = st.one_of(
    st.tuples(st.just("up"), st.sampled_from(list(Service)), st.integers(1, 4)),
    st.tuples(st.just("down"), st.sampled_from(list(Service)), st.integers(1, 4)),
    st.tuples(st.just("probe"), st.booleans(), st.just(0)),
    st.tuples(st.just("pause"), st.booleans(), st.just(0)),
    st.tuples(st.just("result"), st.sampled_from(list(Outcome)), st.integers(0, 1)),
    st.tuples(st.just("tick"), st.just(0), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(STEP, st.floats(0, 20)), max_size=60), st.sampled_from(range(3)))
def test_invariants_hold_for_any_sequence(steps: list, cfg_index: int) -> None:
    """keepalived is never started unless haproxy is ready, at most one action per service is in
    flight (a new one only once the last answered or passed its deadline), nothing happens while
    paused, and every action says why."""
    cfg = CFGS[cfg_index]
    state, now = State(primed=True), 0.0
    for (kind, a, b), dt in steps:
        now += dt
        if kind == "up":
            event = ProcessUp(a, proc(b, started=now, name=a.value), state.svc(a).proc)
        elif kind == "down":
            current = state.svc(a).proc
            event = ProcessDown(a, current or proc(b, name=a.value), "scan")
        elif kind == "probe":
            event = ProbeResult(a, "probe")
        elif kind == "pause":
            event = PauseChanged(a)
        elif kind == "result":
            inflight = state.svc(list(Service)[b]).inflight
            if inflight is None:
                continue
            event = ActionResult(inflight, a, "detail", 0.1)
        else:
            event = Tick()
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
        if d.wake_at is not None:
            assert d.wake_at > now
