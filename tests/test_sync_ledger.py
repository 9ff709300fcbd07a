"""What a node records: the current version, its content, and the highest counter seen."""

from __future__ import annotations

import json
from pathlib import Path

from lbwatch.sync.ledger import Ledger
from lbwatch.sync.versions import Version

A = "a" * 64


def test_record_and_see_raise_the_high_water_mark(tmp_path: Path) -> None:
    """Recording a version and seeing a higher counter both raise what the node has seen; a
    lower counter never lowers it."""
    ledger = Ledger(tmp_path)
    ledger.record(Version("haproxy.cfg", "lb1", 3, 1, A), b"x")
    assert ledger.seen("haproxy.cfg") == 3
    ledger.see("haproxy.cfg", 9)
    ledger.see("haproxy.cfg", 4)
    assert ledger.seen("haproxy.cfg") == 9
    assert ledger.current("haproxy.cfg") == Version("haproxy.cfg", "lb1", 3, 1, A)
    assert Ledger(tmp_path).seen("haproxy.cfg") == 9  # on disk


def test_index_written_before_counters_reads_as_counter_zero(tmp_path: Path) -> None:
    """An index from lbwatch before counters (a flat name -> version map) is read: its version
    has counter 0, so the first edit after the upgrade wins over it."""
    (tmp_path / "sync").mkdir()
    old = {"haproxy.cfg": {"file": "haproxy.cfg", "origin": "lb1", "edited_ns": 5, "digest": A}}
    (tmp_path / "sync" / "versions.json").write_text(json.dumps(old))
    ledger = Ledger(tmp_path)
    assert ledger.current("haproxy.cfg") == Version("haproxy.cfg", "lb1", 0, 5, A)
    assert ledger.seen("haproxy.cfg") == 0


def test_vouched_moves_only_with_own_versions_and_what_it_is_told(tmp_path: Path) -> None:
    """What the node vouches for rises with a version recorded as its own and with ``vouch``;
    a received version recorded, or a counter merely seen, raises what it has seen but not
    what it vouches for; both are kept on disk."""
    ledger = Ledger(tmp_path)
    ledger.record(Version("haproxy.cfg", "lb1", 3, 1, A), b"x", vouched=3)
    assert ledger.vouched("haproxy.cfg") == 3
    ledger.record(Version("haproxy.cfg", "lb2", 900, 2, A), b"y")
    ledger.see("haproxy.cfg", 1_000_003)
    assert ledger.seen("haproxy.cfg") == 1_000_003
    assert ledger.vouched("haproxy.cfg") == 3
    ledger.vouch("haproxy.cfg", 40)
    ledger.vouch("haproxy.cfg", 7)
    assert Ledger(tmp_path).vouched("haproxy.cfg") == 40
    assert Ledger(tmp_path).seen("haproxy.cfg") == 1_000_003


def test_index_written_before_vouched_counters_vouches_for_what_it_had_seen(
    tmp_path: Path,
) -> None:
    """An index from lbwatch before vouched counters were kept vouches for the counter it had
    seen (all that lbwatch judged claims by), so an upgraded node judges as it did."""
    (tmp_path / "sync").mkdir()
    v = {"file": "haproxy.cfg", "origin": "lb1", "counter": 5, "edited_ns": 5, "digest": A}
    old = {"format": 2, "files": {"haproxy.cfg": v}, "seen": {"haproxy.cfg": 12}}
    (tmp_path / "sync" / "versions.json").write_text(json.dumps(old))
    assert Ledger(tmp_path).vouched("haproxy.cfg") == 12
