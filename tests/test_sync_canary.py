"""The canary of config sync (``push_after = "healthy"``): the pure decision of which probe results
count, as a table; then the real SyncService on the local disk, whose one peer is a directory
with a stand-in for the peer's lbwatch, fed probe results the way the agent feeds them."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.config import ConfigError, load
from lbwatch.events import Action, ProbeResult, Service, SyncJob, SyncKind, Verb
from lbwatch.loop import Selector
from lbwatch.statusdoc import HeldView
from lbwatch.sync import canary
from lbwatch.sync.canary import SETTLE, Gate, Step, judge
from lbwatch.sync.peers import PeerLink
from lbwatch.sync.service import SyncService
from lbwatch.sync.transport import Peer
from lbwatch.sync.versions import Version
from tests.conftest import needs
from tests.fakes import FakeCarrier, config, proc
from tests.test_agent import Rig
from tests.test_sync_peers import Peerside
from tests.util import wait_for

V2 = Version("haproxy.cfg", "lb1", 2, 2, "2" * 64)
OPENS = 10.0 + SETTLE


def probe(ok: bool, started: float, internal: bool = False, pid: int = 7) -> ProbeResult:
    detail = "GET http://127.0.0.1:8404/health: " + ("HTTP 200" if ok else "connection failed")
    return ProbeResult(ok, detail, internal=internal, master=proc(pid), started=started)


def fold(probes: list[ProbeResult], rise: int = 2, fall: int = 2) -> tuple[Gate, list[Step]]:
    gate = canary.hold(V2, True, 10.0, 0.0)
    steps = []
    for p in probes:
        gate, step = judge(gate, p, rise, fall)
        steps.append(step)
    return gate, steps


P, F = True, False


@pytest.mark.parametrize(
    ("probes", "steps", "passes"),
    [
        # rise passes in a row release the version.
        ([probe(P, 11), probe(P, 12)], [Step.PASSED, Step.HEALTHY], 2),
        # A failure starts the count again: pass, fail, pass is 1 of 2, not 2 of 2.
        ([probe(P, 11), probe(F, 12), probe(P, 13)], [Step.PASSED, Step.FAILED, Step.PASSED], 1),
        # Started before the reload was confirmed (a probe of the old config still running),
        # or inside the settle time: never counted, however it ended.
        ([probe(P, 9.9), probe(P, 10.0), probe(P, OPENS - 0.001)], [Step.IGNORED] * 3, 0),
        # The same master before and after: a master-worker reload keeps its PID, so the pid
        # says nothing; only the start time counts.
        ([probe(P, 9.0, pid=7), probe(P, 11, pid=7)], [Step.IGNORED, Step.PASSED], 1),
        # A probe that could not run (an lbwatch fault) counts neither way.
        (
            [probe(P, 11), probe(F, 12, internal=True), probe(P, 13)],
            [Step.PASSED, Step.IGNORED, Step.HEALTHY],
            2,
        ),
    ],
)
def test_which_probes_count(probes: list[ProbeResult], steps: list[Step], passes: int) -> None:
    """Only probes started after the reload was confirmed (plus SETTLE) count toward rise, in a
    row; a failure resets the count; an internal fault and the master's pid count for nothing."""
    gate, got = fold(probes)
    assert got == steps
    assert gate.passes == passes


def test_fall_failures_are_told_once_and_a_later_pass_still_releases() -> None:
    """fall failures in a row are UNHEALTHY once per held version (the alert); further failures
    are plain FAILED; the version stays held and goes out once rise passes follow."""
    fails = [probe(F, 11 + i) for i in range(5)]
    gate, steps = fold([*fails, probe(P, 20), probe(P, 21)], rise=2, fall=2)
    assert steps == [Step.FAILED, Step.UNHEALTHY, *[Step.FAILED] * 3, Step.PASSED, Step.HEALTHY]
    assert gate.told and gate.failures == 0


def test_rise_one_releases_on_the_first_counted_pass() -> None:
    """With rise = 1 the first pass started after the gate opened is enough."""
    assert fold([probe(P, 10.0), probe(P, OPENS)], rise=1)[1] == [Step.IGNORED, Step.HEALTHY]


def test_the_canary_asks_for_a_probe_at_once_until_one_counted() -> None:
    """A probe is wanted when the gate opens, and asked for again while none has counted (one
    running when it opened does not count); after a counted one, the usual interval paces."""
    gate = canary.hold(V2, True, 10.0, 0.0)
    assert canary.probe_wanted(gate) == OPENS
    gate, _ = judge(gate, probe(P, 9.0), 2, 2)
    assert canary.probe_wanted(gate) == OPENS
    gate, _ = judge(gate, probe(F, 11.0), 2, 2)
    assert canary.probe_wanted(gate) is None


def test_status_line_says_waiting_then_failing() -> None:
    """`lbwatch status` shows the held version: waiting for health n/rise, and NOT PUSHED with
    the probe's own words once it fails."""
    gate, _ = fold([probe(P, 11)])
    line = canary.status_line(canary.status(gate, 2))
    assert (
        line
        == "    held      222222222222 not pushed yet: waiting for health 1/2 on the new config"
    )
    gate, _ = fold([probe(F, 11), probe(F, 12)])
    line = canary.status_line(canary.status(gate, 2))
    assert "222222222222 NOT PUSHED: health probe failing on the new config (2 in a row" in line
    assert line.endswith("last: GET http://127.0.0.1:8404/health: connection failed)")


# ---------------------------------------------------------------------------------------------
# Configuration


def test_healthy_needs_a_health_probe(tmp_path: Path) -> None:
    """push_after = "healthy" is accepted with [haproxy.health] (and "check" without one); without
    a probe it is refused in one line naming the field and what to do."""
    path = tmp_path / "lbwatch.toml"
    probe_section = "[haproxy.health]\nurl = 'http://127.0.0.1:8404/health'\n"
    path.write_text(f"{probe_section}[sync]\nenabled = true\npush_after = 'healthy'\n")
    assert load(path).sync.push_after == "healthy"
    path.write_text("[sync]\nenabled = true\n")
    assert load(path).sync.push_after == "check"
    path.write_text("[sync]\nenabled = true\npush_after = 'healthy'\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.problems == [
        f'{path}: sync.push_after: "healthy" needs the [haproxy.health] probe; '
        'configure one or set push_after = "check"'
    ]


# ---------------------------------------------------------------------------------------------
# The sync service


class Link(PeerLink):
    """The real peer link, which also records each version it is handed."""

    def __init__(self, carrier: FakeCarrier, post: object) -> None:
        super().__init__(Peer("lb2", "192.0.2.12"), carrier, 5.0, 0.1, 0.5, post)  # type: ignore[arg-type]
        self.handed: list[Version] = []

    def set_target(self, version: Version, source: Path, fresh: bool = False) -> None:
        self.handed.append(version)
        super().set_target(version, source, fresh)


class Node:
    """lb1's SyncService with the canary on; haproxy is not running, so a reload is "takes effect
    at its next start" and the checker is `true`: what is tested is what happens after."""

    def __init__(self, tmp: Path, push_after: str = "healthy", rise: int = 2) -> None:
        self.tmp = tmp
        self.live = tmp / "haproxy.cfg"
        if not self.live.exists():
            self.live.write_text("v1\n")
        self.now = 100.0
        self.alerts: list[tuple[str, str]] = []
        self.wanted: list[SyncJob] = []
        self.cfg = config(
            agent={"node_name": "lb1", "state_dir": str(tmp / "state"), "run_dir": str(tmp)},
            haproxy={
                "pidfile": str(tmp / "no-haproxy.pid"),
                "find_without_pidfile": False,
                "health": {"url": "http://127.0.0.1:8404/health", "rise": rise, "fall": 2},
            },
            sync={
                "enabled": True,
                "config": str(self.live),
                "check": ["true", "{file}"],
                "push_after": push_after,
            },
        )
        self.sel = Selector()
        self.svc = SyncService(
            self.cfg,
            self.sel,
            "lb1",
            lambda kind, text: self.alerts.append((kind, text)),
            lambda: None,
            self.wanted.append,
            lambda: self.now,
        )
        peer_staging = tmp / "lb2-staging"
        peer_staging.mkdir(exist_ok=True)
        self.carrier = FakeCarrier(peer_staging)
        self.peer = Peerside(peer_staging)
        self.link = Link(self.carrier, self.svc.mailbox.post)
        self.svc.links = {"lb2": self.link}
        self.svc.start()
        self.run_wanted()

    def pump(self) -> None:
        for callback in self.sel.wait(0):
            callback()

    def run(self, kind: SyncKind) -> None:
        job = SyncJob(kind, str(self.live), time.time_ns())
        self.svc.execute(Action(Service.HAPROXY, Verb.SYNC, "test", "test", job=job))
        self.pump()

    def run_wanted(self) -> None:
        while self.wanted:
            job = self.wanted.pop(0)
            self.svc.execute(Action(Service.HAPROXY, Verb.SYNC, "test", "test", job=job))
            self.pump()

    def edit(self, text: str) -> Version:
        self.live.write_text(text)
        self.run("local")
        assert self.svc.current is not None
        assert self.svc.current.digest == hashlib.sha256(text.encode()).hexdigest()
        return self.svc.current

    def probe(self, ok: bool, after: float = 0.1) -> None:
        """One probe started ``after`` seconds from now (the agent's clock), then finished."""
        self.now += after
        self.svc.probe_done(probe(ok, self.now))

    def release_startup(self) -> None:
        """The version recorded at start-up is held too: let it pass."""
        assert self.held() is not None
        self.probe(True)
        self.probe(True)
        assert self.held() is None

    def held(self) -> HeldView | None:
        return self.svc.snapshot().held

    def close(self) -> None:
        self.peer.stop.set()
        self.svc.close()
        self.sel.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.close()


def pushed(node: Node, version: Version) -> bool:
    return version.staged_name() in node.carrier.pushed


def test_check_pushes_at_once_the_control(tmp_path: Path) -> None:
    """push_after = "check" (the default): an applied edit is handed to the peer at once, with
    no probe at all, and the peer gets it."""
    n = Node(tmp_path, push_after="check")
    try:
        v2 = n.edit("v2\n")
        assert n.link.handed[-1] == v2 and n.held() is None
        wait_for(lambda: pushed(n, v2), 5, what="v2 pushed")
    finally:
        n.close()


def test_a_healthy_edit_goes_out_after_rise_counted_passes(node: Node) -> None:
    """push_after = "healthy": the edit is held; a pass started before the gate opened does not
    count; one pass is 1/2 and still held; the second counted pass hands it to the peer, which
    gets it."""
    node.release_startup()
    handed = len(node.link.handed)
    v2 = node.edit("v2\n")
    held = node.held()
    assert held and (held.digest, held.passes, held.rise) == (v2.digest, 0, 2)
    node.probe(True, after=0.0)  # started as the gate was held: not after it
    assert node.held().passes == 0  # type: ignore[index]
    node.probe(True)
    assert node.held().passes == 1  # type: ignore[index]
    assert "waiting for health 1/2" in canary.status_line(node.held())  # type: ignore[arg-type]
    assert len(node.link.handed) == handed  # not handed over yet
    node.probe(True)
    assert node.held() is None and node.link.handed[handed:] == [v2]
    wait_for(lambda: pushed(node, v2), 5, what="v2 pushed")


def test_an_unhealthy_edit_is_never_pushed_and_the_newest_replaces_it(node: Node) -> None:
    """A held edit whose probes fail: after fall failures one config_unhealthy alert and the
    NOT PUSHED line; more failures and a fail between passes keep it held and alert no more.
    A later edit replaces it: only the newest is ever handed over, once healthy."""
    node.release_startup()
    handed = len(node.link.handed)
    v2 = node.edit("v2 serves nothing\n")
    for _ in range(6):
        node.probe(False)
    node.probe(True)
    node.probe(False)
    assert [k for k, _ in node.alerts] == ["config_unhealthy"]
    assert f"version {v2.digest[:12]} reloaded here but not pushed" in node.alerts[0][1]
    assert "NOT PUSHED: health probe failing" in canary.status_line(node.held())  # type: ignore[arg-type]
    assert node.link.handed[handed:] == []
    v3 = node.edit("v3\n")
    assert node.held().digest == v3.digest  # type: ignore[index]
    node.probe(True)
    node.probe(True)
    assert node.link.handed[handed:] == [v3]
    wait_for(lambda: pushed(node, v3), 5, what="v3 pushed")
    assert not pushed(node, v2)


def test_a_peer_version_drops_the_held_one(node: Node) -> None:
    """A newer version staged by the peer while ours is held is installed; ours is dropped, not
    pushed afterwards whatever the probes say, and the loss is a config_conflict alert."""
    node.release_startup()
    handed = len(node.link.handed)
    v2 = node.edit("v2\n")
    theirs = b"from lb2\n"
    v_peer = Version(
        "haproxy.cfg", "lb2", v2.counter + 1, time.time_ns(), hashlib.sha256(theirs).hexdigest()
    )
    (node.cfg.staging_path() / v_peer.staged_name()).write_bytes(theirs)
    node.run("staged")
    assert node.svc.current == v_peer and node.held() is None
    for _ in range(3):
        node.probe(True)
    # Delivered on like any version this node holds; the held one never.
    assert node.link.handed[handed:] == [v_peer] and not pushed(node, v2)
    assert [k for k, _ in node.alerts] == ["config_conflict"]


def test_startup_and_sync_now_are_held_too(tmp_path: Path) -> None:
    """Every version of this node's goes through the canary: the recorded one at start-up (it
    may be one that was held when lbwatch stopped), a file edited while lbwatch was stopped,
    and `sync --now`."""
    n = Node(tmp_path)
    try:
        assert n.held() is not None and n.link.handed == []  # recorded at first start: held
        n.edit("v2 never healthy\n")
    finally:
        n.close()
    # Restarted with the held, never healthy v2 recorded: still held, still not handed over.
    n = Node(tmp_path)
    try:
        assert n.held() is not None and n.link.handed == []
    finally:
        n.close()
    (tmp_path / "haproxy.cfg").write_text("v3 edited while stopped\n")
    n = Node(tmp_path)
    try:
        v3 = n.svc.current
        assert v3 is not None and n.held().digest == v3.digest  # type: ignore[index]
        n.run("now")
        mine = n.svc.current
        assert mine != v3 and n.held().digest == mine.digest  # type: ignore[index, union-attr]
        n.probe(True)
        n.probe(True)
        assert n.link.handed == [mine]
    finally:
        n.close()


@needs("haproxy", "start-stop-daemon")
@pytest.mark.usefixtures("subreaper")
def test_the_agent_probes_at_once_after_a_sync_reload(rig: Rig) -> None:
    """The real agent, a real haproxy and a probe interval of 30 s: an edit is reloaded and held,
    and the agent starts a probe for it at once, so the canary releases it within a fraction of
    a second instead of at the next regular probe, up to 30 s later."""
    q = json.dumps
    rig.write_config(
        extra=f"""
[sync]
enabled = true
config = {q(str(rig.cfg_file))}
push_after = "healthy"
"""
    )
    reload = (
        f'reload = ["start-stop-daemon", "--stop", "--quiet", "--signal", "USR2", '
        f'"--pidfile", {q(str(rig.ha_pid))}]'
    )
    text = rig.config.read_text().replace("interval = 0.2\n", "interval = 30\n", 1)
    text = text.replace(
        "command_timeout = 5\n\n[haproxy.health]",
        f"command_timeout = 5\n{reload}\n\n[haproxy.health]",
        1,
    )
    rig.config.write_text(text)
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    wait_for(lambda: "passed its health probe" in rig.text(), 10, what="start-up version released")
    edited = rig.cfg_file.read_text() + "# an edit\n"
    digest = hashlib.sha256(edited.encode()).hexdigest()[:12]
    rig.cfg_file.write_text(edited)
    line = re.compile(rf"version {digest} passed its health probe 1 time\(s\) \(held ([0-9.]+) s\)")
    wait_for(lambda: line.search(rig.text()), 5, what="the edit released by a prompt probe")
    match = line.search(rig.text())
    assert match is not None and float(match.group(1)) < 1.0, match
    assert "valid and reloaded (new worker(s)" in rig.text()
