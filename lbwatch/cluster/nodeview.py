"""This node's view for its peers (``node.json`` in staging): built from the status document,
pure, and written only when it changed, so an idle node writes nothing and a peer's long poll
(``sink``'s WAIT) answers only with what is new.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from pydantic import ValidationError

from lbwatch.fsutil import write_atomic
from lbwatch.statusdoc import LastAction, NodeAgent, NodeService, NodeView, StatusDoc
from lbwatch.sync.sink import NODE

log = logging.getLogger(__name__)

__all__ = ["NODE", "NodeWriter", "from_status", "parse", "render"]


def from_status(doc: StatusDoc) -> NodeView:
    """The node view of the status document ``doc``; nothing of what the node heard from its
    peers, so that two views never echo each other."""

    def service(name: str) -> NodeService:
        svc = doc.services.get(name)
        if svc is None:
            return NodeService()
        return NodeService(running=svc.running, given_up=svc.given_up, down_reason=svc.down_reason)

    last = doc.recent_actions[-1] if doc.recent_actions else None
    return NodeView(
        node=doc.agent.node,
        agent=NodeAgent(
            pid=doc.agent.pid, start_ticks=doc.agent.start_ticks, version=doc.agent.version
        ),
        paused=doc.paused,
        drained=doc.drain.covers if doc.drain is not None else [],
        sources=doc.sources,
        standing_down=sorted(doc.standing_down),
        haproxy=service("haproxy"),
        keepalived=service("keepalived"),
        health=doc.health.state,
        vrrp=doc.vrrp,
        config=doc.sync.current if doc.sync is not None else None,
        last_action=(
            LastAction(at=last.at, action=last.action, outcome=last.outcome, reason=last.reason)
            if last is not None
            else None
        ),
        keepalived_conf=doc.keepalived_conf,
    )


def render(view: NodeView) -> bytes:
    return view.model_dump_json(by_alias=True).encode()


def parse(data: bytes) -> NodeView | None:
    """A peer's view, or None when ``data`` is none (damaged, foreign)."""
    try:
        return NodeView.model_validate_json(data)
    except (ValidationError, ValueError):
        return None


class NodeWriter:
    """Writes this node's view into staging when it changed, naming ``heartbeat``, the file the
    agent renews (``lbwatch.heartbeat``): the receiver answers for the view only while that is
    fresh, so the view itself is not rewritten to show that the agent still speaks for it."""

    def __init__(self, staging: Path, heartbeat: Path | None = None) -> None:
        self.path = staging / NODE
        self.heartbeat = str(heartbeat) if heartbeat is not None else None
        self._last: NodeView | None = None
        self._failed = False

    def write(self, view: NodeView) -> bool:
        """Whether the view changed (and was written, or failed to be, which is logged once)."""
        if view == self._last:
            return False
        self._last = view
        try:
            agent = view.agent.model_copy(update={"heartbeat": self.heartbeat})
            written = view.model_copy(update={"agent": agent, "written": time.time()})
            write_atomic(self.path, render(written))
        except OSError as exc:
            if not self._failed:
                log.error("cannot write %s for the peers: %s", self.path, exc)
            self._failed = True
            self._last = None  # tried again at the next publish
            # The last view written is no longer this node's, yet this agent still runs, so
            # the receiver would serve it as current: without it the peers say "no view".
            with contextlib.suppress(OSError):
                self.path.unlink()
        else:
            self._failed = False
        return True
