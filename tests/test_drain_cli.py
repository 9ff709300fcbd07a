"""`lbwatch drain` / `undrain` against a status document naming this test process as the agent
(so the CLI takes it as running) and a real keepalived.conf: each refusal after the allowed
case, and the flag and track files as written."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch import drain, heartbeat, pstat, trackfile
from lbwatch.cli import main
from lbwatch.status import read_status, write_status
from lbwatch.statusdoc import (
    AgentInfo,
    ClusterView,
    NodeAgent,
    NodeService,
    NodeView,
    PeerNode,
    StatusDoc,
    VipsView,
)

VIP = "192.0.2.100"
LEVER = """track_file lbwatch_VI_1 {{
    file "{track}/VI_1"
    weight 1
    init_file 0
}}
"""
INSTANCE = """vrrp_instance VI_1 {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority 254
    virtual_ipaddress {{
        192.0.2.100/24 dev eth0
    }}
{tracks}}}
"""
TRACKS = "    track_file {\n        lbwatch_VI_1\n    }\n"


class Node:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.run = tmp / "run"
        self.state = tmp / "state"
        self.track = tmp / "state" / "track"
        self.ka = tmp / "keepalived.conf"
        self.config = tmp / "lbwatch.toml"
        self.run.mkdir()
        self.state.mkdir()
        self.ka.write_text(LEVER.format(track=self.track) + INSTANCE.format(tracks=TRACKS))
        self.config.write_text(
            f"[agent]\nrun_dir = {json.dumps(str(self.run))}\n"
            f"state_dir = {json.dumps(str(self.state))}\n"
            f"[keepalived]\nconfig = {json.dumps(str(self.ka))}\n"
            f"track_dir = {json.dumps(str(self.track))}\n"
        )

    def publish(self, peer: NodeView | None, state: str = "up", **doc: object) -> None:
        """The agent's status: VI_1 MASTER here, holding the VIP; lb2 as ``peer`` says."""
        me = pstat.read_stat(os.getpid())
        assert me is not None
        agent = AgentInfo(
            pid=me.pid, start_ticks=me.start_ticks, create_time=0.0, node="lb1", version="t"
        )
        peers = {"lb2": PeerNode(state=state, since=0.0, view=peer)}
        fields: dict[str, object] = {
            "agent": agent,
            "summary": "",
            "vrrp": {"VI_1": VipsView(state="MASTER", vips=[VIP], held=[VIP])},
            "cluster": ClusterView(peers=peers),
        }
        fields.update(doc)
        write_status(self.run, StatusDoc(**fields))  # type: ignore[arg-type]
        heartbeat.Heartbeat(self.run / heartbeat.FILE).renew(0.0)  # the agent's loop turns

    def cli(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])


def lb2(**kw: object) -> NodeView:
    """lb2 serving, VI_1 BACKUP there."""
    base: dict[str, object] = {
        "node": "lb2",
        "agent": NodeAgent(pid=1, start_ticks=1, version="t"),
        "haproxy": NodeService(running=True),
        "keepalived": NodeService(running=True),
        "health": "up",
        "vrrp": {"VI_1": VipsView(state="BACKUP", vips=[VIP])},
    }
    base.update(kw)
    return NodeView(**base)  # type: ignore[arg-type]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@pytest.fixture
def agent(node: Node) -> Iterator[None]:
    """Plays the agent: once the flag says drained (or not), the status says the track file
    does (what the real agent publishes after its TRACK)."""
    stop = threading.Event()

    def play() -> None:
        while not stop.wait(0.02):
            doc = read_status(node.run).data
            if doc is None:
                continue
            want = trackfile.DRAINED if drain.read(node.state) is not None else trackfile.OK
            if doc.track.get("VI_1") != want:
                write_status(node.run, doc.model_copy(update={"track": {"VI_1": want}}))

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(2)


def err_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_drain_with_a_peer_able_writes_the_flag_and_waits_for_the_agent(
    node: Node, agent: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The allowed case: lb2 serving as BACKUP; the flag is written, the agent applies it."""
    node.publish(lb2())
    assert node.cli("drain", "--reason", "kernel update") == 0
    assert "drained: VI_1" in capsys.readouterr().out
    flag = drain.read(node.state)
    assert flag is not None and flag.reason == "kernel update" and flag.covers("VI_1")
    assert (node.state / drain.FILE).stat().st_mode & 0o777 == 0o600
    assert node.cli("undrain") == 0
    assert drain.read(node.state) is None
    assert "undrained: VI_1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("desc", "peer", "state", "words"),
    [
        ("haproxy down there", lb2(haproxy=NodeService(running=False)), "up", "haproxy not"),
        ("failing its probe", lb2(health="down"), "up", "lb2: haproxy not serving"),
        ("keepalived stopped", lb2(keepalived=NodeService()), "up", "keepalived not running"),
        ("paused there", lb2(paused=True), "up", "lb2: paused"),
        ("drained there", lb2(drained=["VI_1"]), "up", "lb2: VI_1 drained"),
        ("VI_1 in FAULT there", lb2(vrrp={"VI_1": VipsView(state="FAULT")}), "up", "FAULT"),
        ("its agent down", lb2(), "agent down", "lb2: agent down"),
        ("no VRRP state said", lb2(vrrp={}), "up", "reports no VRRP state"),
    ],
)
def test_drain_is_refused_when_no_peer_is_shown_able(
    node: Node, capsys: pytest.CaptureFixture[str], desc: str, peer: NodeView, state: str,
    words: str,
) -> None:  # fmt: skip
    """One line, exit 1, nothing written; --force writes the flag all the same."""
    node.publish(peer, state)
    assert node.cli("drain") == 1
    line = err_line(capsys)
    assert line.startswith("refused: no peer can take VI_1 over (") and words in line, line
    assert line.endswith("--force drains anyway")
    assert not (node.state / drain.FILE).exists()


def test_force_drains_when_no_peer_can(node: Node, agent: None) -> None:
    """--force: the operator's word over the peers' state."""
    node.publish(lb2(haproxy=NodeService(running=False)))
    assert node.cli("drain", "--force") == 0
    assert drain.read(node.state) is not None


def test_drain_is_refused_without_the_lever(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """keepalived.conf that does not track lbwatch's file: refused, saying where to look."""
    node.publish(lb2())
    node.ka.write_text(INSTANCE.format(tracks=""))
    assert node.cli("drain") == 1
    line = err_line(capsys)
    assert "VI_1 does not track" in line and "lbwatch doctor shows what to add" in line
    assert not (node.state / drain.FILE).exists()


def test_drain_is_refused_while_paused(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """Paused, the agent would not apply it: refused, saying to resume first."""
    node.publish(lb2(), paused=True)
    assert node.cli("drain") == 1
    assert "lbwatch is paused" in err_line(capsys)


def test_drain_of_an_unknown_instance_is_refused(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name this node does not run: refused (a typo never drains nothing silently)."""
    node.publish(lb2())
    assert node.cli("drain", "VI_9") == 1
    assert "does not know VI_9" in err_line(capsys)


def test_drain_without_an_agent_needs_force(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """No agent running: the peers cannot be asked; --force records it for the next start."""
    assert node.cli("drain") == 1
    assert "agent is not running" in err_line(capsys)
    assert node.cli("drain", "--force") == 0
    assert drain.read(node.state) is not None


def test_drain_wait_waits_for_the_vip_to_leave(node: Node, agent: None) -> None:
    """--wait returns once this node holds VI_1 no more; within --timeout, or exit 1."""
    node.publish(lb2())

    def let_go() -> None:
        time.sleep(0.5)
        doc = read_status(node.run).data
        assert doc is not None
        backup = {"VI_1": VipsView(state="BACKUP", vips=[VIP], held=[])}
        write_status(node.run, doc.model_copy(update={"vrrp": backup}))

    threading.Thread(target=let_go, daemon=True).start()
    started = time.monotonic()
    assert node.cli("drain", "--wait", "--timeout", "10") == 0
    assert time.monotonic() - started >= 0.4
    node.publish(lb2(), track={"VI_1": trackfile.DRAINED})  # holds it again: times out
    assert node.cli("drain", "--wait", "--timeout", "0.3") == 1


def test_a_flag_no_one_can_read_drains_everything(node: Node) -> None:
    """A damaged flag (edited by hand, cut short) still drains, every instance."""
    (node.state / drain.FILE).write_text("{not json")
    flag = drain.read(node.state)
    assert flag is not None and flag.covers("VI_1") and flag.covers("anything")


def test_a_track_file_never_leaves_its_directory(tmp_path: Path) -> None:
    """An instance name that would climb out of track_dir (keepalived.conf names it) has no
    lever: nothing is written anywhere."""
    for name in ("..", ".", "../x", "a/b", "", "x" * 65):
        assert trackfile.path(tmp_path, name) is None
        with pytest.raises(ValueError):
            trackfile.write(tmp_path / "track", name, trackfile.DRAINED)
    assert list(tmp_path.rglob("*")) == []
    trackfile.write(tmp_path / "track", "VI_1", trackfile.DRAINED)  # the allowed case
    assert trackfile.read(tmp_path / "track", ["VI_1"]) == (("VI_1", trackfile.DRAINED),)


def test_drain_is_refused_when_the_agent_does_not_respond(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agent's process exists but its loop has not turned for longer than the peers allow
    (SIGSTOP, a hang): its status shows the peers as they were then, so they cannot be shown
    able now. Refused; --force drains all the same."""
    node.publish(lb2())
    me = pstat.read_stat(os.getpid())
    assert me is not None
    old = pstat.since_boot() - heartbeat.STALE_AFTER - 5
    (node.run / heartbeat.FILE).write_text(
        f"{heartbeat.MAGIC} {me.pid} {me.start_ticks} {old:.3f}\n"
    )
    assert node.cli("drain") == 1
    line = err_line(capsys)
    assert "the agent is not responding" in line and line.endswith("--force drains anyway")
    assert not (node.state / drain.FILE).exists()
    (node.run / heartbeat.FILE).unlink()  # no heartbeat at all: no more current
    assert node.cli("drain") == 1
    assert "the agent is not responding" in err_line(capsys)


def test_without_peers_watched_the_refusal_says_so(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """No cluster watch (and so no heartbeat): the refusal names the missing watch, not a
    silent agent."""
    node.publish(None, cluster=None)
    (node.run / heartbeat.FILE).unlink()
    assert node.cli("drain") == 1
    assert "no peers are watched" in err_line(capsys)
