"""Watch haproxy's configuration files for content changes, whatever way they are saved.

inotify watches the files' **directories**, not the files: an editor or tool that saves by
writing a new file and renaming it over the old one (vim, emacs, ``sed -i``, rsync, ``mv``)
replaces the inode a file watch would sit on. Raw kernel events only mark a path dirty; once it
has been quiet for ``debounce`` seconds (at once for a file renamed into place, which is whole
when it lands) its content is hashed, and only a new hash is a change, so bursts coalesce and a
save that changes nothing is nothing. A file that disappears is
reported as deleted (and never propagated as a deletion by the caller). Queue overflow and a
replaced directory lead to a rescan of everything watched.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import inotify_simple

log = logging.getLogger(__name__)
F = inotify_simple.flags
DIR_MASK = (
    F.CLOSE_WRITE
    | F.MOVED_TO
    | F.MOVED_FROM
    | F.CREATE
    | F.DELETE
    | F.MODIFY
    | F.DELETE_SELF
    | F.MOVE_SELF
)
# Names editors and tools use for swap, backup, lock and temporary files (vim, emacs, nano,
# kate, dpkg, rsync's in-flight copies). A pattern like "*.map" could otherwise match them.
EDITOR_JUNK = (
    ".*.sw?",
    "*~",
    ".#*",
    "#*#",
    "*.tmp",
    "4913",
    ".*.kate-swp",
    "*.dpkg-*",
    "*.rpmnew",
    "*.rpmsave",
    ".~lock.*",
    ".*.??????",
    "*.lbwatch-*",  # lbwatch's own backups, kept versions and temporary files
)


def is_editor_junk(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EDITOR_JUNK)


def digest(path: Path) -> str | None:
    """sha256 of the file's content, or None when it is not a readable regular file."""
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 16), b""):
                h.update(chunk)
            return h.hexdigest()
    except OSError:
        return None


class Change(str, enum.Enum):
    CHANGED = "changed"  # new content (or the file appeared)
    DELETED = "deleted"


@dataclass(frozen=True)
class FileChange:
    path: Path
    kind: Change
    digest: str | None  # the new content's sha256; None when deleted


class ConfigWatcher:
    """Feed it ``on_readable()`` when its fd is readable; ask ``due()`` when to call
    ``collect(now)``, which returns the settled changes."""

    def __init__(
        self,
        patterns: Iterable[str],
        debounce: float = 0.2,
        ignore: Callable[[str], bool] = is_editor_junk,
    ) -> None:
        self.patterns = [Path(p) for p in patterns]
        self.debounce = debounce
        self.ignore = ignore
        self._inotify = inotify_simple.INotify()
        self._wds: dict[int, Path] = {}  # watch descriptor -> directory
        self._dirty: dict[Path, float] = {}  # path -> time of its last raw event
        self._known: dict[Path, str] = {}  # path -> last content hash
        self._rescan_at: float | None = None
        self.overflows = 0
        for directory in sorted({p.parent for p in self.patterns}):
            self._watch(directory)
        for path in self.files():
            h = digest(path)
            if h is not None:
                self._known[path] = h

    def fileno(self) -> int:
        return int(self._inotify.fileno())

    def files(self) -> list[Path]:
        """The files the patterns name right now (globs expanded, junk left out)."""
        out: set[Path] = set()
        for pattern in self.patterns:
            if any(c in pattern.name for c in "*?["):
                try:
                    names = os.listdir(pattern.parent)
                except OSError:
                    continue
                out.update(
                    pattern.parent / n
                    for n in names
                    if fnmatch.fnmatchcase(n, pattern.name) and not self.ignore(n)
                )
            else:
                out.add(pattern)
        return sorted(out)

    def known(self) -> dict[Path, str]:
        return dict(self._known)

    def _matches(self, path: Path) -> bool:
        if self.ignore(path.name):
            return False
        return any(
            path.parent == p.parent and fnmatch.fnmatchcase(path.name, p.name)
            for p in self.patterns
        )

    def _watch(self, directory: Path) -> bool:
        try:
            wd = self._inotify.add_watch(directory, DIR_MASK)
        except OSError:
            return False
        self._wds[wd] = directory
        return True

    def on_readable(self, now: float) -> None:
        for event in self._inotify.read(timeout=0):
            if event.mask & F.Q_OVERFLOW:
                # The kernel dropped events: look at everything again.
                self.overflows += 1
                self._schedule_rescan(now)
                continue
            directory = self._wds.get(event.wd)
            if directory is None:
                continue
            if event.mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
                # The directory itself went away or was replaced: watch the path again.
                del self._wds[event.wd]
                self._schedule_rescan(now)
                continue
            if event.name:
                path = directory / event.name
                if self._matches(path):
                    # A file renamed into place arrives whole (sed -i, mv, rsync, dpkg,
                    # configuration management): it is due at once. Writes in place (cp, shell
                    # redirects, nano, vim's default) wait for ``debounce`` of quiet.
                    moved_in = bool(event.mask & F.MOVED_TO)
                    self._dirty[path] = now - self.debounce if moved_in else now

    def _schedule_rescan(self, now: float) -> None:
        self._rescan_at = now

    def rescan(self, now: float) -> None:
        """Re-add missing directory watches and mark every watched file dirty."""
        watched = set(self._wds.values())
        for directory in sorted({p.parent for p in self.patterns} - watched):
            if not self._watch(directory):
                log.warning("cannot watch %s (missing?); will retry", directory)
        for path in [*self.files(), *self._known]:
            self._dirty[path] = now
        self._rescan_at = None

    def due(self) -> float | None:
        """When the earliest pending path will have settled."""
        times = [t + self.debounce for t in self._dirty.values()]
        if self._rescan_at is not None:
            times.append(self._rescan_at)
        return min(times) if times else None

    def collect(self, now: float) -> list[FileChange]:
        if self._rescan_at is not None and now >= self._rescan_at:
            self.rescan(now)
        changes = []
        for path, last in sorted(self._dirty.items()):
            if now < last + self.debounce:
                continue
            del self._dirty[path]
            new = digest(path)
            old = self._known.get(path)
            if new == old:
                continue  # rewritten with the same content, or a burst that ended as it began
            if new is None:
                del self._known[path]
                changes.append(FileChange(path, Change.DELETED, None))
            else:
                self._known[path] = new
                changes.append(FileChange(path, Change.CHANGED, new))
        return changes

    def accept(self, path: Path, content_digest: str) -> None:
        """Record ``content_digest`` as known for ``path`` without reporting it: for a file that
        lbwatch itself installed (a config received from a peer), so it is not taken for an edit."""
        self._known[path] = content_digest

    def forget(self, path: Path) -> None:
        """``path`` is about to be removed by lbwatch itself (an install rolled back): its
        disappearance is not a deletion to report."""
        self._known.pop(path, None)

    def close(self) -> None:
        self._inotify.close()
