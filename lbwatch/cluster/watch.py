"""Keeping a peer's node view current: one thread per peer, each in a long poll (``sink``'s
WAIT) over its own session to the peer's receiver, beside the sync link's session on the same
kept ssh connection. A change on the peer arrives within a tenth of a second; an unchanged view
is confirmed every ``heartbeat`` seconds, which is what lets split-brain detection tell a
current claim from a stale one.

Each answer is posted to the loop as a ``Report``; this module decides nothing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lbwatch import backoff
from lbwatch.cluster.nodeview import NODE, parse
from lbwatch.statusdoc import NodeView
from lbwatch.sync.channel import Channel
from lbwatch.sync.transport import Peer

log = logging.getLogger(__name__)

HEARTBEAT = 1  # seconds: how long one WAIT lasts, so how often an unchanged view is confirmed
RETRY_INITIAL, RETRY_MAX = 1.0, 5.0  # after a failed or refused poll
RRSYNC_AGAIN = 60.0  # a key on rrsync is asked again (it may have been moved meanwhile)

# The states a peer is shown in (``PeerNode.state``).
UP, AGENT_DOWN, UNREACHABLE, NO_VIEW, RRSYNC = (
    "up",
    "agent down",
    "unreachable",
    "no view",
    "rrsync",
)
STATES = (UP, AGENT_DOWN, UNREACHABLE, NO_VIEW, RRSYNC)


@dataclass(frozen=True)
class Report:
    """One answer of a peer's watch. ``view``: a new view (None with ``UP``: unchanged since the
    last one); ``answered``: when the answer came, on this node's monotonic clock."""

    peer: str
    state: str
    answered: float
    view: NodeView | None = None
    reason: str = ""


def _refusal(message: str) -> tuple[str, str]:
    """The state and the reason a receiver's refusal of the poll says."""
    if "not running" in message:
        return AGENT_DOWN, message
    if "no such file" in message:
        return NO_VIEW, "its agent writes no node view (lbwatch there older; sync or watch off)"
    if "not a request" in message:
        return NO_VIEW, "its receiver is older than this lbwatch (no WAIT): upgrade it"
    return NO_VIEW, message


class PeerWatch:
    def __init__(
        self,
        peer: Peer,
        channel: Channel,
        post: Callable[[Report], object],
        heartbeat: int = HEARTBEAT,
    ) -> None:
        self.peer = peer
        self.channel = channel
        self.post = post
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lbwatch-watch-{peer.name}")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        held: str | None = None
        while not self._stop.is_set():
            try:
                report, held = self._poll(held)
            except Exception as exc:  # a bug here must not end the watch for good
                log.exception("peer %s: cluster watch failed", self.peer.name)
                report = Report(self.peer.name, UNREACHABLE, time.monotonic(), None, str(exc))
            if self._stop.is_set():
                return
            self.post(report)
            if report.state == UP:
                failures = 0
                continue
            held = None  # read it whole once the peer answers again
            failures += 1
            pause = backoff.delay(failures, RETRY_INITIAL, RETRY_MAX)
            self._stop.wait(RRSYNC_AGAIN if report.state == RRSYNC else pause)

    def _poll(self, held: str | None) -> tuple[Report, str | None]:
        name = self.peer.name
        got = self.channel.wait(self.peer, NODE, held, self.heartbeat)
        now = time.monotonic()
        if got.outcome == "same":
            return Report(name, UP, now), held
        if got.outcome == "data":
            view = parse(got.data)
            if view is None:
                return Report(name, NO_VIEW, now, None, "its node view is damaged"), None
            return Report(name, UP, now, view), hashlib.sha256(got.data).hexdigest()
        if got.outcome == "rrsync":
            why = "its sync key runs rrsync; authorize lbwatch's receiver to see it"
            return Report(name, RRSYNC, now, None, why), None
        if got.outcome == "refused":
            state, why = _refusal(got.message)
            return Report(name, state, now, None, why), None
        return Report(name, UNREACHABLE, now, None, got.message), None
