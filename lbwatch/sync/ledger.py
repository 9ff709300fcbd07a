"""What this node holds: the current version of each synced file, with a copy of its content,
the highest edit counter it has seen for each, and the highest it vouches for (its own edits,
and what its peers showed they hold; see ``versions``).

The record lives in ``<state_dir>/sync``: ``versions.json`` and, per file, the content of the
current version under its staged name. That copy is what gets pushed (never the live file,
which an operator may be editing at that moment), what a failed local reload is rolled back to,
and what tells an operator's edit from lbwatch's own installs. Written by the sync worker thread
only.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lbwatch.fsutil import write_atomic
from lbwatch.sync.versions import Version

FORMAT = 2


@dataclass(frozen=True)
class _Index:
    current: dict[str, Version]
    seen: dict[str, int]
    vouched: dict[str, int]


def _version(raw: Any) -> Version:
    # Entries written before counters existed have none: counter 0.
    return Version(
        str(raw["file"]),
        str(raw["origin"]),
        int(raw.get("counter", 0)),
        int(raw["edited_ns"]),
        str(raw["digest"]),
    )


def _counters(raw: Any) -> dict[str, int]:
    out = {}
    if isinstance(raw, dict):
        for name, n in raw.items():
            with contextlib.suppress(TypeError, ValueError):
                out[name] = int(n)
    return out


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "sync"
        self._index = self.dir / "versions.json"

    def _read(self) -> _Index:
        try:
            raw = json.loads(self._index.read_text())
        except (OSError, ValueError):
            return _Index({}, {}, {})
        if not isinstance(raw, dict):
            return _Index({}, {}, {})
        # Format 1 was a flat {name: version}.
        entries = raw.get("files", {}) if raw.get("format") == FORMAT else raw
        seen_raw = raw.get("seen", {}) if raw.get("format") == FORMAT else {}
        current: dict[str, Version] = {}
        if isinstance(entries, dict):
            for name, v in entries.items():
                with contextlib.suppress(TypeError, KeyError, ValueError, AttributeError):
                    current[name] = _version(v)
        seen = _counters(seen_raw)
        vouched_raw = raw.get("vouched") if raw.get("format") == FORMAT else None
        if vouched_raw is None:
            # Written before vouched counters were kept: what it had seen is all it judged by.
            held = {n: v.counter for n, v in current.items()}
            vouched = {n: max(seen.get(n, 0), held.get(n, 0)) for n in {*seen, *held}}
        else:
            vouched = _counters(vouched_raw)
        return _Index(current, seen, vouched)

    def _write(self, index: _Index) -> None:
        data = {
            "format": FORMAT,
            "files": {name: asdict(v) for name, v in sorted(index.current.items())},
            "seen": dict(sorted(index.seen.items())),
            "vouched": dict(sorted(index.vouched.items())),
        }
        write_atomic(self._index, json.dumps(data, indent=1).encode(), mode=0o600)

    def current(self, name: str) -> Version | None:
        return self._read().current.get(name)

    def seen(self, name: str) -> int:
        """The highest edit counter this node has seen for ``name`` (0: none)."""
        index = self._read()
        held = index.current.get(name)
        return max(index.seen.get(name, 0), index.vouched.get(name, 0), held.counter if held else 0)

    def vouched(self, name: str) -> int:
        """The highest edit counter this node vouches for in ``name`` (0: none): see
        ``versions.vouched_by``."""
        return self._read().vouched.get(name, 0)

    def vouch(self, name: str, counter: int) -> None:
        """Note a counter this node now vouches for (from ``versions.vouched_by``)."""
        index = self._read()
        if counter > index.vouched.get(name, 0):
            index.vouched[name] = counter
            self._write(index)

    def see(self, name: str, counter: int) -> None:
        """Note a counter seen in a received version that did not become current."""
        index = self._read()
        if counter > index.seen.get(name, 0):
            index.seen[name] = counter
            self._write(index)

    def content_path(self, version: Version) -> Path:
        path = self.dir / version.staged_name()
        if version.counter == 0 and not path.exists():
            # Recorded by an lbwatch before counters, under a name without one: renamed once.
            legacy = (
                self.dir / f"{version.file}@{version.origin}@{version.edited_ns}@{version.digest}"
            )
            with contextlib.suppress(FileNotFoundError):
                legacy.rename(path)
        return path

    def content(self, name: str) -> bytes | None:
        """The recorded content of the current version, or None (never recorded, or lost)."""
        v = self.current(name)
        if v is None:
            return None
        try:
            return self.content_path(v).read_bytes()
        except OSError:
            return None

    def record(self, version: Version, content: bytes, vouched: int | None = None) -> None:
        """Make ``version`` current; its content copy first, then the index, then the old copy
        goes: a crash in between leaves either the old or the new record complete.
        ``vouched``: what this node vouches for with it (its own edit), written with it."""
        index = self._read()
        old = index.current.get(version.file)
        write_atomic(self.content_path(version), content, mode=0o600)
        name = version.file
        index.current[name] = version
        index.seen[name] = max(index.seen.get(name, 0), version.counter)
        if vouched is not None:
            index.vouched[name] = max(index.vouched.get(name, 0), vouched)
        self._write(index)
        if old is not None and old.staged_name() != version.staged_name():
            self.content_path(old).unlink(missing_ok=True)
