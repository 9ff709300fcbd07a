"""The convergence rule and staged names, as pure functions and properties."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.sync.versions import (
    MAX_AHEAD,
    MAX_COUNTER,
    Verdict,
    Version,
    current_after,
    edit,
    implausible,
    judge,
    newer,
    parse_staged_name,
    seen_after,
    vouched_by,
)

A = "a" * 64
B = "b" * 64


def v(counter: int, digest: str = A, origin: str = "lb1", edited: int = 0) -> Version:
    return Version("haproxy.cfg", origin, counter, edited, digest)


def test_staged_name_round_trip() -> None:
    """A version written into a staged name reads back as itself."""
    version = v(17, edited=1_700_000_000_123_456_789)
    assert version.staged_name() == f"haproxy.cfg@lb1@c17@1700000000123456789@{A}"
    assert parse_staged_name(version.staged_name()) == version


def test_name_without_counter_reads_as_counter_zero() -> None:
    """A name written by lbwatch before counters reads as counter 0, so any edit made since
    wins over it."""
    old = parse_staged_name(f"haproxy.cfg@lb1@1700000000123456789@{A}")
    assert old == v(0, edited=1_700_000_000_123_456_789)
    assert newer(v(1, edited=1), old)


def test_foreign_names_ignored() -> None:
    """rsync temporaries and other files in staging are not versions."""
    for name in (
        ".haproxy.cfg@lb1@c1@1@" + A + ".Xy12ab",
        "status.json",
        "haproxy.cfg",
        "haproxy.cfg@lb1@c1@1@" + "g" * 64,
        "../x@lb1@c1@1@" + A,
        "haproxy.cfg@lb 1@c1@1@" + A,
        "haproxy.cfg@lb1@c12345678901234567@1@" + A,
        "haproxy.cfg@lb1@c-1@1@" + A,
    ):
        assert parse_staged_name(name) is None, name


def test_counter_wins_over_wall_time() -> None:
    """The higher counter wins whatever the edit times say; wall time decides only between
    equal counters, then the larger hash."""
    assert newer(v(2, edited=1), v(1, edited=10**18))
    assert newer(v(5, edited=2), v(5, edited=1))
    assert newer(v(5, B, edited=1), v(5, A, edited=1))
    assert not newer(v(5, A, edited=1), v(5, B, edited=1))


def test_an_edit_exceeds_everything_seen() -> None:
    """An edit takes a counter above the highest one the node has seen, so it wins over every
    version the node knew of, whatever their clocks claimed."""
    seen = 41
    mine = edit("haproxy.cfg", "lb1", seen, 0, B)
    assert mine.counter == 42 and newer(mine, v(41, edited=2**62))


def test_judge() -> None:
    """Apply what wins, keep ours when it wins, ignore what we already have."""
    assert judge(None, v(1), 0) is Verdict.APPLY
    assert judge(v(1, A), v(2, B), 1) is Verdict.APPLY
    assert judge(v(3, A), v(2, B), 3) is Verdict.KEEP_LOCAL
    assert judge(v(3, A), v(9, A, origin="lb2"), 3) is Verdict.SAME
    assert current_after(v(3, A), v(9, A, origin="lb2"), 3) == v(9, A, origin="lb2")


def test_claims_beyond_the_bound_are_refused_and_count_for_nothing() -> None:
    """A version more than MAX_AHEAD edits beyond what this node vouches for, or past the
    absolute maximum, is refused and leaves the node's counter where it was, however many
    arrive; within the bound it is a normal version, counted whole (positive control)."""
    vouched = seen = 10
    within = v(vouched + MAX_AHEAD, B, origin="evil")
    assert judge(v(seen), within, vouched) is Verdict.APPLY
    assert seen_after(seen, within, vouched) == vouched + MAX_AHEAD
    for claim in (v(vouched + MAX_AHEAD + 1, B), v(MAX_COUNTER + 1, B), v(2**60, B)):
        assert implausible(claim.counter, vouched) is not None
        assert judge(v(seen), claim, vouched) is Verdict.IMPLAUSIBLE
        assert current_after(v(seen), claim, vouched) == v(seen)
        assert seen_after(seen, claim, vouched) == seen


def test_only_peers_status_and_own_edits_raise_what_a_node_vouches_for() -> None:
    """What a node vouches for moves with a counter a peer's status showed (taken as it is,
    leaving room below the maximum for the edits that follow), never with a claim; so claims,
    in any number, keep the node's next edit within one of what a peer vouching as much takes
    at once (the edge: a claim at exactly the bound was taken)."""
    assert vouched_by(10, 3_000_000) == 3_000_000
    assert vouched_by(10, 5) == 10
    assert vouched_by(10, MAX_COUNTER) == MAX_COUNTER - MAX_AHEAD
    vouched, seen = 10, 10
    for counter in (vouched + MAX_AHEAD, vouched + MAX_AHEAD - 1, 2**53 + 1, 7):
        seen = seen_after(seen, v(counter), vouched)
    mine = edit("haproxy.cfg", "lb1", seen, 0, A)
    assert mine.counter == vouched + MAX_AHEAD + 1
    assert implausible(mine.counter - 1, vouched) is None


# ---------------------------------------------------------------------------------------------
# The property: any interleaving of edits and deliveries between 2-3 nodes with arbitrary clock
# offsets converges, and an edit made after seeing the others wins; also with versions pushed by
# someone holding a sync key (claims within the bound) and nodes that lost their state.
#
# The nodes below run the real rule (edit, current_after, seen_after, implausible, vouched_by),
# and deliver what they hold, as the peer links do; a node asks its peers what they hold before
# it refuses a claim, as ``apply`` does. The oracle is separate and knows nothing of counters or
# clocks: it tracks what each node had seen when each version was made (happened-before, as
# sets of version ids) and checks the outcome against that alone.

CONTENTS = [A, B, "c" * 64, "d" * 64]


@dataclass
class SimNode:
    name: str
    offset_ns: int
    current: Version | None = None
    seen: int = 0
    vouched: int = 0
    knows: frozenset[int] = frozenset()  # oracle: version ids this node has seen (or made)


@dataclass
class Cluster:
    nodes: list[SimNode]
    inflight: list[tuple[int, int, Version]] = field(default_factory=list)  # (from, to, version)
    past: dict[Version, frozenset[int]] = field(default_factory=dict)  # oracle: causal past
    ids: dict[Version, int] = field(default_factory=dict)
    now_ns: int = 0

    def _made(self, node: SimNode, version: Version, past: frozenset[int]) -> None:
        self.ids.setdefault(version, len(self.ids))
        self.past.setdefault(version, past)

    def edit(self, i: int, content: str) -> None:
        node = self.nodes[i]
        self.now_ns += 1_000_000_000
        if node.current is not None and node.current.digest == content:
            return  # saved without a change: not an edit
        mine = edit("haproxy.cfg", node.name, node.seen, self.now_ns + node.offset_ns, content)
        self._made(node, mine, node.knows)
        node.knows |= {self.ids[mine]}
        node.current, node.seen = mine, mine.counter
        node.vouched = vouched_by(node.vouched, mine.counter)
        self.push_from(i)

    def claim(self, i: int, content: str, ahead: int) -> None:
        """Someone with a sync key pushes a version claiming ``ahead`` edits and a far-future
        time straight into node ``i``'s staging."""
        node = self.nodes[i]
        forged = Version("haproxy.cfg", "mallory", node.seen + ahead, 2**62, content)
        self._made(node, forged, frozenset())
        self.inflight.append((-1, i, forged))

    def wipe(self, i: int) -> None:
        """Node ``i`` loses its state directory: at start-up it records its live file afresh."""
        node = self.nodes[i]
        if node.current is None:
            return
        self.now_ns += 1_000_000_000
        node.seen, node.vouched, node.knows = 0, 0, frozenset()
        fresh = edit("haproxy.cfg", node.name, 0, self.now_ns + node.offset_ns, node.current.digest)
        self._made(node, fresh, frozenset())
        node.knows = frozenset({self.ids[fresh]})
        node.current, node.seen, node.vouched = fresh, fresh.counter, fresh.counter
        self.push_from(i)

    def push_from(self, i: int) -> None:
        """A node delivers the version it holds to every peer whose status shows neither a
        later version nor the same content reached by as many edits, as the peer links do
        (``peers.classify``)."""
        cur = self.nodes[i].current
        if cur is None:
            return
        for j, peer in enumerate(self.nodes):
            held = peer.current
            if j == i or (
                held is not None
                and (
                    held.counter >= cur.counter
                    if held.digest == cur.digest
                    else held.key() > cur.key()
                )
            ):
                continue
            self.inflight.append((i, j, cur))

    def deliver(self, k: int) -> None:
        sender, to, version = self.inflight.pop(k % len(self.inflight))
        node = self.nodes[to]
        before = node.current
        node.knows |= self.past[version] | {self.ids[version]}
        if implausible(version.counter, node.vouched) is not None:
            # Before refusing it, the node reads its peers' status files: what they hold.
            for peer in self.nodes:
                if peer is not node and peer.current is not None:
                    node.vouched = vouched_by(node.vouched, peer.current.counter)
            node.seen = max(node.seen, node.vouched)
        node.current = current_after(node.current, version, node.vouched)
        node.seen = seen_after(node.seen, version, node.vouched)
        if sender >= 0 and node.current is not None:
            # The sender reads the peer's status back: what it holds is vouched for, and seen.
            src = self.nodes[sender]
            src.vouched = vouched_by(src.vouched, node.current.counter)
            src.seen = max(src.seen, src.vouched)
            src.knows |= self.past[node.current] | {self.ids[node.current]}
        if node.current != before:
            self.push_from(to)

    def settle(self) -> None:
        for _ in range(50):
            while self.inflight:
                self.deliver(0)
            if len({n.current.digest if n.current else None for n in self.nodes}) == 1:
                return
            for i in range(len(self.nodes)):
                self.push_from(i)
        raise AssertionError("did not converge")


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("edit"), st.integers(0, 2), st.sampled_from(CONTENTS)),
        st.tuples(st.just("deliver"), st.integers(0, 50), st.just("")),
    ),
    max_size=30,
)
FAULTS = st.lists(
    st.one_of(
        OPS,
        st.tuples(st.just("claim"), st.integers(0, 2), st.sampled_from(CONTENTS)).map(
            lambda t: [t]
        ),
        st.tuples(st.just("wipe"), st.integers(0, 2), st.just("")).map(lambda t: [t]),
    ),
    max_size=6,
).map(lambda chunks: [op for chunk in chunks for op in chunk])
OFFSETS = st.lists(st.integers(-(10**13), 10**13), min_size=3, max_size=3)


def _run(n: int, offsets: list[int], ops: list[tuple[str, int, str]], ahead: int) -> Cluster:
    cluster = Cluster([SimNode(f"lb{i + 1}", offsets[i]) for i in range(n)])
    for op, arg, content in ops:
        if op == "edit":
            cluster.edit(arg % n, content)
        elif op == "claim":
            cluster.claim(arg % n, content, ahead)
        elif op == "wipe":
            cluster.wipe(arg % n)
        elif cluster.inflight:
            cluster.deliver(arg)
    cluster.settle()
    return cluster


def _check(cluster: Cluster) -> None:
    """The oracle: one content everywhere, that of a version nothing was made after; and if one
    edit was made after seeing every other version, its content."""
    final = {node.current.digest if node.current else None for node in cluster.nodes}
    assert len(final) == 1
    (winner,) = final
    if winner is None:
        return
    made = list(cluster.ids)
    superseded = {e for e in made for later in made if cluster.ids[e] in cluster.past[later]}
    maximal = [e for e in made if e not in superseded]
    assert winner in {e.digest for e in maximal}
    everything = set(cluster.ids.values())
    after_all = [e for e in made if everything - {cluster.ids[e]} <= cluster.past[e]]
    if after_all:
        assert winner == after_all[0].digest


@settings(max_examples=400, deadline=None)
@given(st.integers(2, 3), OFFSETS, OPS)
def test_any_interleaving_converges_on_an_edit_nothing_came_after(
    n: int, offsets: list[int], ops: list[tuple[str, int, str]]
) -> None:
    """Whatever the clock offsets and the order of edits and deliveries, all nodes end on the
    same content; no edit that another edit was made after (having seen it) wins; and an edit
    made after seeing every other edit is the one that wins."""
    _check(_run(n, offsets, ops, 0))


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 3), OFFSETS, FAULTS, st.sampled_from([1, 500, MAX_AHEAD]))
def test_claims_and_lost_state_still_converge_and_later_edits_win(
    n: int, offsets: list[int], ops: list[tuple[str, int, str]], ahead: int
) -> None:
    """With forged versions claiming many edits and the year 2100 (within the bound), and nodes
    that lost their state and record their file afresh, the same holds: one content everywhere,
    and an edit made after seeing everything wins over every claim."""
    _check(_run(n, offsets, ops, ahead))
