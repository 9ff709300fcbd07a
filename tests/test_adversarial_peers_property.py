"""The policy with its peers, drained and tracked, over random interleavings: haproxy deaths
and heals, probes, the peer's views (answered now or long ago, silent, unwatched), this node's
VRRP state, the drain flag, the track files as read, action results (ok, failed, never) and
time passing. Each decision is held against an oracle written here from the README's words,
using none of the policy's helpers:

1. Never to nobody: keepalived is not stopped while this node holds an instance and the peer
   link proves that no peer can take it (every configured peer answered within 3 s through its
   agent, and each cannot: haproxy not serving, keepalived stopped, paused, or the instance in
   FAULT/STOP or missing there while it reports its VRRP state).
2. Never a needless black hole: keepalived left running beside a haproxy that cannot serve,
   with its slot free and no stop failure being retried, only with that proof at hand; and a
   keep (``VIP KEPT``) only with it.
3. No early start on a guess: keepalived is started before ``keepalived_start_delay`` (or
   before ``rise`` probes) only when the peer link proves that no node holds the instance:
   every peer current and reporting, each one's keepalived stopped or its copy of the
   instance in a state keepalived reported other than MASTER, its VIP not there.
4. No hot loop: the same TRACK is not issued twice unless something it depends on was seen
   in between (the flag, the files, this node's instances, the pause) or 30 s have passed; a
   TRACK whose slot a stop of keepalived took before its result came counts as unanswered.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbwatch.events import (
    Action,
    ActionResult,
    Drain,
    DrainChanged,
    Event,
    Group,
    Health,
    InstanceFacts,
    Outcome,
    PauseChanged,
    PeerFacts,
    PeersSeen,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    Tick,
    TrackSeen,
    Verb,
    VrrpSeen,
)
from lbwatch.policy import Decision, State, decide
from tests.fakes import config

HA, KA = Service.HAPROXY, Service.KEEPALIVED
DELAY, RISE, FALL = 2.0, 2, 2
CFG = config(
    haproxy={"health": {"url": "http://127.0.0.1/h", "fall": FALL, "rise": RISE}},
    policy={"keepalived_start_delay": DELAY, "kept_alert_after": 10.0},
)
CURRENT = 3.0  # seconds a peer's answer counts, as the README says
RETRY = 30.0  # seconds before a failed TRACK is written again
VIP = frozenset({"192.0.2.100"})
OTHER_VIP = frozenset({"192.0.2.200"})
STATES = ["MASTER", "BACKUP", "FAULT", "STOP", "unknown"]

# -- the steps --------------------------------------------------------------------------------

PEER_INSTANCE = st.one_of(
    st.builds(
        InstanceFacts,
        st.just("VI_1"),
        st.sampled_from(STATES),
        st.sampled_from([VIP, OTHER_VIP, frozenset()]),
        st.booleans(),
    ),
    st.builds(InstanceFacts, st.just("web"), st.sampled_from(STATES), st.just(VIP), st.booleans()),
)
PEER_VIEW = st.tuples(
    st.sampled_from([0.0, 0.5, 2.9, 3.1, 10.0]),  # how long ago it answered
    st.booleans(),  # serving
    st.booleans(),  # keepalived
    st.booleans(),  # paused
    st.lists(PEER_INSTANCE, max_size=2).map(tuple),
    st.sampled_from([frozenset(), frozenset({"VI_1"}), frozenset({"web"})]),  # drained
)
STEP = st.one_of(
    st.just(("ha_dies",)),
    st.just(("ka_dies",)),
    st.tuples(st.just("probe"), st.booleans()),
    st.tuples(st.just("peer"), PEER_VIEW),
    st.tuples(st.just("peers"), st.sampled_from(["silent", "unwatched"])),
    st.tuples(st.just("vrrp"), st.sampled_from(STATES), st.booleans()),
    st.tuples(st.just("drain"), st.sampled_from([None, Drain(), Drain(frozenset({"VI_1"}))])),
    st.tuples(st.just("files"), st.sampled_from([None, 0, -253, 7])),
    st.tuples(st.just("pause"), st.booleans()),
    st.tuples(st.just("done"), st.sampled_from([Outcome.OK, Outcome.FAILED])),
    st.just(("tick",)),
)
DT = st.sampled_from([0.0, 0.01, 0.3, 1.0, 3.5, 31.0])


# -- the oracle -------------------------------------------------------------------------------


def same_instance(theirs: InstanceFacts, mine: InstanceFacts) -> bool:
    """One VRRP instance on two nodes: a VIP in common, or one name and one side without VIPs."""
    if theirs.vips & mine.vips:
        return True
    return theirs.name == mine.name and not (theirs.vips and mine.vips)


def holds(inst: InstanceFacts) -> bool:
    return inst.held or inst.state == "MASTER"


def copy_of(p: PeerFacts, mine: InstanceFacts) -> Optional[InstanceFacts]:
    copies = [t for t in p.instances if same_instance(t, mine)]
    named = [t for t in copies if t.name == mine.name]
    return (named or copies or [None])[0]


def everyone_current(group: Optional[Group], now: float) -> bool:
    return (
        group is not None
        and not group.silent
        and bool(group.peers)
        and all(now - p.answered <= CURRENT for p in group.peers)
    )


def proven_nobody_can_take(state: State, now: float) -> bool:
    """Some instance held here has no peer that could take it, and every peer says so now."""
    group = state.group
    if not everyone_current(group, now):
        return False
    assert group is not None
    for mine in state.vrrp:
        if not holds(mine):
            continue
        if all(cannot_take(p, mine) for p in group.peers):
            return True
    return False


def cannot_take(p: PeerFacts, mine: InstanceFacts) -> bool:
    if not p.serving or not p.keepalived or p.paused:
        return True
    if not p.instances:
        return False  # says nothing of its VRRP state: it may
    theirs = copy_of(p, mine)
    return theirs is None or theirs.state in ("FAULT", "STOP")


def proven_nobody_holds(state: State, now: float) -> bool:
    """Some instance of this node's, held neither here nor (as each peer says) there."""
    group = state.group
    if not everyone_current(group, now):
        return False
    assert group is not None
    if any(not p.instances for p in group.peers):
        return False
    for mine in state.vrrp:
        if holds(mine):
            continue
        if all(
            not (same_instance(t, mine) and (holds(t) or (p.keepalived and t.state == "unknown")))
            for p in group.peers
            for t in p.instances
        ):
            return True
    return False


@dataclass
class World:
    now: float = 100.0
    next_pid: int = 5000
    ha: Optional[ProcId] = None
    ka: Optional[ProcId] = None
    pending: list[Action] = field(default_factory=list)
    passes: int = 0  # passing probes in a row of the current master
    fails: int = 0  # failing probes in a row
    healthy: bool = False  # rise passes in a row since it started or last failed fall times
    # the last TRACK issued, when, and whether a dependency was seen since
    last_track: Optional[tuple[tuple[tuple[str, int], ...], float]] = None
    seen_since_track: bool = False

    def new_proc(self, name: str) -> ProcId:
        self.next_pid += 1
        return ProcId(self.next_pid, 10_000 + self.next_pid, name, self.now)


def check(world: World, before: State, d: Decision) -> None:
    state, now = d.state, world.now
    abandoned = before.keepalived.inflight
    if (
        abandoned is not None
        and abandoned.verb is Verb.TRACK
        and any(a.service is KA for a in d.actions)
    ):
        world.last_track = None  # its slot taken by a stop: written again once, not a loop
    for action in d.actions:
        if action.service is KA and action.verb in (Verb.STOP, Verb.TERMINATE):
            assert not proven_nobody_can_take(state, now), ("1: let go to nobody", action.reason)
        if action.service is KA and action.verb is Verb.START:
            master = state.haproxy.proc
            early = master is None or now < master.started + DELAY or not world.healthy
            if early:
                assert proven_nobody_holds(state, now), ("3: early start", action.reason)
        if action.verb is Verb.TRACK:
            if world.last_track is not None and world.last_track[0] == action.track:
                waited = now - world.last_track[1]
                assert world.seen_since_track or waited >= RETRY, ("4: hot loop", waited)
            world.last_track = (action.track, now)
            world.seen_since_track = False
    ka = state.keepalived
    if state.paused or ka.inflight is not None or ka.stop_failed_at is not None:
        return
    black_hole = ka.proc is not None and (state.haproxy.proc is None or state.health is Health.DOWN)
    if black_hole:
        assert proven_nobody_can_take(state, now), "2: kept without proof"
    if state.kept is not None:
        assert black_hole and proven_nobody_can_take(state, now), "2: VIP KEPT without proof"


# -- the run ----------------------------------------------------------------------------------


def feed(world: World, state: State, event: Event) -> State:
    d = decide(state, event, world.now, CFG)
    check(world, state, d)
    world.pending += d.actions
    return d.state


def outcome_events(world: World, action: Action, outcome: Outcome) -> list[Event]:
    """What the world shows when ``action`` ends: its result, and the processes it changed."""
    done: Event = ActionResult(action, outcome, "scripted", 0.01)
    if outcome is not Outcome.OK:
        return [done]
    if action.verb is Verb.START and action.service is HA and world.ha is None:
        world.ha, world.passes, world.fails, world.healthy = world.new_proc("haproxy"), 0, 0, False
        return [done, ProcessUp(HA, world.ha, None)]
    if action.verb is Verb.START and action.service is KA and world.ka is None:
        world.ka = world.new_proc("keepalived")
        return [done, ProcessUp(KA, world.ka, None)]
    if action.verb in (Verb.STOP, Verb.TERMINATE) and world.ka is not None:
        gone, world.ka = world.ka, None
        return [ProcessDown(KA, gone, "pidfd"), done]
    return [done]


def step_events(world: World, step: tuple[object, ...]) -> list[Event]:  # noqa: C901 - one branch per kind of step, a table
    kind = step[0]
    if kind == "ha_dies" and world.ha is not None:
        gone, world.ha = world.ha, None
        return [ProcessDown(HA, gone, "pidfd")]
    if kind == "ka_dies" and world.ka is not None:
        gone, world.ka = world.ka, None
        return [ProcessDown(KA, gone, "pidfd")]
    if kind == "probe" and world.ha is not None:
        ok = bool(step[1])
        world.passes, world.fails = (world.passes + 1, 0) if ok else (0, world.fails + 1)
        if world.passes >= RISE:
            world.healthy = True
        if world.fails >= FALL:
            world.healthy = False
        return [ProbeResult(ok, "200" if ok else "timeout", master=world.ha)]
    if kind == "peer":
        age, serving, keepalived, paused, instances, drained = step[1]  # type: ignore[misc]
        p = PeerFacts("lb2", world.now - age, serving, keepalived, paused, instances, drained)
        return [PeersSeen(Group((p,)))]
    if kind == "peers":
        return [PeersSeen(Group((), ("lb2",)) if step[1] == "silent" else None)]
    if kind == "vrrp":
        world.seen_since_track = True
        return [VrrpSeen((InstanceFacts("VI_1", str(step[1]), VIP, bool(step[2])),))]
    if kind == "drain":
        world.seen_since_track = True
        return [DrainChanged(step[1])]  # type: ignore[arg-type]
    if kind == "files":
        world.seen_since_track = True
        return [TrackSeen((("VI_1", step[1]),))]  # type: ignore[arg-type]
    if kind == "pause":
        world.seen_since_track = True
        return [PauseChanged(bool(step[1]))]
    if kind == "done" and world.pending:
        return outcome_events(world, world.pending.pop(0), step[1])  # type: ignore[arg-type]
    return [Tick()]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(STEP, DT), min_size=1, max_size=60))
def test_the_peers_and_the_drain_keep_the_promises(
    steps: list[tuple[tuple[object], float]],
) -> None:
    """Over any interleaving, the four promises in this module's docstring hold at every
    decision."""
    world = World()
    world.ha, world.ka = world.new_proc("haproxy"), world.new_proc("keepalived")
    world.passes, world.healthy = RISE, True
    state = State(
        primed=True,
        health=Health.UP,
        vrrp=(InstanceFacts("VI_1", "MASTER", VIP, held=True),),
        track=(("VI_1", None),),
    )
    state = replace(
        state,
        haproxy=replace(state.haproxy, proc=world.ha),
        keepalived=replace(state.keepalived, proc=world.ka),
    )
    for step, dt in steps:
        world.now += dt
        # Results that never came: the policy fails them by their deadline, on a tick.
        world.pending = [a for a in world.pending if state.svc(a.service).inflight == a]
        for event in step_events(world, step):
            state = feed(world, state, event)
