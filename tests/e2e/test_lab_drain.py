"""End to end: ``lbwatch drain`` / ``undrain`` on the lab's pair, with the real haproxy,
keepalived (2.2.7, VI_1 tracking lbwatch's file with weight 1) and both agents watching each
other. The drain moves the VIP through keepalived's track file alone: nothing is stopped or
restarted, on either node.

Each move is timed from the command: when lbwatch wrote the track file (its action's time),
when each keepalived changed state (its own notify_STATE hook appends the wall time,
``transitions_log``), and when each node's eth0 gained or lost the VIP (sampled every few
ms), all on the host's clock, which the nodes share. What the lab shows each run (printed):
the node taking the VIP does so on its master-down timer, 3 x advert_int + skew after the last
advertisement it accepted, not at the first lower one: keepalived's BACKUP with preemption
discards an advertisement of lower priority than its own (RFC 3768 6.4.2), so the VIP moves
2-3 s after the track file is written (advert_int 1 s), in both directions, and the old MASTER
holds it until the new one advertises.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import wire
from lbwatch.config import load
from tests.e2e.test_lab import services_up
from tests.e2e.test_lab_cluster import NOTIFY, cluster_json, pair, with_text
from tests.e2e.test_lab_cluster import pytestmark as cluster_marks
from tests.e2e.test_lab_handover import Timeline, peer_view, recorded, running, since, state
from tests.lab.netlab import LB_ADDR, PRIORITY, Lab, Node
from tests.util import wait_for

pytestmark = cluster_marks

REASON = "lab: drain test"
LOWERING = "lowering the priority of VI_1 to 1 through keepalived's track files"
RESTORING = "restoring the priority of VI_1 through keepalived's track files"


@dataclass(frozen=True)
class Cli:
    """One run of the lbwatch command inside a node: exit code, output, and when it ran (host
    wall clock)."""

    code: int
    out: str
    err: str
    began: float
    ended: float


def cli(node: Node, *args: str, timeout: float = 60.0) -> Cli:
    """``lbwatch ARGS`` inside ``node``, as an operator there runs it (``Node.lbwatch_cli``,
    but with the exit code and stderr kept)."""
    config = str(node.dir / "lbwatch.toml")
    began = time.time()
    proc = subprocess.run(
        node.enter(sys.executable, "-m", "lbwatch", "--config", config, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Cli(proc.returncode, proc.stdout, proc.stderr, began, time.time())


def daemons(node: Node) -> dict[str, list[int]]:
    """Host PIDs of ``node``'s keepalived (parent and its VRRP and checker children) and
    haproxy (master and workers): unchanged PIDs mean nothing was stopped or restarted."""
    return {
        "keepalived": sorted(p.pid for p in node.live("keepalived")),
        "haproxy": node.haproxy_pids(),
    }


def track_value(node: Node) -> str:
    """VI_1's track file on ``node``, as keepalived reads it."""
    return (node.dir / "state" / "track" / "VI_1").read_text().strip()


def transitions(node: Node, after: float) -> list[tuple[float, str]]:
    """keepalived's own record of VI_1's transitions on ``node`` after wall time ``after``."""
    path = node.transitions_path
    lines = path.read_text().splitlines() if path.exists() else []
    out = [(float(t), s) for t, s in (line.split() for line in lines)]
    return [(t, s) for t, s in out if t >= after]


def entered(node: Node, want: str, after: float) -> float | None:
    """When ``node``'s keepalived entered ``want`` after ``after`` (its notify hook's time)."""
    return next((t for t, s in transitions(node, after) if s == want), None)


def track_written(node: Node, after: float) -> float | None:
    """When ``node``'s agent dispatched a write of its track files after ``after``."""
    acts = node.doc().recent_actions
    return next((a.at for a in acts if a.action == "track keepalived" and a.at >= after), None)


def agent_mails(maildir: Path, kind: str) -> list[str]:
    """Subjects of lbwatch's mails of agent event ``kind`` ("drained", "undrained")."""
    out = []
    for path in sorted(maildir.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if msg["X-Lbwatch-Event"] == f"agent:{kind}":
            out.append(" ".join(str(msg["Subject"]).split()))
    return out


def drained_in_view(node: Node, other: str) -> list[str] | None:
    """The instances ``node``'s cluster watch last heard ``other`` say are drained."""
    view = peer_view(node, other)
    return list(view.drained) if view is not None else None


def ready_to_drain(lb1: Node, lb2: Node) -> bool:
    """lb1 MASTER with the VIP, lb2 a serving BACKUP without it, and lb1 has heard so (the
    drain asks lb1's view of lb2)."""
    view = peer_view(lb1, "lb2")
    return (
        services_up(lb1)
        and services_up(lb2)
        and state(lb1) == "MASTER"
        and state(lb2) == "BACKUP"
        and lb1.has_vip()
        and not lb2.has_vip()
        and view is not None
        and view.health != "down"
        and view.keepalived.running
        and not view.paused
        and "VI_1" in view.vrrp
        and view.vrrp["VI_1"].state == "BACKUP"
    )


class Sampler:
    """On a thread, every few ms: which nodes hold the VIP and what lb1's track file says,
    with the host's wall time. lb1 is asked first, then lb2, some ms apart: a sample taken
    across the move may show the VIP on both nodes (drain) or on neither (undrain)."""

    def __init__(self, lb1: Node, lb2: Node) -> None:
        self.lb1, self.lb2 = lb1, lb2
        # (wall time, the nodes holding the VIP, lb1's track file)
        self.samples: list[tuple[float, frozenset[str], str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        at = time.time()
        held = frozenset(n.name for n in (self.lb1, self.lb2) if n.has_vip())
        self.samples.append((at, held, track_value(self.lb1)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sample()  # the state the block waited for, even if the thread lagged behind

    def first(self, after: float, node: str, holds: bool) -> float | None:
        """The first sample after ``after`` where ``node`` holds the VIP (or not)."""
        return next((at for at, h, _ in self.samples if at >= after and (node in h) == holds), None)

    def count(self, after: float, holders: frozenset[str]) -> int:
        return sum(1 for at, h, _ in self.samples if at >= after and h == holders)

    def resolution(self) -> float:
        """The median time between two samples."""
        gaps = sorted(b[0] - a[0] for a, b in zip(self.samples, self.samples[1:]))
        return gaps[len(gaps) // 2] if gaps else float("nan")


def timings(
    timeline: Timeline, sampler: Sampler, op: Cli, leaving: Node, taking: Node, value: str
) -> str:
    """Each step of the VIP's move from ``leaving`` to ``taking``, timed from ``op``'s start
    and marked on the timeline; returns them on one line."""
    t0, lb1 = op.began, sampler.lb1
    steps = {
        f"lb1's agent wrote {value}": track_written(lb1, t0),
        f"{leaving.name} BACKUP": entered(leaving, "BACKUP", t0),
        f"{taking.name} MASTER": entered(taking, "MASTER", t0),
        f"VIP off {leaving.name}": sampler.first(t0, leaving.name, holds=False),
        f"VIP on {taking.name}": sampler.first(t0, taking.name, holds=True),
        "command returned": op.ended,
    }
    said = []
    for what, at in steps.items():
        took = "not seen" if at is None else f"{at - t0:.3f} s"
        timeline.mark(f"{what}: {took} after the command")
        said.append(f"{what} {took}")
    none, both = sampler.count(t0, frozenset()), sampler.count(t0, frozenset({"lb1", "lb2"}))
    timeline.mark(
        f"samples (every {sampler.resolution() * 1000:.0f} ms) with the VIP on neither node: "
        f"{none}, on both: {both}"
    )
    return ", ".join(said)


def advertised(capture: wire.Capture, node: str) -> bool:
    """The capture holds an advertisement of ``node`` at its configured priority."""
    adverts, _ = capture.read()
    return any(a.src == LB_ADDR[node] and a.prio == PRIORITY[node] for a in adverts)


def master_down(priority: int) -> float:
    """keepalived's master-down interval for a backup of ``priority`` (advert_int 1 s in the
    lab): 3 x advert_int + skew, RFC 3768 6.1 / RFC 5798 6.1."""
    return 3 * 1.0 + (256 - priority) / 256


def on_the_wire(adverts: list[wire.Advert], written: float, old: str, new: str) -> str:
    """How VRRP moved the instance after the track file was written at ``written``: when
    ``old`` (the MASTER) next advertised, and when ``new`` first advertised as MASTER, against
    the last advertisement of ``old`` that ``new`` accepted: any before the write (a drained
    ``new`` has priority 1), one at or above ``new``'s priority after it (with preemption a
    backup discards lower ones). On its master-down timer ``new`` takes over ``master_down``
    after that one; at once, it would take over at ``old``'s first lower advertisement."""
    mine = [a for a in adverts if a.vrid == 51]
    took = next((a for a in mine if a.src == LB_ADDR[new] and a.at > written), None)
    if took is None:
        return "no advertisement from the new MASTER captured"
    prio = PRIORITY[new]
    heard = [
        a
        for a in mine
        if a.src == LB_ADDR[old] and a.at < took.at and (a.at < written or a.prio >= prio)
    ]
    changed = next((a for a in mine if a.src == LB_ADDR[old] and a.at > written), None)
    said = []
    if changed is not None:
        said.append(
            f"{old}'s next advertisement {changed.at - written:.3f} s after the write, "
            f"at priority {changed.prio}"
        )
    if heard:
        since = took.at - heard[-1].at
        said.append(
            f"{new}'s first as MASTER {took.at - written:.3f} s after the write and "
            f"{since:.3f} s after the last advertisement it accepted ({old}'s at "
            f"{heard[-1].prio}; master-down interval {master_down(prio):.3f} s)"
        )
    return "; ".join(said)


def test_drain_moves_the_vip_and_stops_nothing() -> None:
    """``lbwatch drain --wait`` on the MASTER moves the VIP to its peer with lb1's keepalived
    and haproxy running on under the same PIDs, and is shown in lb1's status, in lb2's view of
    lb1 and by mail; ``lbwatch undrain`` brings the VIP back by preemption, the PIDs unchanged."""
    with Lab() as lab:
        maildir, lb1, lb2 = pair(lab, NOTIFY, transitions_log=True)
        with contextlib.ExitStack() as stack:
            timeline = stack.enter_context(recorded(lab, "drain and undrain"))
            # VRRP on the lab's bridge, to tell how keepalived preempts (printed, not asserted).
            capture = (
                stack.enter_context(wire.Capture(lab, lab.base / "vrrp.pcap"))
                if wire.available()
                else None
            )
            wait_for(lambda: ready_to_drain(lb1, lb2), 30, what="lb1 MASTER, lb2 BACKUP, heard")
            # The positive control: lb1 holds the VIP, lb2 does not.
            assert lb1.has_vip() and not lb2.has_vip() and state(lb1) == "MASTER"
            before = daemons(lb1)
            assert before["keepalived"] and before["haproxy"], before
            timeline.mark(f"settled: lb1 MASTER with the VIP; lb1's daemons {before}")
            if capture is not None:  # one advertisement of lb1 at 254 before the drain
                wait_for(lambda: advertised(capture, "lb1"), 5, what="lb1 advertising")

            # -- drain ---------------------------------------------------------------------------
            mark = len(lb1.log_text())
            with Sampler(lb1, lb2) as sampler:
                drain = cli(lb1, "drain", "--wait", "--reason", REASON)
                timeline.mark(f"`lbwatch drain --wait` exited {drain.code}: {drain.out.strip()}")
                assert drain.code == 0, (drain.out, drain.err)
                assert "now served by the peers" in drain.out
                wait_for(lb2.has_vip, 15, interval=0.02, what="VIP on lb2")
                wait_for(
                    lambda: state(lb2) == "MASTER" and state(lb1) == "BACKUP",
                    10,
                    what="lb2 MASTER, lb1 BACKUP",
                )
            drain_took = timings(timeline, sampler, drain, lb1, lb2, "-253")

            assert lb2.has_vip() and not lb1.has_vip()
            assert state(lb1) == "BACKUP"
            assert daemons(lb1) == before, "lb1's keepalived or haproxy was restarted"
            assert running(lb1, "keepalived") and running(lb1, "haproxy")
            assert track_value(lb1) == "-253"
            doc = lb1.doc()
            assert "DRAINED" in doc.summary, doc.summary
            assert doc.drain is not None and doc.drain.applied == ["VI_1"]
            assert doc.drain.reason == REASON
            text = lb1.lbwatch_cli("status")
            line = next(ln for ln in text.splitlines() if ln.strip().startswith("drained"))
            print(f"lbwatch status: {line.strip()}")
            assert "VI_1" in line and REASON in line
            said = since(lb1, mark)
            assert LOWERING in said and "stopping keepalived" not in said, said
            wait_for(lambda: drained_in_view(lb2, "lb1") == ["VI_1"], 10, what="lb2 hears it")
            view = cluster_json(lb2).nodes["lb1"].view
            assert view is not None and view.drained == ["VI_1"]
            timeline.mark("lb2's cluster view of lb1: drained [VI_1]")
            wait_for(lambda: agent_mails(maildir, "drained"), 15, what="the drained mail")
            subject = agent_mails(maildir, "drained")[0]
            print(f"mail: {subject}")
            assert "lb1" in subject and "drain requested" in subject and REASON in subject
            timeline.mark("mail: drained")

            # -- undrain -------------------------------------------------------------------------
            mark = len(lb1.log_text())
            with Sampler(lb1, lb2) as sampler:
                undrain = cli(lb1, "undrain")
                timeline.mark(f"`lbwatch undrain` exited {undrain.code}: {undrain.out.strip()}")
                assert undrain.code == 0, (undrain.out, undrain.err)
                wait_for(
                    lambda: lb1.has_vip() and not lb2.has_vip(),
                    15,
                    interval=0.02,
                    what="VIP back on lb1 alone",
                )
                wait_for(
                    lambda: state(lb1) == "MASTER" and state(lb2) == "BACKUP",
                    10,
                    what="lb1 MASTER, lb2 BACKUP",
                )
            undrain_took = timings(timeline, sampler, undrain, lb2, lb1, "0")

            assert daemons(lb1) == before, "lb1's keepalived or haproxy was restarted"
            assert track_value(lb1) == "0"
            doc = lb1.doc()
            assert "DRAINED" not in doc.summary and doc.drain is None, doc.summary
            assert RESTORING in since(lb1, mark)
            wait_for(lambda: drained_in_view(lb2, "lb1") == [], 10, what="lb2 hears it")
            wait_for(lambda: agent_mails(maildir, "undrained"), 15, what="the undrained mail")
            print(f"mail: {agent_mails(maildir, 'undrained')[0]}")
            timeline.mark("lb2's view of lb1: drained []; mail: undrained")
            print(f"drain, from the command: {drain_took}")
            print(f"undrain, from the command: {undrain_took}")
            if capture is not None:
                # tcpdump hands packets over in blocks (up to a second late without
                # --immediate-mode): wait for lb1's advertisements as MASTER again.
                undrained_at = track_written(lb1, undrain.began)
                assert undrained_at is not None
                wait_for(
                    lambda: any(
                        a.src == LB_ADDR["lb1"] and a.at > undrained_at for a in capture.read()[0]
                    ),
                    5,
                    what="lb1's advertisements as MASTER in the capture",
                )
                adverts, _ = capture.read()
                for name, op, old, new in (
                    ("drain", drain, "lb1", "lb2"),
                    ("undrain", undrain, "lb2", "lb1"),
                ):
                    written = track_written(lb1, op.began)
                    assert written is not None
                    print(f"{name} on the wire: {on_the_wire(adverts, written, old, new)}")


def command(node: Node, service: str, verb: str) -> list[str]:
    """The command ``node``'s lbwatch is configured to run to ``verb`` ("start", "stop")
    ``service`` (the lab has no systemd: start-stop-daemon, as `systemctl stop` would)."""
    cfg = load(node.dir / "lbwatch.toml")
    argv = getattr(cfg.haproxy if service == "haproxy" else cfg.keepalived, verb)
    assert argv, f"{node.name}: no {service} {verb} command"
    return list(argv)


def pause_and_stop(node: Node, service: str) -> None:
    """``node``'s agent paused (so that it starts nothing) and ``service`` stopped by the
    command lbwatch is configured with there."""
    node.lbwatch_cli("pause", "--reason", f"lab: {service} stopped by hand")
    wait_for(lambda: node.doc().paused, 5, what=f"{node.name} paused")
    node.run(*command(node, service, "stop"))
    wait_for(lambda: not running(node, service), 10, what=f"{node.name}'s {service} stopped")


def heal(node: Node, service: str) -> None:
    """``service`` started again by its configured command on ``node``, then its agent resumed."""
    node.run(*command(node, service, "start"))
    wait_for(lambda: running(node, service), 10, what=f"{node.name}'s {service} running")
    node.lbwatch_cli("resume")
    wait_for(lambda: not node.doc().paused, 5, what=f"{node.name} resumed")


def test_drain_is_refused_while_the_peer_cannot_take_the_vip() -> None:
    """With lb2's haproxy stopped, then with its keepalived stopped, ``lbwatch drain`` on lb1
    exits 1 with one line starting "refused:" and the VIP stays on lb1; once lb2 is healed the
    same command drains."""
    with Lab() as lab:
        _, lb1, lb2 = pair(lab, NOTIFY)
        with recorded(lab, "refused, then allowed") as timeline:
            for service, lacks in (
                ("haproxy", "lb2: haproxy not serving"),
                ("keepalived", "lb2: keepalived not running"),
            ):
                wait_for(lambda: ready_to_drain(lb1, lb2), 30, what="lb1 MASTER, lb2 BACKUP")
                pause_and_stop(lb2, service)
                timeline.mark(f"lb2 paused, its {service} stopped by its stop command")

                def heard(service: str = service) -> bool:
                    view = peer_view(lb1, "lb2")
                    if view is None:
                        return False
                    if service == "haproxy":
                        return not view.haproxy.running
                    return not view.keepalived.running

                wait_for(heard, 10, what=f"lb1 to hear lb2's {service} stopped")
                before = daemons(lb1)
                refused = cli(lb1, "drain")
                timeline.mark(f"`lbwatch drain` exited {refused.code}: {refused.err.strip()}")
                assert refused.code == 1, (refused.out, refused.err)
                lines = refused.err.splitlines()
                assert len(lines) == 1 and lines[0].startswith("refused: "), refused.err
                assert lacks in lines[0], lines[0]
                assert refused.out == ""
                # Nothing written for the agent to act on: no flag, the track file as it was.
                assert not (lb1.dir / "state" / "drained").exists()
                assert lb1.doc().drain is None and track_value(lb1) == "0"
                assert lb1.has_vip() and state(lb1) == "MASTER" and daemons(lb1) == before

                heal(lb2, service)
                timeline.mark(f"lb2's {service} started again, lb2 resumed")

            # -- the positive control: the same drain, lb2 healed --------------------------------
            wait_for(lambda: ready_to_drain(lb1, lb2), 30, what="lb1 to hear lb2 able again")
            drained = cli(lb1, "drain", "--wait")
            timeline.mark(f"`lbwatch drain --wait` exited {drained.code}: {drained.out.strip()}")
            assert drained.code == 0, (drained.out, drained.err)
            wait_for(lambda: lb2.has_vip() and not lb1.has_vip(), 15, what="VIP on lb2 alone")
            timeline.mark("VIP on lb2 alone")
            undrained = cli(lb1, "undrain")
            assert undrained.code == 0, (undrained.out, undrained.err)
            wait_for(lambda: lb1.has_vip() and not lb2.has_vip(), 15, what="VIP back on lb1")
            timeline.mark("undrained: VIP back on lb1")


def test_a_drain_is_kept_across_an_agent_restart() -> None:
    """lb1 drained, its agent killed (SIGKILL, by PID) and started again: lb1 stays drained,
    its track file at -253 and the VIP on lb2 throughout, with no undrain written or mailed,
    until ``lbwatch undrain``."""
    with Lab() as lab:
        maildir, lb1, lb2 = pair(lab, NOTIFY)
        with recorded(lab, "drained across an agent restart") as timeline:
            wait_for(lambda: ready_to_drain(lb1, lb2), 30, what="lb1 MASTER, lb2 BACKUP")
            drained = cli(lb1, "drain", "--wait")
            assert drained.code == 0, (drained.out, drained.err)
            wait_for(lambda: lb2.has_vip() and not lb1.has_vip(), 15, what="VIP on lb2 alone")
            timeline.mark("drained: VIP on lb2 alone")
            before = daemons(lb1)

            with Sampler(lb1, lb2) as sampler:
                old = lb1.agent_pid()
                assert old is not None
                ticks = lb1.doc().agent.start_ticks  # the old agent's identity, not its PID
                os.kill(old, signal.SIGKILL)
                assert lb1.lbwatch is not None
                lb1.lbwatch.wait(10)  # nsenter, which exits with the agent
                lb1.lbwatch = None
                timeline.mark(f"lb1's agent (host PID {old}) killed")
                wait_for(
                    lambda: cluster_json(lb2).nodes["lb1"].state == "agent down",
                    10,
                    what="lb2 to see lb1's agent down",
                )
                timeline.mark("lb2 sees lb1's agent down")
                mark = len(lb1.log_text())
                lb1.start_lbwatch()
                wait_for(
                    lambda: (
                        (doc := lb1.status()) is not None
                        and doc.agent.start_ticks != ticks
                        and doc.ready
                        and doc.drain is not None
                        and doc.drain.applied == ["VI_1"]
                    ),
                    20,
                    what="lb1's new agent ready, drained",
                )
                timeline.mark("lb1's new agent ready, showing VI_1 drained")
                wait_for(
                    lambda: drained_in_view(lb2, "lb1") == ["VI_1"],
                    10,
                    what="lb2 to hear lb1's new agent, drained",
                )
                timeline.mark("lb2 hears lb1's new agent: drained [VI_1]")
                # Watched over three of the new agent's scans (scan_interval 1 s): nothing moves.
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline:
                    doc = lb1.doc()
                    assert "DRAINED" in doc.summary and doc.drain is not None, doc.summary
                    assert doc.drain.applied == ["VI_1"] and doc.track.get("VI_1") == -253
                    time.sleep(0.1)
                timeline.mark("three seconds of the new agent: drained, nothing written")

            held = {h for _, h, _ in sampler.samples}
            tracks = {v for *_, v in sampler.samples}
            timeline.mark(f"{len(sampler.samples)} samples: VIP held by {held}, track {tracks}")
            assert held == {frozenset({"lb2"})}, "the VIP moved during the agent's restart"
            assert tracks == {"-253"}
            assert daemons(lb1) == before
            said = since(lb1, mark)
            assert RESTORING not in said and "drain ended" not in said, said
            # The file already said -253: the new agent has nothing to write, nor to announce.
            assert LOWERING not in said, said
            # A mark sent now through the new agent's senders arrives after anything it spooled.
            lb1.lbwatch_cli("notify", "GROUP", "MARK", "FAULT", "0")
            wait_for(lambda: with_text(maildir, "MARK"), 15, what="the mark")
            assert agent_mails(maildir, "undrained") == []
            assert len(agent_mails(maildir, "drained")) == 1, agent_mails(maildir, "drained")
            assert "DRAINED" in lb1.doc().summary

            undrained = cli(lb1, "undrain")
            assert undrained.code == 0, (undrained.out, undrained.err)
            wait_for(lambda: lb1.has_vip() and not lb2.has_vip(), 15, what="VIP back on lb1")
            assert track_value(lb1) == "0"
            timeline.mark("undrained: VIP back on lb1")
