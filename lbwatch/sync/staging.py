"""Keeping the staging directory clean: anything in it that is not a version in flight is
removed after a grace period.

Peers push into staging through lbwatch's receiver (``sink``; or rsync, for a key still on
rrsync): a push is written to an unnamed file linked in as the version's name,
``haproxy.cfg@NODE@cN@NS@SHA256``, once whole (or, where the filesystem cannot, a temporary dot
file ``.NAME.recv-PID-XXXX``; rsync's is ``.NAME.XXXXXX``), which the next sync job takes and
removes. What stays behind is litter: temporary dot files of pushes cut off (a receiver without
O_TMPFILE killed mid-write, rsync), versions superseded while the node was paused, anything a
holder of a key still on rrsync put there (the receiver refuses names of files this node does
not sync, and its quota bounds the rest: ``slots``). Nothing else removes them. The receivers'
own directory (``.receiver``: what they may take, their session slots) and the versions that
lost to this node's own (``.kept``, pruned by the receiving job) are lbwatch's and kept.

``stale`` decides, from names, kinds and change times (pure); ``Sweeper.sweep`` acts, on the
directory only: it never follows a symlink (a link is removed as a link), never descends into a
directory (an empty one is removed, a non-empty one is left and reported once: lbwatch never
puts directories there, and removing a tree would be unbounded work on the event loop), and
touches nothing outside staging (every call is relative to the directory's open descriptor).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from lbwatch.config import Config
from lbwatch.sync.fileset import FileSet
from lbwatch.sync.limits import DIR
from lbwatch.sync.peerstatus import STATUS
from lbwatch.sync.sink import NODE
from lbwatch.sync.versions import Version, newer, parse_staged_name

log = logging.getLogger(__name__)

# Received versions that lost to this node's own, kept for the operator (sync/receive.py): in
# staging, where no later config may name them, and pruned to [sync] backups there.
KEPT = ".kept"

Kind = Literal["file", "dir", "other"]  # other: a symlink, FIFO, socket or device


class Entry(NamedTuple):
    name: str
    kind: Kind
    # The later of mtime and ctime (wall clock): rsync with --times, or a writer of the sync
    # key, may set an old mtime on a file just written, but not its ctime.
    changed: float


def stale(entries: Iterable[Entry], unit: str, now: float, grace: float) -> list[Entry]:
    """What to remove: everything unchanged for ``grace`` seconds, except the status file and
    the node view the peers read, the receivers' directory (``limits``, ``slots``), the
    versions kept for the operator (``KEPT``), and the
    newest staged version of ``unit``, which waits for its sync job however long that takes (a
    maintenance pause holds it; older ones the job would drop anyway)."""
    entries = list(entries)
    newest: tuple[Version, Entry] | None = None
    for e in entries:
        v = parse_staged_name(e.name) if e.kind == "file" else None
        if v is not None and v.file == unit and (newest is None or newer(v, newest[0])):
            newest = (v, e)
    keep = {STATUS, NODE, DIR, KEPT, newest[1].name if newest else STATUS}
    # An entry changed "in the future" (a wall-clock step back) is young: kept.
    return [e for e in entries if e.name not in keep and now - e.changed >= grace]


def _kind(mode: int) -> Kind:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


def shared_with(staging: Path, own: Sequence[Path]) -> Path | None:
    """The first of ``own`` (lbwatch's state, the live config's directory, ...) that is
    ``staging`` or lies inside it; sweeping such a directory would remove what is not ours."""
    where = Path(os.path.realpath(staging))
    for path in own:
        p = Path(os.path.realpath(path))
        if p == where or where in p.parents:
            return path
    return None


class Sweeper:
    """Removes what ``stale`` names from ``staging``; called at each rescan of the agent."""

    def __init__(self, staging: Path, unit: str, grace: float, own: Sequence[Path] = ()) -> None:
        self.staging = staging
        self.unit = unit
        self.grace = grace
        self._warned: set[str] = set()
        self.shared = shared_with(staging, own)
        if self.shared is not None:
            log.error(
                "staging directory %s also holds %s: it is not cleaned; give [sync] staging_dir "
                "a directory of its own",
                staging,
                self.shared,
            )

    def sweep(self, now: float) -> list[str]:
        """Remove the stale entries (``now``: wall clock, as the change times are); the names
        removed."""
        if self.shared is not None:
            return []
        try:
            fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return []  # not there (yet): nothing to clean
        try:
            entries = []
            for name in os.listdir(fd):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                entries.append(Entry(name, _kind(st.st_mode), max(st.st_mtime, st.st_ctime)))
            self._warned &= {e.name for e in entries}
            gone = stale(entries, self.unit, now, self.grace)
            return [e.name for e in gone if self._remove(fd, e)]
        finally:
            os.close(fd)

    def _remove(self, fd: int, entry: Entry) -> bool:
        try:
            if entry.kind == "dir":
                os.rmdir(entry.name, dir_fd=fd)
            else:
                os.unlink(entry.name, dir_fd=fd)  # a symlink itself, never its target
        except FileNotFoundError:
            return False
        except OSError as exc:
            if entry.name not in self._warned:
                self._warned.add(entry.name)
                log.warning(
                    "staging: cannot remove %s from %s: %s", entry.name, self.staging, exc.strerror
                )
            return False
        log.info(
            "staging: removed %s%s: unchanged for over %g s and not a version in flight",
            entry.name,
            "/" if entry.kind == "dir" else "",
            self.grace,
        )
        return True


def sweeper_for(cfg: Config, files: FileSet) -> Sweeper:
    """The sweeper of this node's staging directory, refusing to clean one that also holds
    lbwatch's own state, the synced files or the ssh sockets."""
    own = [
        cfg.agent.state_dir,
        cfg.agent.run_dir,
        cfg.spool_path(),
        cfg.sync.control_dir,
        files.config.parent,
        *(Path(p).parent for p in files.extra),
    ]
    return Sweeper(cfg.staging_path(), files.unit, cfg.sync.staging_grace, own)
