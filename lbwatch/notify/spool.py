"""The durable queue: every notification is a file here before delivery is tried.

One file per (message, channel): ``<ns>-<pid>-<seq>.<channel>.json``, written to a temporary
name, fsynced, renamed, and the directory fsynced, so a crash leaves the old or the new state,
never half a message. Names sort in creation order, which is the delivery order. A message is
removed only after its channel's server accepted it. Each channel keeps at most ``spool_max``
messages; the oldest are dropped beyond that and counted, and the count is reported in the next
message that gets through and in ``lbwatch status``.

Safe to share between the agent (loop and sender thread) and ``lbwatch notify`` processes:
names are unique per process, and the drop counters are updated under an flock.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from lbwatch.fsutil import fsync_dir, write_atomic, write_temp
from lbwatch.notify.message import Notification

log = logging.getLogger(__name__)
_NAME = re.compile(r"^\d{20}-\d+-\d+\.([A-Za-z0-9_.-]+)\.json$")
_seq = itertools.count()
AGENT_WAIT = 2.0  # seconds the agent's start waits for a script that is spooling


class Spool:
    def __init__(self, path: Path, max_per_channel: int) -> None:
        self.path = path
        self.max = max_per_channel
        self._lock = threading.Lock()
        # The hand-over (see ``expect``), by file name, all under _lock: messages delivered
        # (False) or refused for good (True) before ``put`` had written them; messages handed
        # to their sender and not written yet; handed ones the disk had no room for, in the
        # queue all the same, held in memory until ``write_held`` gets them on disk (lost only
        # if the agent dies meanwhile); messages a sender is sending now.
        self._settled: dict[str, bool] = {}
        self._writing: set[str] = set()
        self._held: dict[str, Notification] = {}
        self._sending: set[str] = set()
        # Drops the disk had no room to count in dropped.<channel> (under _counters).
        self._uncounted: dict[str, int] = {}
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The newest name's time, waiting ones included (see ``stem``).
        self._newest = max((int(p.name[:20]) for p in self.pending()), default=0)

    # -- writing ---------------------------------------------------------------------------------

    def stem(self) -> str:
        """A new message's name, after every name this spool has seen, since names sort in
        delivery order: the wall clock in ns, but never behind the newest name, so a clock
        stepped back (or an agent restarted after such a step) does not put a new message
        ahead of those waiting. Also the message's ident (the Message-ID)."""
        with self._lock:
            self._newest = max(time.time_ns(), self._newest + 1)
            ns = self._newest
        return f"{ns:020d}-{os.getpid()}-{next(_seq)}"

    def put(
        self, channel: str, note: Notification, sync_dir: bool = True, stem: str | None = None
    ) -> Path:
        """Write one message durably. With ``sync_dir=False`` the caller calls ``sync()`` after
        a batch, one directory fsync for many files. ``stem``: its name, from ``stem()``,
        when it was fixed before (a message handed to its sender at once, see ``settle``).
        A handed-over message the disk has no room for is held in memory (``write_held``)."""
        stem = stem or self.stem()
        with self._lock:
            self._newest = max(self._newest, int(stem[:20]))
        name = f"{stem}.{channel}.json"
        final = self.path / name
        if not note.ident:
            note = replace(note, ident=stem)
        try:
            tmp = write_temp(final, note.to_json().encode(), mode=0o600)
        except OSError:
            with self._lock:
                held = name in self._writing  # and so not settled (that takes it out)
                if held:
                    self._writing.discard(name)
                    self._held[name] = note
                refused = self._settled.pop(name, False)  # settled meanwhile: nothing to keep
            if refused:
                log.error(
                    "a notification refused for good could not be set aside in %s: no room "
                    "(subject: %s)",
                    self.path / "rejected",
                    note.subject,
                )
            if held:  # held ones count against the bound, or memory grows while the disk is full
                self._enforce_bound(channel)
            raise
        with self._lock:
            self._writing.discard(name)
            settled = self._settled.pop(name, None)
            if settled is None:
                tmp.rename(final)
            elif settled:
                # Refused for good while it was being written: straight to rejected/.
                tmp.rename(self._rejected_dir() / name)
                return final
            else:
                # Its sender delivered it while it was being written: it never joins the queue.
                tmp.unlink()
                return final
        if sync_dir:
            fsync_dir(self.path)
        self._enforce_bound(channel)
        return final

    def held(self) -> int:
        """Messages in the queue that the disk had no room for, kept in memory meanwhile."""
        with self._lock:
            return len(self._held)

    def write_held(self) -> int:
        """Write the held messages to disk, oldest first, as far as it has room now; how many
        are still held. One delivered or dropped meanwhile is not written."""
        with self._lock:
            names = sorted(self._held)
        wrote = False
        for name in names:
            with self._lock:
                note = self._held.get(name)
            if note is None:
                continue
            try:
                tmp = write_temp(self.path / name, note.to_json().encode(), mode=0o600)
            except OSError:
                break
            with self._lock:
                if self._held.pop(name, None) is None:
                    tmp.unlink()
                else:
                    tmp.rename(self.path / name)
                    wrote = True
        if wrote:
            fsync_dir(self.path)
        return self.held()

    def expect(self, channel: str, stem: str) -> None:
        """The message ``stem`` is handed to its sender as it is spooled: until ``put`` has
        written it, ``writing`` says so, and a message handed after it waits for it."""
        name = f"{stem}.{channel}.json"
        with self._lock:
            if not (self.path / name).exists():
                self._writing.add(name)

    def writing(self, channel: str, before: str) -> bool:
        """Whether a message of ``channel`` older than ``before`` is handed over, not yet
        delivered, and not yet written: it is ahead in the queue, though not on disk yet."""
        with self._lock:
            return any(
                n == f"{n.split('.', 1)[0]}.{channel}.json" and n.split(".", 1)[0] < before
                for n in self._writing
            )

    def sending(self, channel: str, stem: str) -> bool:
        """A sender is about to send ``stem``: the bound leaves it alone until it is settled,
        removed, rejected or ``unsent``, or a message delivered would be counted as dropped.
        False: the bound has dropped (and counted) it already; it must not be sent."""
        name = f"{stem}.{channel}.json"
        with self._lock:
            if not (name in self._writing or name in self._held or (self.path / name).exists()):
                return False
            self._sending.add(name)
            return True

    def unsent(self, channel: str, stem: str) -> None:
        """``stem`` was not sent by hand (not tried, or it failed): it is the queue's now, and
        may be dropped like any other."""
        with self._lock:
            self._sending.discard(f"{stem}.{channel}.json")

    def settle(self, channel: str, stem: str, rejected: bool = False) -> None:
        """The message ``stem`` was delivered (``rejected``: refused for good) by hand before
        or while it was spooled: remove it (set it aside in rejected/), or, not written yet,
        have ``put`` do so, so that it is never sent again."""
        name = f"{stem}.{channel}.json"
        with self._lock:
            self._sending.discard(name)
            if name in self._writing:
                self._writing.discard(name)
                self._settled[name] = rejected
                return
        if rejected:
            self.reject(self.path / name)
        else:
            self.remove(self.path / name)

    def sync(self) -> None:
        fsync_dir(self.path)

    def _enforce_bound(self, channel: str) -> None:
        files = self.pending(channel)
        excess = len(files) - self.max
        if excess <= 0:
            return
        removed = 0
        with self._lock:  # not one being sent (see ``sending``)
            for old in [f for f in files if f.name not in self._sending][:excess]:
                removed += self._forget(old)
        if removed:
            self._add_dropped(channel, removed)
            log.warning(
                "notification spool for %s is full (%d messages): dropped the %d oldest",
                channel,
                self.max,
                removed,
            )

    # -- reading ---------------------------------------------------------------------------------

    def pending(self, channel: str | None = None) -> list[Path]:
        """Messages waiting, oldest first (for one channel, or all): on disk, or held."""
        with self._lock:
            names = set(self._held)
        names.update(entry.name for entry in os.scandir(self.path))
        out = []
        for name in sorted(names):
            m = _NAME.match(name)
            if m and (channel is None or m.group(1) == channel):
                out.append(self.path / name)
        return out

    def channels_waiting(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.pending():
            m = _NAME.match(p.name)
            assert m is not None
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts

    def load(self, path: Path) -> Notification | None:
        """The message in ``path``; a corrupt file is moved to bad/ and None returned."""
        with self._lock:
            if path.name in self._held:
                return self._held[path.name]
        try:
            return Notification.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            bad = self.path / "bad"
            bad.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                path.rename(bad / path.name)
            log.error("unreadable spooled notification %s moved to %s: %s", path.name, bad, exc)
            return None

    def _rejected_dir(self) -> Path:
        rejected = self.path / "rejected"
        rejected.mkdir(mode=0o700, exist_ok=True)
        return rejected

    def reject(self, path: Path) -> None:
        """A message its server refused for good: kept in rejected/ for the operator if the disk
        has room; out of the queue in any case, or it would be offered again and again."""
        with self._lock:
            self._sending.discard(path.name)
            note = self._held.pop(path.name, None)
            if note is None:
                try:
                    path.rename(self._rejected_dir() / path.name)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # no room even to make rejected/
                    path.unlink(missing_ok=True)
                    self._not_set_aside(exc, path.name)
                return
        try:
            write_atomic(self._rejected_dir() / path.name, note.to_json().encode(), mode=0o600)
        except OSError as exc:
            self._not_set_aside(exc, f"subject: {note.subject}")

    def _not_set_aside(self, exc: OSError, what: str) -> None:
        log.error(
            "a notification refused for good could not be set aside in %s either: %s (%s)",
            self.path / "rejected",
            exc,
            what,
        )

    def requeue_rejected(self) -> int:
        """Put the set-aside messages back in the queue (their names keep their order)."""
        rejected = self.path / "rejected"
        moved = 0
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(rejected.iterdir()):
                if _NAME.match(path.name):
                    path.rename(self.path / path.name)
                    moved += 1
        if moved:
            fsync_dir(self.path)
        return moved

    def remove(self, path: Path) -> None:
        # No directory fsync: a removal lost in a crash means the message is sent twice, which
        # at-least-once delivery allows; losing a message is what the fsyncs in put() prevent.
        with self._lock:
            self._sending.discard(path.name)
            self._forget(path)

    def _forget(self, path: Path) -> bool:
        """Under _lock: ``path`` out of the queue, held or on disk; whether it was there."""
        if self._held.pop(path.name, None) is not None:
            return True
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    # -- scripts and the agent's start -------------------------------------------------------------

    @contextlib.contextmanager
    def scripts_lock(self, agent: bool = False) -> Iterator[bool]:
        """`lbwatch notify` holds this shared while it decides between the FIFO and the spool
        and spools; the agent holds it exclusive while it reads, at start, what scripts
        spooled. A script that found no agent therefore either spooled before that reading or
        finds the agent when it looks again under the lock, and hands the event over the FIFO
        instead: never a spooled report the start missed (whose FIFO copy would be mailed
        too). The agent waits at most ``AGENT_WAIT`` for a script (a hung disk must not hold
        its start); yields whether it got the lock."""
        fd = os.open(self.path / ".scripts.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not agent:
                fcntl.flock(fd, fcntl.LOCK_SH)
                yield True
                return
            deadline = time.monotonic() + AGENT_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.005)
                    continue
                yield True
                return
        finally:
            os.close(fd)

    # -- drop counters -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _counters(self) -> Iterator[Path]:
        with self._lock:
            try:
                fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                # No room to create it (no inode left): the count is kept all the same, guarded
                # against this process's threads; a script counting at that moment may clash.
                yield self.path
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield self.path
            finally:
                os.close(fd)

    def dropped(self, channel: str) -> int:
        # Under _lock, as the count changes (_counters): never a file already holding the
        # count in memory plus that count, which would be reported, and cleared, twice.
        with self._lock:
            return self._dropped(channel)

    def _dropped(self, channel: str) -> int:
        try:
            counted = int((self.path / f"dropped.{channel}").read_text().strip() or 0)
        except (OSError, ValueError):
            counted = 0
        return counted + self._uncounted.get(channel, 0)

    def _set_dropped(self, channel: str, n: int) -> None:
        """Under _counters: ``channel``'s drop count is ``n`` from now on, in its file, or in
        memory while the disk has no room for it (the file removed then: never counted twice)."""
        path = self.path / f"dropped.{channel}"
        try:
            if n:
                write_atomic(path, str(n).encode(), mode=0o600)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._uncounted.pop(channel, None)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            self._uncounted[channel] = n

    def _add_dropped(self, channel: str, n: int) -> None:
        with self._counters():
            self._set_dropped(channel, self._dropped(channel) + n)

    def clear_dropped(self, channel: str, n: int) -> None:
        """``n`` drops were reported: forget them (more may have come meanwhile)."""
        with self._counters():
            self._set_dropped(channel, max(0, self._dropped(channel) - n))
