"""The convergence rule and staged names, as pure functions and properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lbwatch.sync.versions import (
    Verdict,
    Version,
    current_after,
    judge,
    newer,
    parse_staged_name,
)

A = "a" * 64
B = "b" * 64


def v(edited: int, digest: str = A, origin: str = "lb1") -> Version:
    return Version("haproxy.cfg", origin, edited, digest)


def test_staged_name_round_trip() -> None:
    """A version written into a staged name reads back as itself."""
    version = v(1_700_000_000_123_456_789)
    assert parse_staged_name(version.staged_name()) == version


def test_foreign_names_ignored() -> None:
    """rsync temporaries and other files in staging are not versions."""
    for name in (
        ".haproxy.cfg@lb1@1@" + A + ".Xy12ab",
        "status.json",
        "haproxy.cfg",
        "haproxy.cfg@lb1@1@" + "g" * 64,
        "../x@lb1@1@" + A,
        "haproxy.cfg@lb 1@1@" + A,
    ):
        assert parse_staged_name(name) is None, name


def test_later_edit_wins_then_larger_hash() -> None:
    """Later edit time wins; at the same time the larger content hash does."""
    assert newer(v(2), v(1)) and not newer(v(1), v(2))
    assert newer(v(5, B), v(5, A)) and not newer(v(5, A), v(5, B))


def test_judge() -> None:
    """Apply what wins, keep ours when it wins, ignore what we already have."""
    assert judge(None, v(1)) is Verdict.APPLY
    assert judge(v(1, A), v(2, B)) is Verdict.APPLY
    assert judge(v(3, A), v(2, B)) is Verdict.KEEP_LOCAL
    assert judge(v(3, A), v(9, A, origin="lb2")) is Verdict.SAME
    assert current_after(v(3, A), v(9, A, origin="lb2")) == v(9, A, origin="lb2")


VERSIONS = st.builds(
    Version,
    st.just("haproxy.cfg"),
    st.sampled_from(["lb1", "lb2", "lb3"]),
    st.integers(0, 5),
    st.sampled_from([A, B, "c" * 64]),
)


@given(st.lists(VERSIONS, min_size=1, max_size=6), st.permutations(range(6)))
def test_any_delivery_order_converges(versions: list[Version], order: list[int]) -> None:
    """Nodes that each receive every version, in any order, end on the same content: the
    winner under the rule, whatever order the pushes arrive in."""

    def settle(seq: list[Version]) -> str:
        current: Version | None = None
        for incoming in seq:
            current = current_after(current, incoming)
        assert current is not None
        return current.digest

    shuffled = [versions[i] for i in order if i < len(versions)]
    assert settle(versions) == settle(shuffled) == max(versions, key=Version.key).digest
