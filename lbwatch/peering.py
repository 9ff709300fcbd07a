"""What the agent does with its peers: config sync (``sync.service``) and the cluster watch
(``cluster.service``). Both are built from the same peers and sync key, started together after
the agent's own observers, and rebuilt together when a reload changes what they are built
from. Failing to start sync leaves supervision running; the status says why.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from lbwatch.cluster.service import ClusterService
from lbwatch.config import Config
from lbwatch.events import Announce, PeersSeen, StandDown, SyncJob
from lbwatch.loop import Selector
from lbwatch.publish import node_name
from lbwatch.statusdoc import ClusterView, StatusDoc, SyncView
from lbwatch.sync.service import SyncService, built_from

log = logging.getLogger(__name__)


def rebuilt_by(cfg: Config) -> tuple[object, ...]:
    """What a reload must change for sync and the cluster watch to be rebuilt."""
    return (built_from(cfg), cfg.cluster)


class Peering:
    def __init__(
        self,
        selector: Selector,
        alert: Callable[[str, str], None],
        changed: Callable[[], None],
        want: Callable[[SyncJob], None],
        seen: Callable[[PeersSeen | StandDown | Announce], None] = lambda event: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sel = selector
        self.alert = alert
        self.changed = changed  # the agent republishes its status
        self.want = want  # the agent hands a sync job to the policy
        self.seen = seen  # the agent hands what the cluster hears to the policy
        self.clock = clock
        self.sync: SyncService | None = None
        self.cluster: ClusterService | None = None
        self.error: str | None = None  # why sync did not start
        self._view: Path | None = None  # the node view this agent writes for its peers

    def start(self, cfg: Config) -> None:
        self._start(cfg)
        written = self.cluster.writer.path if self.cluster is not None else None
        if self._view is not None and self._view != written:
            # A reload turned the watch (or sync) off, or moved staging: this agent no longer
            # writes that view, yet it still runs, so the receiver would go on serving the last
            # one as current (a frozen MASTER, a split brain on the peer). Without it the
            # peers say "no view". On shutdown it stays: the receiver says "not running".
            with contextlib.suppress(OSError):
                self._view.unlink()
        self._view = written

    def _start(self, cfg: Config) -> None:
        if not cfg.sync.active():
            return
        try:
            self.sync = SyncService(
                cfg, self._sel, node_name(cfg), self.alert, self.changed, self.want, self.clock
            )
        except OSError as exc:
            self.error = f"config sync not started: {exc}"
            log.error("%s", self.error)
            return
        self.error = None
        self.sync.start()
        if cfg.cluster.watch and cfg.sync.peers:
            self.cluster = ClusterService(
                cfg, self._sel, self.alert, self.changed, self.seen, self.clock
            )
            self.cluster.start()

    def stop(self) -> bool:
        """Whether sync was running (its queued jobs are moot now)."""
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
            # No peers watched: the policy acts alone again, and nothing stands down.
            self.seen(PeersSeen(None))
            self.seen(StandDown())
        if self.sync is None:
            return False
        self.sync.close()
        self.sync = None
        return True

    @property
    def wake(self) -> float | None:
        """When the loop must turn next for sync's timers or the cluster's heartbeat."""
        wakes = [
            self.sync.wake if self.sync is not None else None,
            self.cluster.heartbeat.wake if self.cluster is not None else None,
        ]
        return min((w for w in wakes if w is not None), default=None)

    def on_timer(self, now: float) -> None:
        """On every turn of the loop, after its other timers: sync's when due; the heartbeat,
        renewed when due (from the loop alone: see ``cluster.service``)."""
        if self.sync is not None and self.sync.wake is not None and now >= self.sync.wake:
            self.sync.on_timer(now)
        if self.cluster is not None:
            self.cluster.renew(now)

    def local(self, doc: StatusDoc) -> bool:
        """This node's status as just published; whether the cluster's part changed with it."""
        return self.cluster is not None and self.cluster.local(doc)

    def sync_view(self) -> SyncView:
        return self.sync.snapshot() if self.sync is not None else SyncView(error=self.error)

    def cluster_view(self) -> ClusterView | None:
        return self.cluster.snapshot() if self.cluster is not None else None
