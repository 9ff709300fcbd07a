"""The safety promise as a property, against an oracle of its own: keepalived running while
haproxy is not serving means a stop of keepalived is asked now, in flight, or falls due at the
policy's next wake-up. The oracle follows the events as an operator would read them (which
process is up, how many probes failed in a row) and uses none of the policy's helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.events import (
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    Verb,
)
from lbwatch.policy import State, decide
from tests.fakes import config
from tests.test_policy_props import STEP, step_event

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

    def see(self, event: object) -> None:
        if isinstance(event, ProcessUp):
            if not same(self.running[event.service], event.proc) and (
                event.service is Service.HAPROXY
            ):
                self.failed_in_a_row = 0  # a new master: its own probes count
            self.running[event.service] = event.proc
        elif isinstance(event, ProcessDown) and same(self.running[event.service], event.proc):
            self.running[event.service] = None
        elif isinstance(event, ProbeResult):
            self.failed_in_a_row = 0 if event.ok else self.failed_in_a_row + 1
        elif isinstance(event, PauseChanged):
            self.paused = event.paused

    def haproxy_serving(self, fall: Optional[int]) -> bool:
        if self.running[Service.HAPROXY] is None:
            return False
        return fall is None or self.failed_in_a_row < fall


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
        asked = [x for x in d.actions if x.service is Service.KEEPALIVED and x.verb in STOPS]
        inflight = state.keepalived.inflight
        # Another keepalived action in flight answers or passes its deadline first; a failed
        # stop waits stop_retry: either way the policy must have set a wake-up to act then.
        waiting = (inflight is not None or state.keepalived.stop_failed_at is not None) and (
            d.wake_at is not None
        )
        assert asked or (inflight is not None and inflight.verb in STOPS) or waiting, (
            f"keepalived {world.running[Service.KEEPALIVED]} up, haproxy not serving, "
            f"no stop after {event!r}"
        )
