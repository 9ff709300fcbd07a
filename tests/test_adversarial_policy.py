"""Adversarial tests of the supervision policy: properties over arbitrary sequences of
observations, probes, pauses, sync requests, results (on time and late) and deadlines, checked
against an oracle written from the README's promises, not from the policy's code; and the
specific sequences those properties found.

A test here that fails shows a bug in lbwatch (see the report on branch ``adv``); it is not
marked xfail on purpose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from lbwatch.config import Config
from lbwatch.events import (
    Action,
    ActionResult,
    Event,
    Health,
    Observation,
    Outcome,
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    SyncJob,
    SyncWanted,
    Tick,
    Verb,
)
from lbwatch.policy import Decision, Primed, ServiceState, State, decide
from tests.fakes import config, proc

HA, KA = Service.HAPROXY, Service.KEEPALIVED
LIVE = "/etc/haproxy/haproxy.cfg"
STAGED = SyncJob("staged", LIVE)

CFGS = [
    config(),
    config(haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 1, "rise": 2}}),
    config(
        haproxy={"health": {"url": "http://127.0.0.1/h", "fall": 2, "rise": 1}},
        policy={"on_haproxy_restart": "restart", "keepalived_start_delay": 0},
    ),
    config(
        policy={"keepalived_start_delay": 0, "start_confirm": 1.0},
        haproxy={"backoff": {"max_attempts": 2, "giveup_retry": 20}},
        keepalived={"backoff": {"max_attempts": 2, "giveup_retry": 20}},
        sync={"timeout": 1.0, "reload_confirm": 1.0},
    ),
]


def running(**kw: object) -> State:
    base = State(
        haproxy=ServiceState(proc=proc(4711)),
        keepalived=ServiceState(proc=proc(99, name="keepalived")),
        primed=True,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The oracle: what the README promises, tracked from the events alone


@dataclass
class Issued:
    action: Action
    at: float
    answered: bool = False
    expired: bool = False

    def live(self, now: float) -> bool:
        """Issued, not answered, and not yet past its deadline."""
        return not self.answered and now < self.at + self.action.deadline


@dataclass
class Oracle:
    cfg: Config
    ha: ProcId | None = None
    ka: ProcId | None = None
    paused: bool = False
    health: Health = Health.UNKNOWN
    streak: int = 0
    issued: list[Issued] = field(default_factory=list)
    # A haproxy start that succeeded while no haproxy was seen: its process may still show up.
    start_ok_at: float | None = None
    ka_stop_failed_at: float | None = None
    next_pid: int = 1000

    def new_proc(self, service: Service, now: float) -> ProcId:
        self.next_pid += 1
        return ProcId(self.next_pid, 100_000 + self.next_pid, service.value, now)

    def live(self, service: Service, now: float) -> list[Issued]:
        return [i for i in self.issued if i.action.service is service and i.live(now)]

    def serving(self) -> bool:
        return self.ha is not None and self.health is not Health.DOWN

    def probe(self, ok: bool) -> None:
        """README: `fall` failures in a row mark haproxy down, `rise` successes up; in between
        the last verdict stands; a new master starts unknown."""
        probe = self.cfg.haproxy.health
        if probe is None or self.ha is None:
            return
        self.streak = max(self.streak, 0) + 1 if ok else min(self.streak, 0) - 1
        if self.streak >= probe.rise:
            self.health = Health.UP
        elif -self.streak >= probe.fall:
            self.health = Health.DOWN

    def haproxy_changed(self) -> None:
        self.health, self.streak, self.start_ok_at = Health.UNKNOWN, 0, None

    def confirming(self, now: float) -> bool:
        return (
            self.ha is None
            and self.start_ok_at is not None
            and now < self.start_ok_at + self.cfg.policy.start_confirm
        )


CHANGE = st.sampled_from(["none", "none", "down", "up"])
STEP = st.one_of(
    st.tuples(st.just("obs"), CHANGE, CHANGE),
    st.tuples(st.just("probe"), st.booleans(), st.booleans()),
    st.tuples(st.just("pause"), st.booleans(), st.just(False)),
    st.tuples(st.just("sync"), st.sampled_from(["startup", "local", "staged", "now"]), st.just(0)),
    st.tuples(st.just("result"), st.sampled_from(list(Outcome)), st.integers(0, 7)),
    st.tuples(st.just("tick"), st.just(0), st.just(0)),
)
DT = st.one_of(st.floats(0, 3), st.sampled_from([5.0, 25.0, 45.0, 60.0, 400.0]))


def _observe(oracle: Oracle, ha_change: str, ka_change: str, now: float) -> Observation | None:
    """One scan as the watchers would report it: a replaced main process is a down and an up
    in the same observation."""
    changes: list[ProcessDown | ProcessUp] = []
    for service, change in ((HA, ha_change), (KA, ka_change)):
        old = oracle.ha if service is HA else oracle.ka
        new = old
        if change == "down" and old is not None:
            changes.append(ProcessDown(service, old, "scan"))
            new = None
        elif change == "up":
            if old is not None:
                changes.append(ProcessDown(service, old, "scan"))
            new = oracle.new_proc(service, now)
            changes.append(ProcessUp(service, new, previous=old))
        if service is HA:
            if new is not old:
                oracle.haproxy_changed()
            oracle.ha = new
        else:
            if new is None and old is not None:
                oracle.ka_stop_failed_at = None
            oracle.ka = new
    return Observation(tuple(changes)) if changes else None


def _event(
    oracle: Oracle, step: tuple, now: float, late_results: bool
) -> tuple[Event | None, Issued | None]:
    """The event a step stands for, with the oracle told what the test itself did."""
    kind, a, b = step
    if kind == "obs":
        return _observe(oracle, a, b, now), None
    if kind == "probe":
        if not b:
            oracle.probe(a)
        return ProbeResult(a, "probe", internal=b), None
    if kind == "pause":
        oracle.paused = a
        return PauseChanged(a), None
    if kind == "sync":
        return SyncWanted(SyncJob(a, LIVE, seen_ns=int(now * 1e9) if a == "local" else 0)), None
    if kind == "result":
        # An executor answers one of the actions it was given; without late_results only those
        # still inside their deadline (an executor that respects it).
        open_ = [i for i in oracle.issued if not i.answered and (late_results or i.live(now))]
        if not open_:
            return None, None
        answered = open_[b % len(open_)]
        return ActionResult(answered.action, a, "detail", 0.1), answered
    return Tick(), None


def _advance(oracle: Oracle, now: float, answered: Issued | None, outcome: object) -> None:
    """Deadlines first, as the policy does (an action unanswered at its deadline failed; for a
    keepalived stop the SIGTERM fallback becomes due), then the answer, if it came in time."""
    stops = (Verb.STOP, Verb.TERMINATE)
    for i in oracle.issued:
        if not i.answered and not i.expired and now >= i.at + i.action.deadline:
            i.expired = True
            if i.action.service is KA and i.action.verb in stops:
                oracle.ka_stop_failed_at = now
    if answered is None:
        return
    answered.answered = True
    act = answered.action
    if answered.expired:
        return
    ok = outcome is Outcome.OK
    if act.service is HA and act.verb is Verb.START and ok and oracle.ha is None:
        oracle.start_ok_at = now
    if act.service is KA and act.verb in stops:
        oracle.ka_stop_failed_at = None if ok else now


def _check_action(oracle: Oracle, action: Action, now: float) -> None:
    cfg = oracle.cfg
    # Every action says why.
    assert action.cause and action.doing
    # Nothing is done while paused.
    assert not oracle.paused, (action, "issued while paused")
    # At most one action per service: none while another is still live.
    assert oracle.live(action.service, now) == [], (action, "beside a live action")
    if action.service is KA and action.verb in (Verb.START, Verb.RESTART):
        # keepalived never started while haproxy is down or failing its probe ...
        assert oracle.serving(), (action, "keepalived started, haproxy not serving")
    if action.service is KA and action.verb is Verb.START:
        # ... nor before it is up (and healthy, when probed) for the start delay.
        assert oracle.ha is not None
        assert now >= oracle.ha.started + cfg.policy.keepalived_start_delay
        assert cfg.haproxy.health is None or oracle.health is Health.UP
    if action.verb is Verb.SYNC:
        # Config sync never beside a haproxy start, nor while its process is awaited.
        live_starts = [i for i in oracle.live(HA, now) if i.action.verb is Verb.START]
        assert live_starts == [], "SYNC beside a start of haproxy"
        assert not oracle.confirming(now), "SYNC while a started haproxy is awaited"


def _check_state(oracle: Oracle, before: State, d: Decision, now: float) -> None:
    for service in (HA, KA):
        # The policy's slot is taken exactly while the oracle knows an action to be live, and
        # by that very action.
        live = oracle.live(service, now)
        inflight = d.state.svc(service).inflight
        assert (inflight is not None) == bool(live), (
            service,
            "policy slot disagrees with what is live",
            inflight,
            live,
            "before:",
            before.svc(service).inflight,
        )
        if live:
            assert inflight is live[-1].action
    if oracle.ka is not None and not oracle.serving() and not oracle.paused:
        # keepalived running while haproxy is not serving: it is being stopped, or a stop
        # failed and the SIGTERM fallback is due within stop_retry (and woken for).
        failed = oracle.ka_stop_failed_at
        assert oracle.live(KA, now) or (
            failed is not None
            and d.wake_at is not None
            and d.wake_at <= failed + oracle.cfg.policy.stop_retry
        ), "keepalived left running while haproxy is not serving"
    if d.wake_at is not None:
        assert d.wake_at > now


def _run(steps: list, cfg_index: int, late_results: bool) -> None:
    cfg = CFGS[cfg_index]
    oracle = Oracle(cfg)
    state, now = State(primed=True), 0.0
    for step, dt in steps:
        now += dt
        event, answered = _event(oracle, step, now, late_results)
        if event is None:
            continue
        _advance(oracle, now, answered, step[1])
        d = decide(state, event, now, cfg)
        for action in d.actions:
            _check_action(oracle, action, now)
            oracle.issued.append(Issued(action, now))
        _check_state(oracle, state, d, now)
        state = d.state


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(STEP, DT), max_size=50), st.sampled_from(range(len(CFGS))))
def test_policy_keeps_its_promises_when_executors_keep_their_deadlines(
    steps: list, cfg_index: int
) -> None:
    """Over any sequence of observations (a replaced process seen in one scan included),
    probes (internal errors included), pauses, sync requests, on-time results and deadlines:
    keepalived is never started unless haproxy serves (up, healthy, settled), at most one
    action per service is live and the policy's slot agrees with it, nothing is done while
    paused, a SYNC never runs beside or just after a start of haproxy, and keepalived is never
    left running while haproxy does not serve."""
    _run(steps, cfg_index, late_results=False)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(STEP, DT), max_size=50), st.sampled_from(range(len(CFGS))))
@example(
    # A staged sync job outlives its deadline, the same job is wanted again (the staged file
    # is still there), and the first job's answer finally comes.
    [
        (("sync", "staged", 0), 0.0),
        (("tick", 0, 0), 60.0),
        (("sync", "staged", 0), 1.0),
        (("result", Outcome.OK, 0), 1.0),
    ],
    0,
)
def test_late_results_never_free_a_slot_taken_by_another_action(
    steps: list, cfg_index: int
) -> None:
    """The same properties when executors may also answer after their action's deadline (a
    slow job, a hung thread that wakes up): a late answer is ignored ("a late answer is
    ignored", policy._expire), so it never frees the slot of the action issued after it."""
    _run(steps, cfg_index, late_results=True)


# ---------------------------------------------------------------------------------------------
# The sequence the property above found, spelled out


def test_late_result_of_an_expired_sync_is_not_the_result_of_the_next_one() -> None:
    """A staged sync job passes its deadline and the same job is queued again (the staged file
    is still in staging, so every rescan wants it): the second, identical SYNC action is
    issued. When the first job's answer finally arrives, it must not count as the second's:
    the second still runs, so haproxy's slot must stay taken (and a haproxy start must not be
    issued beside it)."""
    cfg = CFGS[0]
    d = decide(running(), SyncWanted(STAGED), 0.0, cfg)
    (first,) = d.actions
    d = decide(d.state, Tick(), first.deadline, cfg)
    assert [r.action for r in d.expired] == [first]
    d = decide(d.state, SyncWanted(STAGED), first.deadline + 1, cfg)
    (second,) = d.actions
    assert second.verb is Verb.SYNC and d.state.haproxy.inflight is second
    # The first job's answer, late: only the first job is done.
    d = decide(d.state, ActionResult(first, Outcome.OK, "applied", 51.0), first.deadline + 2, cfg)
    assert d.state.haproxy.inflight is second, "the late answer freed the running job's slot"
    # The consequence: haproxy dies while the second job runs; a start must wait for it.
    master = d.state.haproxy.proc
    assert master is not None
    d = decide(d.state, ProcessDown(HA, master, "pidfd"), first.deadline + 3, cfg)
    assert ("haproxy", "start") not in [(a.service.value, a.verb.value) for a in d.actions]


def test_a_persistent_probe_fault_is_logged_once() -> None:
    """One log line per cause: a prober that cannot run (the same internal error on every
    probe, every `interval`) is said once, not once per probe for as long as it lasts."""
    cfg = CFGS[1]
    state = running(health=Health.UP, probe_streak=3)
    errors = []
    for i in range(5):
        d = decide(
            state, ProbeResult(False, "OSError: [Errno 24] Too many open files", True), i, cfg
        )
        state = d.state
        errors += [n.text for n in d.notes if n.level >= logging.ERROR]
    assert len(errors) == 1, errors


def test_the_startup_job_queued_before_priming_runs_first_then_later_jobs_in_order() -> None:
    """Config sync wants its start-up reconcile before the first scan is folded in: nothing
    runs before priming, the start-up job runs first once primed, a local edit wanted
    meanwhile runs after it, and a second start-up request (a SIGHUP that restarted sync)
    coalesces with the first instead of running twice."""
    cfg = CFGS[0]
    startup, local = SyncJob("startup", LIVE), SyncJob("local", LIVE, seen_ns=7)
    d = decide(State(), SyncWanted(startup), 0.0, cfg)
    d = decide(d.state, SyncWanted(local), 0.1, cfg)
    d = decide(d.state, SyncWanted(startup), 0.2, cfg)
    assert d.actions == () and d.state.sync_queue == (startup, local)
    d = decide(replace(d.state, haproxy=ServiceState(proc=proc(1))), Primed(), 0.3, cfg)
    (first,) = [a for a in d.actions if a.verb is Verb.SYNC]
    assert first.job == startup
    d = decide(d.state, ActionResult(first, Outcome.OK, "unchanged", 0.1), 0.4, cfg)
    (second,) = [a for a in d.actions if a.verb is Verb.SYNC]
    assert second.job == local and d.state.sync_queue == ()


def test_a_start_that_started_nothing_is_a_warning_once_while_paused() -> None:
    """A start of haproxy said success, nothing showed up within start_confirm, and then the
    operator paused lbwatch: the warning is said once, not again with every event that
    arrives while paused (a tick, a keepalived exit, a sync request)."""
    cfg = config(policy={"start_confirm": 1.0})
    d = decide(State(primed=True), Tick(), 0.0, cfg)
    start = d.state.haproxy.inflight
    assert start is not None and start.verb is Verb.START
    d = decide(d.state, ActionResult(start, Outcome.OK, "exit 0", 0.1), 0.1, cfg)
    d = decide(d.state, PauseChanged(True), 0.2, cfg)
    ka = proc(9, name="keepalived")
    events: list[Event] = [
        Tick(),
        Observation((ProcessUp(KA, ka, None),)),
        SyncWanted(STAGED),
        Observation((ProcessDown(KA, ka, "scan"),)),
    ]
    warnings = []
    for t, event in enumerate(events, start=2):
        d = decide(d.state, event, float(t), cfg)
        warnings += [n.text for n in d.notes if "exited 0 but no haproxy process" in n.text]
    assert len(warnings) == 1, warnings
