"""The safety promise as a property, against an oracle of its own: keepalived running while
haproxy is not serving means a stop of keepalived is asked now, in flight, or falls due at the
policy's next wake-up. Where systemd runs, that may wait while systemd is asked about the exit
or says it is restarting haproxy, and never longer than ``restart_grace``. The oracle follows
the events as an operator would read them (which process is up, how many probes failed in a
row, what systemd said) and uses none of the policy's helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.events import (
    ActionResult,
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    UnitPlan,
    Verb,
)
from lbwatch.policy import Decision, State, decide
from tests.fakes import config, proc
from tests.test_policy_props import STEP, step_event

GRACE = 3.0

CFGS = [
    config(),
    config(haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 2, "rise": 2}}),
    config(
        haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 1, "rise": 1}},
        policy={"on_haproxy_restart": "restart", "keepalived_start_delay": 0},
    ),
]
STOPS = (Verb.STOP, Verb.TERMINATE)


def same(a: Optional[ProcId], b: ProcId) -> bool:
    """One process: the kernel's identity, its PID and its start time in clock ticks."""
    return a is not None and (a.pid, a.start_ticks) == (b.pid, b.start_ticks)


@dataclass
class World:
    """What the events say, kept by the test alone."""

    running: dict[Service, Optional[ProcId]] = field(
        default_factory=lambda: {Service.HAPROXY: None, Service.KEEPALIVED: None}
    )
    failed_in_a_row: int = 0  # probes of the current haproxy master
    paused: bool = False
    # Since when keepalived has been running beside a haproxy that does not serve (not paused).
    unsafe_since: Optional[float] = None
    # What systemd said about haproxy's last exit: "not asked", "asking", or its answer.
    systemd_said: str = "not asked"

    def see(self, event: object) -> None:
        if isinstance(event, ProcessUp):
            if not same(self.running[event.service], event.proc) and (
                event.service is Service.HAPROXY
            ):
                self.failed_in_a_row = 0  # a new master: its own probes count
            self.running[event.service] = event.proc
        elif isinstance(event, ProcessDown) and same(self.running[event.service], event.proc):
            self.running[event.service] = None
            if event.service is Service.HAPROXY:
                self.systemd_said = "not asked"  # a new exit: nothing said of it yet
        elif isinstance(event, ProbeResult):
            self.failed_in_a_row = 0 if event.ok else self.failed_in_a_row + 1
        elif isinstance(event, PauseChanged):
            self.paused = event.paused

    def haproxy_serving(self, fall: Optional[int]) -> bool:
        if self.running[Service.HAPROXY] is None:
            return False
        return fall is None or self.failed_in_a_row < fall

    def unsafe(self, fall: Optional[int]) -> bool:
        return (
            not self.paused
            and self.running[Service.KEEPALIVED] is not None
            and not self.haproxy_serving(fall)
        )

    def hear(self, event: object, d: Decision) -> None:
        """What the policy asked systemd, and what systemd answered."""
        if isinstance(event, ActionResult) and event.action.verb is Verb.ASK:
            ok = event.outcome.value == "ok" and event.plan is not None
            self.systemd_said = event.plan.value if ok and event.plan else "unknown"
        if any(r.action.verb is Verb.ASK for r in d.expired):
            self.systemd_said = "unknown"
        if any(a.verb is Verb.ASK for a in d.actions):
            self.systemd_said = "asking"


def stop_coming(state: State, d: Decision) -> bool:
    """A stop of keepalived asked in this decision, in flight, or due at the next wake-up
    (another keepalived action answers or passes its deadline first; a failed stop waits
    stop_retry)."""
    asked = [x for x in d.actions if x.service is Service.KEEPALIVED and x.verb in STOPS]
    inflight = state.keepalived.inflight
    waiting = (inflight is not None or state.keepalived.stop_failed_at is not None) and (
        d.wake_at is not None
    )
    return bool(asked) or (inflight is not None and inflight.verb in STOPS) or waiting


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(STEP, st.floats(0, 20)), max_size=60), st.sampled_from(range(3)))
def test_keepalived_never_outlives_a_haproxy_that_does_not_serve(
    steps: list, cfg_index: int
) -> None:
    """After every event: keepalived up and haproxy down (or failing `fall` probes in a row),
    not paused, implies a keepalived stop asked in this decision, in flight, or due by the
    policy's next wake-up (a failed stop command is retried as a SIGTERM after stop_retry)."""
    cfg = CFGS[cfg_index]
    fall = cfg.haproxy.health.fall if cfg.haproxy.health else None
    state, now, world = State(primed=True), 0.0, World()
    for step, dt in steps:
        now += dt
        event = step_event(step, state, now)
        if event is None:
            continue
        world.see(event)
        d = decide(state, event, now, cfg)
        state = d.state
        unsafe = (
            not world.paused
            and world.running[Service.KEEPALIVED] is not None
            and not world.haproxy_serving(fall)
        )
        if not unsafe:
            continue
        assert stop_coming(state, d), (
            f"keepalived {world.running[Service.KEEPALIVED]} up, haproxy not serving, "
            f"no stop after {event!r}"
        )


SYSTEMD_CFGS = [
    config(policy={"restart_grace": GRACE}),
    config(
        haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 2, "rise": 2}},
        policy={"restart_grace": GRACE},
    ),
    config(
        haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 1, "rise": 1}},
        policy={"on_haproxy_restart": "restart", "keepalived_start_delay": 0,
                "restart_grace": GRACE},
    ),
]  # fmt: skip


# More of what this property is about: haproxy's master exiting, and systemd answering.
SYSTEMD_STEP = st.one_of(
    STEP,
    st.tuples(st.just("down"), st.just(Service.HAPROXY), st.integers(1, 4)),
    st.tuples(st.just("answer"), st.sampled_from(list(UnitPlan)), st.just(0)),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(SYSTEMD_STEP, st.floats(0, 4)), max_size=60),
    st.sampled_from(range(len(SYSTEMD_CFGS))),
)
def test_keepalived_waits_only_for_systemds_restart_and_never_past_the_grace(
    steps: list, cfg_index: int
) -> None:
    """Where systemd runs, after every event: keepalived up and haproxy not serving implies a
    keepalived stop asked, in flight or due, unless systemd is being asked about haproxy's exit
    or has said it is restarting the unit; and never later than restart_grace after haproxy
    stopped serving."""
    cfg = SYSTEMD_CFGS[cfg_index]
    fall = cfg.haproxy.health.fall if cfg.haproxy.health else None
    master, keepalived = proc(1), proc(2, name="keepalived")
    state, now, world = State(primed=True, systemd=True), 0.0, World()
    for event in (
        ProcessUp(Service.HAPROXY, master, None),
        ProcessUp(Service.KEEPALIVED, keepalived, None),
    ):
        world.see(event)
        state = decide(state, event, now, cfg).state
    for step, dt in steps:
        now += dt
        event = step_event(step, state, now)
        if event is None:
            continue
        world.see(event)
        d = decide(state, event, now, cfg)
        state = d.state
        world.hear(event, d)
        if not world.unsafe(fall):
            world.unsafe_since = None
            continue
        if world.unsafe_since is None:
            world.unsafe_since = now
        overdue = now >= world.unsafe_since + GRACE
        waits_for_systemd = world.systemd_said in ("asking", UnitPlan.RESTART.value)
        if overdue or not waits_for_systemd:
            assert stop_coming(state, d), (
                f"keepalived up, haproxy not serving since {world.unsafe_since} "
                f"(now {now}, systemd: {world.systemd_said}), no stop after {event!r}"
            )
