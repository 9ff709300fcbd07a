"""The observers the loop owns that are not notify or sync: haproxy's and keepalived's main
processes (a watcher each, with their pidfds in the loop's selector) and the state directory
(the pause flag, `sync --now`'s request).

Every scan and every pidfd wake-up becomes one ``Observation``, however many changes it saw, so
the policy never acts on a half-applied picture (the old haproxy master gone, the new one not
folded in yet).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import inotify_simple

from lbwatch.config import Config
from lbwatch.events import Observation, Service
from lbwatch.loop import Selector
from lbwatch.procs import ProcessWatcher

log = logging.getLogger(__name__)


class ProcessObserver:
    def __init__(
        self, cfg: Config, selector: Selector, report: Callable[[Observation], None]
    ) -> None:
        self._sel = selector
        self.report = report
        self.watchers = {
            Service.HAPROXY: ProcessWatcher(Service.HAPROXY, cfg.haproxy),
            Service.KEEPALIVED: ProcessWatcher(Service.KEEPALIVED, cfg.keepalived),
        }
        self._fds: dict[int, object] = {}  # registered pidfd -> the process it refers to

    def apply_config(self, cfg: Config) -> None:
        self.watchers[Service.HAPROXY].cfg = cfg.haproxy
        self.watchers[Service.KEEPALIVED].cfg = cfg.keepalived

    def children(self, service: Service) -> list[int]:
        return sorted(self.watchers[service].view.children)

    def scan(self, how: str) -> None:
        changes = []
        for watcher in self.watchers.values():
            changes += watcher.rescan(how)
        self._sync_fds()
        if changes:
            self.report(Observation(tuple(changes)))

    def _sync_fds(self) -> None:
        """Keep the selector's registrations in step with the watchers' pidfds (the main
        processes' and those on the children a dead one left), by the process each refers to:
        a new pidfd often reuses the number of one just closed."""
        want: dict[int, tuple[object, ProcessWatcher, int | None]] = {}
        for watcher in self.watchers.values():
            if watcher.pidfd is not None and watcher.pidfd_owner is not None:
                want[watcher.pidfd] = (watcher.pidfd_owner, watcher, None)
            for pid, fd in watcher.leftover_fds.items():
                want[fd] = ((watcher.service, pid), watcher, pid)
        for fd, owner in list(self._fds.items()):
            if fd not in want or want[fd][0] != owner:
                self._sel.remove(fd)
                del self._fds[fd]
        for fd, (owner, watcher, child) in want.items():
            if fd not in self._fds:
                self._fds[fd] = owner
                self._sel.add(fd, functools.partial(self._on_exit, watcher, fd, owner, child))

    def _on_exit(self, watcher: ProcessWatcher, fd: int, owner: object, child: int | None) -> None:
        """A pidfd became readable: the main process exited (``child`` None), or ``child``, one
        a dead main process left. One turn of the loop may hold a wake-up for a pidfd that an
        earlier callback of the same turn (a rescan) has already closed, its number perhaps
        reused: such a stale wake-up is dropped, or it would close the new process's pidfd."""
        if self._fds.get(fd) != owner:
            return
        changes = watcher.pidfd_fired() if child is None else watcher.leftover_fired(child)
        self._sync_fds()
        if changes:
            self.report(Observation(tuple(changes)))

    def close(self) -> None:
        for watcher in self.watchers.values():
            watcher.close()


class StateDirWatch:
    """inotify on the state directory; ``changed`` is called on the loop when anything in it
    was created, removed, renamed or written."""

    def __init__(self, selector: Selector, changed: Callable[[], None]) -> None:
        self._sel = selector
        self.changed = changed
        self._inotify: inotify_simple.INotify | None = None

    def watch(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.close()
        flags = inotify_simple.flags
        self._inotify = inotify_simple.INotify()
        self._inotify.add_watch(
            state_dir,
            flags.CREATE | flags.DELETE | flags.MOVED_TO | flags.MOVED_FROM | flags.CLOSE_WRITE,
        )
        self._sel.add(self._inotify.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        assert self._inotify is not None
        self._inotify.read(timeout=0)
        self.changed()

    def close(self) -> None:
        if self._inotify is not None:
            self._sel.remove(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
