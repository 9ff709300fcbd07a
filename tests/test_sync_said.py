"""What config sync says about each outcome, as a table: the level, and which alert goes out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lbwatch.sync import said
from lbwatch.sync.apply import LocalOutcome, StagedOutcome
from lbwatch.sync.receive import Received
from lbwatch.sync.versions import Version

WHERE = Path("/etc/haproxy/haproxy.cfg")
THEIRS = Version("haproxy.cfg", "lb2", 7, 1, "b" * 64)


def rec(result: str, message: str = "m") -> Received:
    return Received("haproxy.cfg", result, message, THEIRS, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("result", "level", "alert"),
    [
        ("applied", logging.INFO, None),
        ("adopted", logging.INFO, None),
        ("invalid", logging.ERROR, "config_invalid"),
        ("reload-failed", logging.ERROR, "reload_failed"),
        ("missing", logging.ERROR, None),
        ("unchanged", logging.DEBUG, None),
        ("superseded", logging.DEBUG, None),
    ],
)
def test_local_outcomes(result: str, level: int, alert: str | None) -> None:
    """Each local job's outcome has its level, and only a broken edit raises an alert."""
    line = said.local(LocalOutcome(result, "why", None), WHERE, "pushing to peers")  # type: ignore[arg-type]
    assert (line.level, line.alert) == (level, alert)


@pytest.mark.parametrize(
    ("result", "lost_local", "undelivered", "alerts"),
    [
        ("applied", None, False, []),
        ("applied", None, True, ["config_conflict"]),  # our undelivered edit lost
        ("applied", "haproxy.cfg.lbwatch-lost-lb1-X", False, ["config_conflict"]),
        ("kept-local", None, False, ["config_conflict"]),  # theirs lost to ours
        ("rejected", None, False, ["config_rejected"]),
        ("implausible", None, False, ["config_rejected"]),
        ("reload-failed", None, False, ["config_rejected"]),
        ("same", None, True, []),
    ],
)
def test_staged_outcomes(
    result: str, lost_local: str | None, undelivered: bool, alerts: list[str]
) -> None:
    """A received version: a conflict is reported whichever side lost, a refusal is reported,
    and the same content is no news."""
    out = StagedOutcome(rec(result), 0, lost_local=lost_local)
    lines = said.staged(out, WHERE, undelivered)
    assert [line.alert for line in lines if line.alert] == alerts


def test_the_lost_edit_is_named_in_its_alert() -> None:
    """An operator's edit replaced by a peer's version is named, with where it was kept."""
    out = StagedOutcome(rec("applied"), 0, lost_local="haproxy.cfg.lbwatch-lost-lb1-X")
    (_, conflict) = said.staged(out, WHERE, False)
    assert "kept as haproxy.cfg.lbwatch-lost-lb1-X" in conflict.text
