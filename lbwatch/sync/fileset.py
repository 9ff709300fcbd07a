"""The files one version holds.

Without extra files a version is haproxy.cfg's content itself. With extra files (maps, ACL
lists, certificates: ``[sync] extra_files``, globs allowed) a version is a **bundle**: one
document mapping each file's absolute path to its content. haproxy.cfg and the files it names
then travel, are checked and go live together: sent one by one, a config could reach a peer
before the new map it uses and fail its check there.

A bundle names absolute paths; a receiver installs a path only if its own configuration syncs
it (the main config, or a match of one of its own extra patterns), so whatever lands in staging
cannot write anywhere else.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Protocol

from lbwatch.sync.install import ABSENT, Installed, LiveChanged, install, restore
from lbwatch.sync.watch import is_editor_junk

BUNDLE_SUFFIX = ".bundle"
# What each live file must hold when an install replaces it: its sha256, or ``ABSENT``.
Guard = Dict[Path, str]


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class FileSet:
    config: Path  # haproxy's main config: the file the checker is run on
    extra: tuple[str, ...] = ()  # absolute paths or globs

    @property
    def bundled(self) -> bool:
        return bool(self.extra)

    @property
    def unit(self) -> str:
        """The name versions of this set travel under."""
        return self.config.name + (BUNDLE_SUFFIX if self.bundled else "")

    def patterns(self) -> list[str]:
        return [str(self.config), *self.extra]

    def owns(self, path: Path) -> bool:
        if path == self.config:
            return True
        if is_editor_junk(path.name):
            return False
        return any(
            path.parent == Path(p).parent and fnmatch.fnmatchcase(path.name, Path(p).name)
            for p in self.extra
        )

    def members(self) -> list[Path]:
        """The files the set holds right now (globs expanded, junk and lbwatch's own backups
        left out)."""
        found = {self.config}
        for pattern in self.extra:
            directory = Path(pattern).parent
            with contextlib.suppress(OSError):
                found.update(
                    directory / n for n in os.listdir(directory) if self.owns(directory / n)
                )
        return sorted(p for p in found if p == self.config or p.is_file())

    def read_live(self) -> bytes:
        """The content of the set as it is on disk; OSError when the main config is missing."""
        if not self.bundled:
            return self.config.read_bytes()
        files = {}
        for path in self.members():
            try:
                files[path] = path.read_bytes()
            except OSError:
                if path == self.config:
                    raise
        return pack(files)

    def unpack(self, content: bytes) -> dict[Path, bytes]:
        """The files a version's content holds; ValueError for a malformed bundle or one that
        names a file this node does not sync."""
        if not self.bundled:
            return {self.config: content}
        files = unpack(content)
        if self.config not in files:
            raise ValueError(f"the bundle lacks {self.config}")
        for path in files:
            if not self.owns(path):
                raise ValueError(f"the bundle names {path}, which this node does not sync")
        return files


def pack(files: dict[Path, bytes]) -> bytes:
    """Deterministic: the same files give the same bytes, so the same hash, on every node."""
    doc = {str(p): base64.b64encode(c).decode("ascii") for p, c in files.items()}
    return json.dumps({"lbwatch-bundle": 1, "files": doc}, sort_keys=True).encode()


def unpack(content: bytes) -> dict[Path, bytes]:
    try:
        doc = json.loads(content)
        if not isinstance(doc, dict) or doc.get("lbwatch-bundle") != 1:
            raise ValueError("not an lbwatch bundle")
        out = {}
        for name, data in doc["files"].items():
            path = Path(name)
            if not path.is_absolute() or ".." in path.parts:
                raise ValueError(f"bad path in bundle: {name!r}")
            out[path] = base64.b64decode(data, validate=True)
        return out
    except (KeyError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed bundle: {exc}") from None


class Expect(Protocol):
    """The watcher, told about files lbwatch itself writes, so they are not taken for edits."""

    def accept(self, path: Path, content_digest: str) -> None: ...

    def forget(self, path: Path) -> None: ...


def guard_for(files: FileSet, held: bytes | None) -> Guard:
    """What an install may replace: the live files as they were read (``held``, their packed
    content; None: the main config is missing). A file they lack must not exist."""
    found = files.unpack(held) if held is not None else {}
    return {p: sha256(c) for p, c in found.items()} | {
        p: ABSENT for p in [files.config, *files.members()] if p not in found
    }


def install_all(
    files: dict[Path, bytes], keep: int, expect: Expect, guard: Guard | None = None
) -> list[Installed]:
    """Install every file whose content differs, telling the watcher first. With ``guard``, a
    live file found holding anything else undoes the installs made so far and raises
    ``LiveChanged``."""
    done: list[Installed] = []
    for path, content in sorted(files.items()):
        try:
            same = path.read_bytes() == content
        except OSError:
            same = False
        if same:
            continue
        expect.accept(path, sha256(content))
        was = None if guard is None else guard.get(path, ABSENT)
        try:
            done.append(install(content, path, keep, was=was))
        except LiveChanged:
            expect.forget(path)
            restore_all(done, expect)
            raise
    return done


def restore_all(installed: list[Installed], expect: Expect) -> None:
    """Undo ``install_all``: previous contents back, files that did not exist removed. A file
    that no longer holds what was installed (saved again meanwhile) is left as it is."""
    for done in reversed(installed):
        try:
            current = done.live.read_bytes()
        except OSError:
            current = None
        if current != done.content:
            continue
        if done.previous is None:
            expect.forget(done.live)
            # A symlinked file stays a link: what the install created was its target.
            Path(os.path.realpath(done.live)).unlink(missing_ok=True)
        else:
            expect.accept(done.live, sha256(done.previous))
            with contextlib.suppress(LiveChanged):  # saved in the last instant: theirs stays
                restore(done.live, done.previous, was=sha256(done.content))
