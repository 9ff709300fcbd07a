"""Adversarial tests of issue 23, finding 2: no claim inflates a node's edit counter beyond what
the group really made, so no forged version keeps a node's next edit from its peers.

Someone holding a peer's sync key can put any version into a node's staging directory (as
``lbwatch receive`` does for a PUT) and read its status file; they cannot write that file, nor
anything on the other nodes. The nodes are real sync jobs (``apply``) on the real filesystem,
built with the helpers of tests/test_adversarial_sync_rule.py: they answer each other's asks
through a real PeerLink's status read. "Taken at its first delivery" is the criterion: a refusal
that a retry with backoff later undoes is what kept lb2's edit from lb1 for minutes in the lab.

The property at the end lets an adversary send any number of forged versions (any counters, in
any order, valid or refused by the checker) to one node, between real edits on any node and
deliveries between the honest nodes; its oracle states the promise on its own, from what the
honest nodes made and held, without the rule's functions.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.services import CommandResult, run_command
from lbwatch.sync import apply, peerstatus
from lbwatch.sync.apply import StagedOutcome
from lbwatch.sync.peers import PeerLink, PeerState, PeerView, classify
from lbwatch.sync.peerstatus import STATUS
from lbwatch.sync.receive import ApplySettings
from lbwatch.sync.transport import Peer
from lbwatch.sync.versions import MAX_AHEAD, Version, vouched_by
from tests.conftest import needs
from tests.fakes import FakeCarrier
from tests.test_adversarial_sync_rule import (
    UNIT,
    Box,
    _base,
    box,
    deliver,
    forge,
    in_step,
    operator_saves,
    text,
    wall,
)
from tests.test_adversarial_sync_rule2 import _service
from tests.util import unconfined, wait_for

pytestmark = needs("haproxy")

# The oracle's own statement of the bound: a node's counter may run at most this far beyond the
# highest counter the group really made (a real edit, or a version another honest node holds).
BOUND = 1_000_000
TOP = 2**53 + 1  # the counter of the PUTs found in the lab (one beyond the maximum)


def test_the_oracles_bound_is_the_rules_bound() -> None:
    """The bound the oracle below states on its own is the one the rule applies."""
    assert MAX_AHEAD == BOUND


def broken(tag: str) -> str:
    """A config haproxy -c refuses (an unknown keyword in the last section)."""
    return _base() + f"    no-such-keyword {tag}\n"


def attacked_pair(tmp_path: Path) -> tuple[Box, Box]:
    """lb1 and lb2 in step; an edit on lb1 reaches lb2 at its first delivery (positive control,
    before any forged version)."""
    lb1, lb2 = box(tmp_path, "lb1"), box(tmp_path, "lb2")
    in_step(lb1, lb2)
    mine = operator_saves(lb1, text("before the attack"))
    assert mine.result == "applied"
    out = deliver(lb1, lb2)
    assert out.received is not None and out.received.result == "applied"
    return lb1, lb2


def status_counter(node: Box) -> int:
    """The counter of what ``node`` holds, as its status file shows it to a holder of the sync
    key (who reads it to aim the next claim)."""
    entry = peerstatus.parse((node.ctx.staging / STATUS).read_bytes())[UNIT]
    assert entry.current is not None
    return entry.current.counter


def job(node: Box) -> str:
    """``node``'s staged job, as its inotify watch asks for it after each PUT."""
    out = apply.apply_staged(node.ctx, wall())
    assert out is not None and out.received is not None
    return out.received.result


def next_edit_reaches(lb1: Box, lb2: Box) -> None:
    """The operator's next edit on lb1 is taken by lb2 at its first delivery."""
    mine = operator_saves(lb1, text("the real edit after the attack"))
    assert mine.result == "applied" and mine.version is not None
    out = deliver(lb1, lb2)
    assert out.received is not None
    assert out.received.result == "applied", (
        f"lb1's real edit (counter {mine.version.counter}) is {out.received.result} by lb2 "
        f"(which holds {lb2.current}): {out.received.message}"
    )
    assert lb2.current == mine.version


def test_twenty_refused_claims_leave_the_attacked_nodes_next_edit_acceptable(
    tmp_path: Path,
) -> None:
    """Twenty versions claiming edit 2^53+1, each refused in a job of its own on lb1, leave
    lb1's counter where it was: lb1's next real edit is taken by lb2 at its first delivery
    (each refusal used to add half a million to lb1's counter)."""
    lb1, lb2 = attacked_pair(tmp_path)
    before = apply.seen(lb1.ctx)
    for n in range(20):
        forge(lb1, text(f"forged {n}"), TOP)
        assert job(lb1) == "implausible"
    assert apply.seen(lb1.ctx) == before
    next_edit_reaches(lb1, lb2)


def test_claims_the_checker_refuses_cannot_climb(tmp_path: Path) -> None:
    """Ten invalid configs, each claiming a bound beyond the last (read from lb1's status and
    the previous claim), are refused by lb1 without spreading: lb1's counter runs at most one
    bound ahead, and its next real edit is taken by lb2 at its first delivery (each used to
    count whole, so the counter climbed ten million)."""
    lb1, lb2 = attacked_pair(tmp_path)
    base = status_counter(lb1)
    results = []
    for k in range(1, 11):
        forge(lb1, broken(str(k)), base + k * BOUND)
        results.append(job(lb1))
    assert results[0] == "rejected", "control: a claim within the bound reaches the checker"
    assert apply.seen(lb1.ctx) <= base + BOUND, results
    next_edit_reaches(lb1, lb2)


def test_claims_taken_one_on_another_stay_within_a_bound_of_what_the_peers_hold(
    tmp_path: Path,
) -> None:
    """Valid configs, each claiming a bound beyond what lb1's status shows, pushed faster than
    lb1 delivers (none reaches lb2): the first is taken and served, the others are refused once
    lb1 has asked lb2, which holds none of them; lb1's next real edit is taken by lb2 at its
    first delivery (each used to be taken, a bound higher every time)."""
    lb1, lb2 = attacked_pair(tmp_path)
    base = status_counter(lb1)
    results = []
    for k in range(1, 6):
        forge(lb1, text(f"claim {k}"), status_counter(lb1) + BOUND)
        results.append(job(lb1))
    assert results[0] == "applied", "control: a claim within the bound is taken"
    assert lb1.live.read_text() == text("claim 1")
    assert apply.seen(lb1.ctx) <= base + BOUND, results
    next_edit_reaches(lb1, lb2)


def test_a_claim_waiting_in_staging_leaves_the_operators_edit_acceptable(tmp_path: Path) -> None:
    """A claim at exactly the bound waits in lb1's staging when the operator saves: the edit is
    numbered above it, so it wins over it on lb1, and lb2, which never saw the claim, takes the
    edit at its first delivery (after reading lb1's status, which shows it)."""
    lb1, lb2 = attacked_pair(tmp_path)
    claim = forge(lb1, text("waiting"), status_counter(lb1) + BOUND)
    next_edit_reaches(lb1, lb2)
    assert job(lb1) == "kept-local"
    assert lb1.current is not None and lb1.current.counter == claim.counter + 1


def test_the_service_asks_its_reachable_peers_and_not_the_others(tmp_path: Path) -> None:
    """The sync service's ask (the jobs' ``ask_peers``) reads each peer's status file through
    its link and gives the highest counter held; a peer its link finds unreachable is not
    asked, so that a peer gone away never holds a job for the transport's timeout."""
    svc, _ = _service(tmp_path)
    try:
        lb2, lb3 = box(tmp_path, "lb2"), box(tmp_path, "lb3")
        in_step(lb2, lb3)
        assert operator_saves(lb2, text("an edit on lb2")).result == "applied"
        assert svc.ctx.ask_peers == svc._ask_peers
        assert svc._ask_peers() == 0  # no peers yet
        near, far = FakeCarrier(lb2.ctx.staging), FakeCarrier(lb3.ctx.staging)
        views: list[PeerView] = []
        for name, carrier in (("lb2", near), ("lb3", far)):
            svc.links[name] = PeerLink(Peer(name, "192.0.2.9"), carrier, 1, 0.5, 1, views.append)
        assert svc._ask_peers() == 2
        far.up = False
        link = svc.links["lb3"]
        link.start()
        try:
            target = lb3.current
            assert target is not None
            link.set_target(target, lb3.ctx.ledger.content_path(target))
            wait_for(lambda: link.view().state is PeerState.UNREACHABLE, 5, what="unreachable")
        finally:
            link.stop()
        asked = len(far.calls)
        assert svc._ask_peers() == 2
        assert len(far.calls) == asked
    finally:
        svc.links.clear()
        svc.close()


# ---------------------------------------------------------------------------------------------
# The property. Two or three honest nodes; node 0 is the one a holder of a sync key pushes to.
# The checker is a shell test (a version containing INVALID fails it) and the reload `true`, so
# that a hundred sequences run in seconds; deciding, recording and asking are the real code's.


def _check_ok() -> CommandResult:
    return run_command(["true"], 10)


# Unconfined (the sandbox costs a namespace per check); what a version may name is still read.
FAST = ApplySettings(
    ["sh", "-c", '! grep -q INVALID "$1"', "check", "{file}"], _check_ok, 1, 10, unconfined()
)


def _held_by(node: Box) -> int | None:
    """What ``node``'s status file shows it holds, read as a peer link reads it."""
    link = PeerLink(
        Peer(node.name, "192.0.2.9"), FakeCarrier(node.ctx.staging), 1, 1, 1, lambda _: None
    )
    return link.held_now(UNIT)


@dataclass
class World:
    nodes: list[Box]
    # What each node's links last read of the peers' counters (``Context.peers_seen``), learned
    # as the service learns them.
    learned: dict[str, int] = field(default_factory=dict)
    serial: int = 0
    # The oracle's books: the highest counter of a real edit; the highest counter each node
    # has held; what was made before each version (happened-before, as sets of versions) and
    # what each node has held, with their pasts.
    real: int = 0
    held: dict[str, int] = field(default_factory=dict)
    past: dict[Version, frozenset[Version]] = field(default_factory=dict)
    knows: dict[str, frozenset[Version]] = field(default_factory=dict)

    def note(self) -> None:
        """After every step: what each node holds now goes into the oracle's books."""
        for node in self.nodes:
            v = node.current
            if v is None:
                continue
            self.held[node.name] = max(self.held.get(node.name, 0), v.counter)
            if v not in self.knows[node.name]:
                self.past.setdefault(v, frozenset())
                self.knows[node.name] |= self.past[v] | {v}

    def tag(self) -> int:
        self.serial += 1
        return self.serial

    def edit(self, i: int) -> Version:
        node = self.nodes[i]
        out = operator_saves(node, f"edit {self.tag()} on {node.name}\n")
        assert out.result == "applied" and out.version is not None, out
        self.past[out.version] = self.knows[node.name]
        self.real = max(self.real, out.version.counter)
        self.note()
        return out.version

    def forge(self, counter: int, valid: bool, origin: str) -> None:
        """A PUT into node 0's staging with any name (its true hash), as the key allows."""
        body = f"{'' if valid else 'INVALID '}forged {self.tag()}\n"
        forge(self.nodes[0], body, min(max(counter, 0), 10**16 - 1), origin)

    def job(self, i: int) -> StagedOutcome | None:
        out = apply.apply_staged(self.nodes[i].ctx, wall())
        self.note()
        return out

    def push(self, i: int, j: int, always: bool = False) -> StagedOutcome | None:
        """Node i's link to node j: it pushes what it holds unless j's status shows it needs
        nothing (``classify``), then reads j's status back and learns its counter."""
        src, dst = self.nodes[i], self.nodes[j]
        if i == j or src.current is None:
            return None
        try:
            entry = peerstatus.parse((dst.ctx.staging / STATUS).read_bytes()).get(UNIT)
        except OSError:
            entry = None
        said = classify(entry, src.current)
        out = None
        if always or said is None or not said.settled:
            out = deliver(src, dst)
            self.note()
        counter = _held_by(dst)
        if counter is not None:
            self.learned[src.name] = vouched_by(self.learned[src.name], counter)
        return out


def _world(root: Path, n: int) -> World:
    nodes = [box(root, f"lb{i + 1}") for i in range(n)]
    world = World(nodes)
    for node in nodes:
        world.learned[node.name] = 0
        world.knows[node.name] = frozenset()
        # The shell checker, and the links' learned counters; still one of the group (``box``).
        name = node.name
        node.ctx = dataclasses.replace(
            node.ctx, settings=FAST, peers_seen=lambda name=name: world.learned[name]
        )
    in_step(*nodes)
    world.real = 1
    world.note()
    return world


# Counters a forged version claims: relative to what node 0's status shows (what the key's
# holder can read), or anywhere up to what a staged name can carry (16 digits).
AHEAD = st.sampled_from([-1, 0, 1, 2, BOUND - 1, BOUND, BOUND + 1, 2 * BOUND, 5 * BOUND])
ANYWHERE = st.one_of(
    st.sampled_from([0, 1, 2**53 - 1, 2**53, TOP, 10**16 - 1]), st.integers(0, 10**16 - 1)
)
CLAIM = st.one_of(st.tuples(st.just("ahead"), AHEAD), st.tuples(st.just("at"), ANYWHERE))
ORIGIN = st.sampled_from(["mallory", "lb1", "lb2"])
STEP = st.one_of(
    st.tuples(st.just("forge"), CLAIM, st.booleans(), ORIGIN),
    # A burst, each claim in a job of its own: k at 2^53+1 (the lab's), or k climbing, each
    # a bound beyond the last claim.
    st.tuples(
        st.just("burst"), st.integers(1, 25), st.sampled_from(["top", "climb"]), st.booleans()
    ),
    st.tuples(st.just("job"), st.just(0)),
    st.tuples(st.just("edit"), st.integers(0, 2)),
    st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(0, 2)),
)


def _run(world: World, steps: list[tuple[object, ...]]) -> None:
    n = len(world.nodes)
    node0 = world.nodes[0]
    for step in steps:
        kind = step[0]
        if kind == "forge":
            (how, value), valid, origin = step[1], step[2], step[3]
            assert isinstance(value, int) and isinstance(valid, bool) and isinstance(origin, str)
            base = _held_by(node0) or 0
            world.forge(base + value if how == "ahead" else value, valid, origin)
        elif kind == "burst":
            count, how, valid = step[1], step[2], step[3]
            assert isinstance(count, int) and isinstance(valid, bool)
            claim = _held_by(node0) or 0
            for _ in range(count):
                claim = TOP if how == "top" else claim + BOUND
                world.forge(claim, valid, "lb2")
                world.job(0)
        elif kind == "job":
            world.job(0)
        elif kind == "edit":
            world.edit(int(str(step[1])) % n)
        else:
            world.push(int(str(step[1])) % n, int(str(step[2])) % n)


def _oracle(world: World) -> None:
    """Afterwards (the staged claims taken or refused): for each honest node in turn, its next
    real edit claims at most BOUND beyond the highest counter the group really made (a real
    edit, or a version another honest node held), and every honest peer takes it at its first
    delivery without calling it implausible, applying it when what the peer holds is something
    the editing node had held (an edit made after a version wins over it)."""
    node0 = world.nodes[0]
    for _ in range(100):
        if world.job(0) is None:
            break
    assert not any(p.name.startswith(UNIT + "@") for p in node0.ctx.staging.iterdir())
    for i, node in enumerate(world.nodes):
        group = max([world.real] + [c for name, c in world.held.items() if name != node.name])
        knew = world.knows[node.name]
        mine = world.edit(i)
        assert mine.counter - 1 <= group + BOUND, (
            f"{node.name}'s edit claims {mine.counter}: more than {BOUND} beyond {group}, the "
            "highest counter the group really made"
        )
        for j, peer in enumerate(world.nodes):
            if j == i:
                continue
            before = peer.current
            out = world.push(i, j, always=True)
            assert out is not None and out.received is not None
            result = out.received.result
            assert result != "implausible", (
                f"{peer.name} refused {node.name}'s real edit ({mine.counter}): "
                f"{out.received.message}"
            )
            if before in knew:
                assert result == "applied", (
                    f"{peer.name} held {before}, which {node.name} had held before its edit "
                    f"{mine}; yet it did: {result}: {out.received.message}"
                )


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3), st.lists(STEP, max_size=30))
def test_no_forged_versions_keep_a_real_edit_from_an_honest_peer(
    n: int, steps: list[tuple[object, ...]]
) -> None:
    """Whatever versions a holder of a sync key pushes into one node (any counters, any order,
    any number, valid or not), between real edits on any node and deliveries between the
    honest nodes, each honest node's next real edit stays within the bound of what the group
    really made and is taken by every honest peer at its first delivery."""
    with tempfile.TemporaryDirectory(prefix="lbwatch-counter-") as tmp:
        world = _world(Path(tmp), n)
        _run(world, steps)
        _oracle(world)
