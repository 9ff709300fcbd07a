"""Keeping a peer's node view current: one thread per peer, each in a long poll (``sink``'s
WAIT) over its own session to the peer's receiver, beside the sync link's session on the same
kept ssh connection. A change on the peer arrives within a tenth of a second; an unchanged view
is confirmed every ``heartbeat`` seconds, which is what lets split-brain detection tell a
current claim from a stale one.

Who speaks here: the peer's receiver (root there, run by its sshd for this node's sync key).
It answers for the peer's view only while the agent that wrote it runs and renews its heartbeat
(``lbwatch.heartbeat``); otherwise (``STALE``) the view is not current, and this watch says
"agent down" or "agent not responding", never "up", and passes on instead what the peer's
kernel held of the view's VIPs at that moment (``Report.kernel``). Such a peer is asked again
every ``heartbeat`` seconds, as a current one is, since split brain is decided on those
answers.

Each answer is posted to the loop as a ``Report``; this module decides nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
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
UP, AGENT_DOWN, NOT_RESPONDING, UNREACHABLE, NO_VIEW, RRSYNC = (
    "up",
    "agent down",
    "agent not responding",
    "unreachable",
    "no view",
    "rrsync",
)
STATES = (UP, AGENT_DOWN, NOT_RESPONDING, UNREACHABLE, NO_VIEW, RRSYNC)
SILENCES = {"ended": AGENT_DOWN, "silent": NOT_RESPONDING}  # the receiver's STALE, by kind


@dataclass(frozen=True)
class Report:
    """One answer of a peer's watch. ``view``: a new view (None with ``UP``: unchanged since the
    last one); ``answered``: when the answer came, on this node's monotonic clock; ``kernel``:
    for a peer whose agent cannot speak, the VIPs of its view that its kernel held then, as its
    receiver read them (None: not said)."""

    peer: str
    state: str
    answered: float
    view: NodeView | None = None
    reason: str = ""
    kernel: frozenset[str] | None = None


def _refusal(message: str) -> tuple[str, str]:
    """The state and the reason a receiver's refusal of the poll says."""
    if "not running" in message:
        return AGENT_DOWN, message
    if "no such file" in message:
        return NO_VIEW, "its agent writes no node view (lbwatch there older; sync or watch off)"
    if "not a request" in message:
        return NO_VIEW, "its receiver is older than this lbwatch (no WAIT): upgrade it"
    return NO_VIEW, message


def _stale(peer: str, message: str, now: float) -> Report:
    """The receiver's ``STALE <ended|silent> <VIPs held|-> <why>``: the view is not current."""
    kind, held, why = [*message.split(" ", 2), "", ""][:3]
    try:
        kernel = frozenset(str(ipaddress.ip_address(a)) for a in held.split(",") if a != "-")
    except ValueError:
        kernel = None
    if kind not in SILENCES or kernel is None:
        return Report(peer, NO_VIEW, now, None, f"its receiver answered {message[:80]!r}")
    on = ", ".join(sorted(kernel)) if kernel else "none of its VIPs"
    return Report(peer, SILENCES[kind], now, None, f"{why}; its kernel holds {on}", kernel)


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
            if report.kernel is not None:
                # Its agent cannot speak, its receiver does: asked as often as a current view
                # is confirmed, since split brain is decided on these answers.
                failures = 0
                self._stop.wait(self.heartbeat)
                continue
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
        if got.outcome == "stale":
            return _stale(name, got.message, now), None
        if got.outcome == "rrsync":
            why = "its sync key runs rrsync; authorize lbwatch's receiver to see it"
            return Report(name, RRSYNC, now, None, why), None
        if got.outcome == "refused":
            state, why = _refusal(got.message)
            return Report(name, state, now, None, why), None
        return Report(name, UNREACHABLE, now, None, got.message), None
