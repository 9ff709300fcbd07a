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
