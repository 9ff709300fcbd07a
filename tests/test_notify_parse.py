"""keepalived's notify lines: every kind parsed, anything else rejected without an exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbwatch.notify.grammar import STATES
from lbwatch.notify.parse import LvsEvent, Malformed, VrrpEvent, parse_line


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("kind", ["INSTANCE", "GROUP"])
def test_every_vrrp_state(kind: str, state: str) -> None:
    """INSTANCE and GROUP lines with each state keepalived writes."""
    assert parse_line(f'{kind} "VI 1" {state} 100'.encode()) == VrrpEvent(kind, "VI 1", state, 100)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'INSTANCE "VI_1" MASTER 100', VrrpEvent("INSTANCE", "VI_1", "MASTER", 100)),
        (b'GROUP "G1" FAULT 0', VrrpEvent("GROUP", "G1", "FAULT", 0)),
        (b'INSTANCE "VI_1" BACKUP', VrrpEvent("INSTANCE", "VI_1", "BACKUP", None)),
        (b'SCRIPT GROUP "G1" MASTER 7', VrrpEvent("GROUP", "G1", "MASTER", 7, "script")),
        (b'INSTANCE "VI_1" MASTER 100\r', VrrpEvent("INSTANCE", "VI_1", "MASTER", 100)),
        (b"VS [192.0.2.10]:tcp:80 UP", LvsEvent("VS", "[192.0.2.10]:tcp:80", None, True)),
        (b"VS FWM 7 DOWN", LvsEvent("VS", "FWM 7", None, False)),
        (
            b"RS [192.0.2.20]:tcp:80 [192.0.2.10]:tcp:80 DOWN",
            LvsEvent("RS", "[192.0.2.20]:tcp:80", "[192.0.2.10]:tcp:80", False),
        ),
    ],
)
def test_line_kinds(line: bytes, expected: object) -> None:
    """Each documented line kind becomes its frozen event."""
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"hello",
        b"INSTANCE VI_1 MASTER 100",
        b'INSTANCE "VI_1" LEADER 100',
        b'INSTANCE "VI_1" MASTER high',
        b'INSTANCE "" MASTER 100',
        b'INSTANCE "a\x1bb" MASTER 100',
        'INSTANCE "a\u2028b" MASTER 100'.encode(),
        'INSTANCE "a\x85b" MASTER 100'.encode(),
        b'INSTANCE "VI_1" MASTER 100 extra',
        b"VS [192.0.2.10]:tcp:80 SIDEWAYS",
        b"RS [192.0.2.20]:tcp:80 UP",
        b"SCRIPT VS [192.0.2.10]:tcp:80 UP",
        b'SCRIPT SCRIPT INSTANCE "VI_1" MASTER 1',
        b"\xff\xfe",
        b"INSTANCE " + b"x" * 5000,
    ],
)
def test_malformed_lines(line: bytes) -> None:
    """Garbage, unknown states, control characters, truncated lines: Malformed, with a reason."""
    result = parse_line(line)
    assert isinstance(result, Malformed) and result.why


@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    """No input makes the parser raise; what it accepts has a known state and a clean name."""
    result = parse_line(raw)
    if isinstance(result, VrrpEvent):
        assert result.state in STATES
        assert all(c.isprintable() for c in result.name)
    assert isinstance(result, (VrrpEvent, LvsEvent, Malformed))


@given(st.text(min_size=1, max_size=50), st.sampled_from(sorted(STATES)), st.integers(0, 255))
def test_round_trip(name: str, state: str, prio: int) -> None:
    """A well-formed event written as a line parses back to itself (or is refused whole)."""
    event = VrrpEvent("INSTANCE", name, state, prio)
    parsed = parse_line(event.line().encode())
    assert parsed == event or isinstance(parsed, Malformed)
