"""The agent in this process with the real track-file writer: the drain flag in the state
directory becomes keepalived's track file, and the status says so; the flag found at start-up
(a drain kept across a restart) is applied too, and undrain puts the file back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lbwatch import drain, policy, trackfile
from lbwatch.config import Config
from lbwatch.events import Action, ActionResult, Verb
from lbwatch.services import write_track
from lbwatch.status import read_status
from tests.fakes import FakeController
from tests.test_agent_faults import fake_haproxy, in_process_agent

__all__ = ["fake_haproxy"]  # the fixture, used here by name


class TrackingController(FakeController):
    """Scripted, except that a TRACK writes the files as the real controller does."""

    def __init__(self, track_dir: Path) -> None:
        super().__init__()
        self.track_dir = track_dir

    def execute(self, action: Action) -> ActionResult:
        if action.verb is Verb.TRACK:
            self.executed.append(action)
            return write_track(action, self.track_dir)
        return super().execute(action)


def with_vi_1(cfg: Config) -> Config:
    """``cfg`` naming VRRP instance VI_1, as lbwatch.toml's [[vrrp_instances]] would."""
    return Config.model_validate(
        {**cfg.model_dump(), "vrrp_instances": [{"name": "VI_1", "vips": ["192.0.2.100"]}]}
    )


def turn_until(agent: object, done: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        agent._once()  # type: ignore[attr-defined]
    assert done()


def value(track: Path) -> int | None:
    return dict(trackfile.read(track, ["VI_1"]))["VI_1"]


def test_the_drain_flag_becomes_the_track_file_and_back(tmp_path: Path, fake_haproxy: Path) -> None:
    """Flag set: the file reads -253 and the status says drained, applied; flag cleared: 0."""
    track = tmp_path / "track"
    controller = TrackingController(track)
    agent = in_process_agent(tmp_path, fake_haproxy, controller, track_dir=str(track))
    agent.cfg = with_vi_1(agent.cfg)
    try:
        agent.state_dir.watch(agent.cfg.agent.state_dir)
        agent._scan("start-up")
        agent._feed(policy.Primed())
        assert value(track) is None  # nothing written without a drain
        drain.write(agent.cfg.agent.state_dir, [], "test")
        turn_until(agent, lambda: value(track) == trackfile.DRAINED)
        run_dir = agent.cfg.agent.run_dir

        def shown() -> bool:
            agent._publish()
            doc = read_status(run_dir).data
            return doc is not None and doc.drain is not None and doc.drain.applied == ["VI_1"]

        turn_until(agent, shown)
        doc = read_status(run_dir).data
        assert doc is not None and "DRAINED" in doc.summary and doc.track == {"VI_1": -253}
        drain.clear(agent.cfg.agent.state_dir)
        turn_until(agent, lambda: value(track) == trackfile.OK)
        tracks = [a for a in controller.executed if a.verb is Verb.TRACK]
        assert [a.alert for a in tracks] == ["drained", "undrained"]  # one write each way
    finally:
        agent._shutdown()


def test_a_drain_found_at_start_up_is_applied(tmp_path: Path, fake_haproxy: Path) -> None:
    """The flag was there before the agent started (a restart, a reboot): applied at once."""
    track = tmp_path / "track"
    controller = TrackingController(track)
    agent = in_process_agent(tmp_path, fake_haproxy, controller, track_dir=str(track))
    agent.cfg = with_vi_1(agent.cfg)
    (tmp_path / "state").mkdir(exist_ok=True)
    drain.write(tmp_path / "state", ["VI_1"], "kept")
    try:
        agent._scan("start-up")
        agent._feed(policy.Primed())
        turn_until(agent, lambda: value(track) == trackfile.DRAINED)
    finally:
        agent._shutdown()
