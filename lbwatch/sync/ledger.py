"""What this node holds: the current version of each synced file, with a copy of its content.

The record lives in ``<state_dir>/sync``: ``versions.json`` (file name -> Version) and, per
file, the content of the current version under its staged name. That copy is what gets pushed
(never the live file, which an operator may be editing at that moment) and what a failed local
reload is rolled back to. Written by the sync worker thread only.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

from lbwatch.fsutil import write_atomic
from lbwatch.sync.versions import Version


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "sync"
        self._index = self.dir / "versions.json"

    def _read(self) -> dict[str, Version]:
        try:
            raw = json.loads(self._index.read_text())
        except (OSError, ValueError):
            return {}
        out = {}
        if isinstance(raw, dict):
            for name, v in raw.items():
                with contextlib.suppress(TypeError, KeyError):
                    out[name] = Version(v["file"], v["origin"], int(v["edited_ns"]), v["digest"])
        return out

    def current(self, name: str) -> Version | None:
        return self._read().get(name)

    def content_path(self, version: Version) -> Path:
        return self.dir / version.staged_name()

    def content(self, name: str) -> bytes | None:
        """The recorded content of the current version, or None (never recorded, or lost)."""
        v = self.current(name)
        if v is None:
            return None
        try:
            return self.content_path(v).read_bytes()
        except OSError:
            return None

    def record(self, version: Version, content: bytes) -> None:
        """Make ``version`` current; its content copy first, then the index, then the old copy
        goes: a crash in between leaves either the old or the new record complete."""
        old = self.current(version.file)
        write_atomic(self.content_path(version), content, mode=0o600)
        index = self._read()
        index[version.file] = version
        data = {name: asdict(v) for name, v in sorted(index.items())}
        write_atomic(self._index, json.dumps(data, indent=1).encode(), mode=0o600)
        if old is not None and old.staged_name() != version.staged_name():
            self.content_path(old).unlink(missing_ok=True)
