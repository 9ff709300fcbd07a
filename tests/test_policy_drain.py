"""The drain through the policy: the flag becomes a TRACK action on keepalived's slot that
writes the track files until they say what the drain asks; keepalived and haproxy are never
stopped for it. Tables of (state, event) -> actions."""

from __future__ import annotations

from dataclasses import replace

from lbwatch import trackfile
from lbwatch.events import (
    Action,
    Drain,
    DrainChanged,
    InstanceFacts,
    PauseChanged,
    Service,
    Tick,
    TrackSeen,
    Verb,
)
from lbwatch.policy import ServiceState, State, decide, summary
from tests.fakes import config, proc
from tests.test_policy import result, verbs

CFG = config()
MASTER, KEEPALIVED = proc(4711), proc(99, name="keepalived")
T = 50.0
VI_1 = InstanceFacts("VI_1", "MASTER", frozenset({"192.0.2.100"}), held=True)
VI_2 = InstanceFacts("VI_2", "BACKUP", frozenset({"192.0.2.101"}))


def up(**kw: object) -> State:
    base = State(
        haproxy=ServiceState(proc=MASTER),
        keepalived=ServiceState(proc=KEEPALIVED),
        primed=True,
        vrrp=(VI_1, VI_2),
        track=(("VI_1", None), ("VI_2", 0)),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_a_drain_of_every_instance_lowers_both_and_stops_nothing() -> None:
    """The flag with no instance named: one TRACK of both to DRAINED, mailed; no stop."""
    d = decide(up(), DrainChanged(Drain(reason="patching", by="ops")), T, CFG)
    assert verbs(d) == [("keepalived", "track")]
    (action,) = d.actions
    assert action.track == (("VI_1", trackfile.DRAINED), ("VI_2", trackfile.DRAINED))
    assert action.alert == "drained"
    assert action.cause == "drain requested by ops: patching"
    assert "keepalived and haproxy keep running" in action.doing
    assert "DRAINED" in summary(d.state, CFG)


def test_a_drain_of_one_instance_touches_only_it() -> None:
    """`lbwatch drain VI_2`: VI_2 alone."""
    d = decide(up(), DrainChanged(Drain(frozenset({"VI_2"}))), T, CFG)
    assert d.actions[0].track == (("VI_2", trackfile.DRAINED),)


def test_the_track_files_saying_it_end_the_writing() -> None:
    """Once the files read DRAINED nothing more is written; a file changed behind lbwatch's
    back (an operator, a restore) is written again."""
    d = decide(up(), DrainChanged(Drain()), T, CFG)
    d = decide(d.state, result(d.actions[0]), T + 0.01, CFG)
    drained = (("VI_1", trackfile.DRAINED), ("VI_2", trackfile.DRAINED))
    d = decide(d.state, TrackSeen(drained), T + 0.02, CFG)
    assert verbs(d) == []
    d = decide(d.state, TrackSeen((("VI_1", 0), ("VI_2", trackfile.DRAINED))), T + 1, CFG)
    assert [a.track for a in d.actions] == [(("VI_1", trackfile.DRAINED),)]


def test_undrain_restores_what_was_lowered() -> None:
    """The flag gone: the files back to OK, mailed as undrained."""
    drained = (("VI_1", trackfile.DRAINED), ("VI_2", trackfile.DRAINED))
    state = up(drain=Drain(), track=drained)
    d = decide(state, DrainChanged(None), T, CFG)
    (action,) = d.actions
    assert action.verb is Verb.TRACK and action.alert == "undrained"
    assert action.track == (("VI_1", trackfile.OK), ("VI_2", trackfile.OK))
    assert action.cause == "drain ended"


def test_a_missing_file_reads_as_ok() -> None:
    """No file (keepalived reads 0): nothing to write without a drain."""
    d = decide(up(track=(("VI_1", None), ("VI_2", None))), Tick(), T, CFG)
    assert verbs(d) == []


def test_the_drain_waits_for_keepaliveds_slot_and_for_the_pause() -> None:
    """A start of keepalived in flight first; while paused, only said."""
    starting = Action(Service.KEEPALIVED, Verb.START, "c", "d", seq=7)
    busy = up(keepalived=ServiceState(inflight=starting, inflight_since=T))
    d = decide(busy, DrainChanged(Drain()), T + 0.1, CFG)
    assert verbs(d) == []
    d = decide(d.state, result(starting), T + 0.2, CFG)
    assert ("keepalived", "track") in verbs(d)
    paused = up(paused=True)
    d = decide(paused, DrainChanged(Drain()), T, CFG)
    assert verbs(d) == [] and any("paused: would track keepalived" in n.text for n in d.notes)
    d = decide(d.state, PauseChanged(False), T + 1, CFG)
    assert verbs(d) == [("keepalived", "track")]
