"""The status file a node keeps for its peers: written and read only through its model, with a
damaged or foreign entry read as absent (the sender then pushes again) and never trusted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from lbwatch.sync import peerstatus
from lbwatch.sync.peerstatus import STATUS, FileStatus, Held
from lbwatch.sync.receive import Received, write_status
from lbwatch.sync.versions import Version

DIGEST = hashlib.sha256(b"x").hexdigest()
V = Version("haproxy.cfg", "lb1", 3, 1_700_000_000_000_000_000, DIGEST)


def test_what_write_status_writes_reads_back_as_the_same_versions(tmp_path: Path) -> None:
    """An entry written for one file, then one for another, both read back with the versions
    they were written with; the first is not lost to the second."""
    write_status(tmp_path, Received("haproxy.cfg", "applied", "installed", V, V))
    write_status(tmp_path, Received("other.cfg", "current", "", None, V))
    got = peerstatus.parse((tmp_path / STATUS).read_bytes())
    assert set(got) == {"haproxy.cfg", "other.cfg"}
    first = got["haproxy.cfg"]
    assert (first.result, first.message) == ("applied", "installed")
    assert first.received == first.current == Held.of(V)
    assert first.current is not None and first.current.key() == V.key()
    assert got["other.cfg"].received is None


def test_a_file_written_before_edit_counters_reads_as_counter_0(tmp_path: Path) -> None:
    """A version without a counter (an lbwatch from before counters) is counter 0, as the
    version rule reads staged names without one."""
    old = {"file": "haproxy.cfg", "origin": "lb1", "edited_ns": 5, "digest": DIGEST}
    data = json.dumps({"haproxy.cfg": {"result": "current", "current": old, "at": 1.0}})
    entry = peerstatus.parse(data.encode())["haproxy.cfg"]
    assert entry.current is not None and entry.current.key() == (0, 5, DIGEST)


def test_damaged_or_foreign_entries_read_as_absent() -> None:
    """Not JSON, not an object, an unknown result, a bad hash, a negative counter: each such
    entry is absent; the good entry beside them is read; unknown fields are ignored."""
    assert peerstatus.parse(b"not json") == {}
    assert peerstatus.parse(b'"junk"') == {}
    good = {"result": "current", "at": 2.0, "later_field": 1}
    held = {"file": "a", "origin": "lb1", "counter": 1, "edited_ns": 1, "digest": DIGEST}
    data = {
        "good": good,
        "unknown-result": {"result": "exploded"},
        "bad-hash": {"result": "current", "current": {**held, "digest": "0" * 63}},
        "negative": {"result": "current", "current": {**held, "counter": -1}},
        "not-an-object": [1, 2],
    }
    got = peerstatus.parse(json.dumps(data).encode())
    assert got == {"good": FileStatus(result="current", at=2.0)}


def test_the_model_is_frozen() -> None:
    """A status entry read from a peer cannot be changed on the way through the sender."""
    entry = FileStatus(result="applied")
    with pytest.raises(ValidationError):
        entry.message = "x"  # type: ignore[misc]
