"""Adversarial tests of the drain: the TRACK action when the track files cannot be written, and
the flag and track files when they are damaged or are not files. Each attack follows the
allowed case it is measured against."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path

from lbwatch import drain, trackfile
from lbwatch.events import (
    Action,
    Drain,
    DrainChanged,
    InstanceFacts,
    Outcome,
    ProcessDown,
    Service,
    Tick,
    TrackSeen,
    Verb,
)
from lbwatch.policy import ServiceState, State, decide
from lbwatch.services import write_track
from lbwatch.statusdoc import DrainView
from tests.fakes import config, proc
from tests.test_policy import result, verbs

CFG = config()
MASTER, KEEPALIVED = proc(4711), proc(99, name="keepalived")
T = 50.0
VI_1 = InstanceFacts("VI_1", "MASTER", frozenset({"192.0.2.100"}), held=True)
VI_2 = InstanceFacts("VI_2", "BACKUP", frozenset({"192.0.2.101"}))
UNFIT = InstanceFacts("A/B", "BACKUP", frozenset({"192.0.2.102"}))  # keepalived allows "/"


def up(**kw: object) -> State:
    base = State(
        haproxy=ServiceState(proc=MASTER),
        keepalived=ServiceState(proc=KEEPALIVED),
        primed=True,
        vrrp=(VI_1, VI_2),
        track=(("VI_1", None), ("VI_2", None)),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def tracks(decision: object) -> list[Action]:
    return [a for a in decision.actions if a.verb is Verb.TRACK]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# A TRACK that fails is not re-issued in the same breath


def test_a_written_track_is_not_written_again() -> None:
    """The allowed case: the TRACK succeeds, and nothing more is written."""
    d = decide(up(), DrainChanged(Drain()), T, CFG)
    d = decide(d.state, result(d.actions[0]), T + 0.01, CFG)
    assert tracks(d) == []


def test_a_failed_track_waits_before_it_is_tried_again() -> None:
    """The track directory cannot be written (read-only, full, a file in its place): the
    failure is said, and the TRACK is tried again later, not at once in a loop that fills the
    journal and keeps keepalived's slot busy."""
    d = decide(up(), DrainChanged(Drain()), T, CFG)
    d = decide(d.state, result(d.actions[0], Outcome.FAILED), T + 0.01, CFG)
    assert tracks(d) == []
    assert d.wake_at is not None and d.wake_at > T + 1
    again = decide(d.state, Tick(), d.wake_at, CFG)
    assert len(tracks(again)) == 1


def test_a_timed_out_track_waits_too() -> None:
    """No result by the TRACK's deadline counts as a failure: the same wait."""
    d = decide(up(), DrainChanged(Drain()), T, CFG)
    (track,) = d.actions
    d = decide(d.state, Tick(), T + track.deadline + 0.1, CFG)
    assert tracks(d) == [] and d.expired


def test_a_failed_track_does_not_hold_back_a_stop() -> None:
    """While the TRACK waits to be tried again, keepalived's slot is free for a stop."""
    d = decide(up(), DrainChanged(Drain()), T, CFG)
    d = decide(d.state, result(d.actions[0], Outcome.FAILED), T + 0.01, CFG)
    d = decide(d.state, ProcessDown(Service.HAPROXY, MASTER, "pidfd"), T + 0.02, CFG)
    assert ("keepalived", "stop") in verbs(d)


def test_a_new_drain_is_written_at_once_after_a_failure() -> None:
    """An operator's new request (undrain) is not held back by an old failure's wait."""
    d = decide(up(), DrainChanged(Drain()), T, CFG)
    d = decide(d.state, result(d.actions[0], Outcome.FAILED), T + 0.01, CFG)
    d = decide(d.state, DrainChanged(Drain(frozenset({"VI_2"}))), T + 0.02, CFG)
    assert [a.track for a in tracks(d)] == [(("VI_2", trackfile.DRAINED),)]


def test_an_instance_whose_name_cannot_name_a_file_is_not_tracked() -> None:
    """An instance name with "/" has no track file (``trackfile.path``): the TRACK writes the
    others, and is never issued for it alone (it could only fail, forever)."""
    state = up(vrrp=(VI_1, UNFIT), track=(("A/B", None), ("VI_1", None)))
    d = decide(state, DrainChanged(Drain()), T, CFG)
    assert [a.track for a in tracks(d)] == [(("VI_1", trackfile.DRAINED),)]
    d = decide(d.state, result(d.actions[0]), T + 0.01, CFG)
    d = decide(d.state, TrackSeen((("A/B", None), ("VI_1", trackfile.DRAINED))), T + 1, CFG)
    assert tracks(d) == []


def test_write_track_writes_every_file_it_can(tmp_path: Path) -> None:
    """One file that cannot be written (a directory in its place) does not keep the others
    from being written; the result says which failed."""
    (tmp_path / "VI_1").mkdir()
    action = Action(
        Service.KEEPALIVED,
        Verb.TRACK,
        "c",
        "d",
        track=(("VI_1", trackfile.DRAINED), ("VI_2", trackfile.DRAINED)),
    )
    res = write_track(action, tmp_path)
    assert res.outcome is Outcome.FAILED and "VI_1" in res.detail
    assert (tmp_path / "VI_2").read_text() == f"{trackfile.DRAINED}\n"


# ---------------------------------------------------------------------------------------------
# A damaged flag drains everything, as drain.py promises; it never takes the agent down


def test_a_well_formed_flag_reads_as_written(tmp_path: Path) -> None:
    """The allowed case: what `lbwatch drain` wrote reads back."""
    drain.write(tmp_path, ["VI_1"], "patching")
    flag = drain.read(tmp_path)
    assert flag is not None and flag.instances == frozenset({"VI_1"})
    assert flag.reason == "patching"


def test_damaged_flags_drain_and_never_raise(tmp_path: Path) -> None:
    """A number too big for a float, nesting too deep for the parser, a since that is not a
    number a status document can carry: each reads as a drain (of every instance, or of those
    named when only since is damaged, which reads as 0), never as an exception out of the
    agent's scan (the start-up scan is not guarded: the agent would not start), and the
    status document that shows it can be read back."""
    huge = '{"instances": ["VI_1"], "since": ' + "9" * 400 + "}"
    deep = "[" * 100_000 + "]" * 100_000
    cases = [
        (huge, frozenset({"VI_1"})),
        (deep, frozenset()),
        ('{"since": NaN}', frozenset()),
        ('{"instances": ["VI_2"], "since": -Infinity}', frozenset({"VI_2"})),
        ("\x00" * 10, frozenset()),
    ]
    for text, instances in cases:
        (tmp_path / drain.FILE).write_text(text)
        flag = drain.read(tmp_path)
        assert flag == Drain(instances), text[:40]
        view = DrainView(since=flag.since)
        assert DrainView.model_validate_json(view.model_dump_json()) == view


def test_a_flag_that_is_not_a_file_does_not_hang_the_agent(tmp_path: Path) -> None:
    """A FIFO (or a device) where the flag should be: read without blocking, as a drain of
    every instance, within a moment."""
    os.mkfifo(tmp_path / drain.FILE)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(drain.read(tmp_path)), daemon=True)
    t.start()
    t.join(2.0)
    assert got == [Drain()]
    if t.is_alive():  # pragma: no cover - unblock the reader
        with open(tmp_path / drain.FILE, "wb"):
            pass


def test_a_huge_flag_is_not_read_whole(tmp_path: Path) -> None:
    """A flag grown huge (a log written into it by mistake) is read only up to a bound."""
    doc = {"instances": ["VI_1"], "reason": "x" * (2 << 20)}
    (tmp_path / drain.FILE).write_text(json.dumps(doc))
    assert drain.read(tmp_path) == Drain()


def test_a_track_file_that_is_not_a_file_does_not_hang_the_agent(tmp_path: Path) -> None:
    """The allowed case reads the number; a FIFO in its place reads as no number (None)
    without blocking the scan."""
    trackfile.write(tmp_path, "VI_1", trackfile.DRAINED)
    assert trackfile.read(tmp_path, ["VI_1"]) == (("VI_1", trackfile.DRAINED),)
    os.mkfifo(tmp_path / "VI_2")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(trackfile.read(tmp_path, ["VI_2"])), daemon=True)
    t.start()
    t.join(2.0)
    assert got == [(("VI_2", None),)]
    if t.is_alive():  # pragma: no cover - unblock the reader
        with open(tmp_path / "VI_2", "wb"):
            pass


# ---------------------------------------------------------------------------------------------
# A TRACK in flight does not hold back the stop that haproxy's death calls for


def test_a_track_in_flight_leaves_keepalived_alone_while_haproxy_serves() -> None:
    """The allowed case: the TRACK has keepalived's slot, and nothing else is asked."""
    d = decide(up(), DrainChanged(Drain()), T, CFG)
    d = decide(d.state, Tick(), T + 0.5, CFG)
    assert verbs(d) == []


def test_haproxy_dying_while_a_track_is_written_stops_keepalived_at_once() -> None:
    """haproxy dies while the track files are being written (an fsync on a busy disk, up to
    the TRACK's 5 s deadline): keepalived is stopped at once, as without a drain, not once the
    write has ended. The write's late result is then ignored; the next scan reads the files."""
    d = decide(up(), DrainChanged(Drain()), T, CFG)
    (track,) = d.actions
    d = decide(d.state, ProcessDown(Service.HAPROXY, MASTER, "pidfd"), T + 0.01, CFG)
    assert verbs(d) == [("keepalived", "stop"), ("haproxy", "start")]
    late = decide(d.state, result(track), T + 0.5, CFG)
    assert late.state.keepalived.inflight == d.actions[0]


def test_a_symlink_in_the_track_directory_is_replaced_not_followed(tmp_path: Path) -> None:
    """The allowed case writes VI_1's file; a symlink planted as VI_2's file (towards a file
    elsewhere) is replaced by the rename, and what it pointed at is left as it was."""
    track = tmp_path / "track"
    trackfile.write(track, "VI_1", trackfile.DRAINED)
    assert (track / "VI_1").read_text() == f"{trackfile.DRAINED}\n"
    victim = tmp_path / "victim"
    victim.write_text("root:x:0:0\n")
    (track / "VI_2").symlink_to(victim)
    assert trackfile.read(track, ["VI_2"]) == (("VI_2", None),)  # followed for reading only
    trackfile.write(track, "VI_2", trackfile.DRAINED)
    assert not (track / "VI_2").is_symlink()
    assert (track / "VI_2").read_text() == f"{trackfile.DRAINED}\n"
    assert victim.read_text() == "root:x:0:0\n"
