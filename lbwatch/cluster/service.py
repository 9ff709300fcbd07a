"""The cluster side of the agent, as one object the loop drives: this node's view written for
the peers with the heartbeat that vouches for it, the peers' watches, and split-brain decisions
on what they report.

Runs on the loop thread, except the watch threads it owns, whose reports come back through a
mailbox. The heartbeat is renewed only from the loop (``renew``), so a loop that stops turning
leaves it to go stale, and the peers stop taking this node's view as current.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from lbwatch import heartbeat
from lbwatch.cluster import facts, splitbrain, standdown
from lbwatch.cluster.nodeview import NodeWriter, from_status
from lbwatch.cluster.watch import UP, PeerWatch, Report
from lbwatch.config import Config
from lbwatch.events import Announce, PeersSeen, StandDown
from lbwatch.heartbeat import vip_address
from lbwatch.loop import Mailbox, Selector
from lbwatch.statusdoc import ClusterView, NodeView, PeerNode, StatusDoc
from lbwatch.sync.channel import Channel
from lbwatch.sync.transport import Peer, Transport

if TYPE_CHECKING:
    from lbwatch.vrrpwire import Listener

log = logging.getLogger(__name__)

STARTING = "starting"


class ClusterService:
    def __init__(
        self,
        cfg: Config,
        selector: Selector,
        alert: Callable[[str, str], None],
        changed: Callable[[], None],
        seen: Callable[[PeersSeen | StandDown | Announce], None] = lambda event: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        s = cfg.sync
        self.after = cfg.cluster.split_brain_after
        self.resolve = cfg.cluster.resolve_split_brain
        self.alert = alert
        self.changed = changed  # the agent republishes its status
        self.seen = seen  # the agent hands what the peers are, and what follows, to the policy
        self.clock = clock
        self._sel = selector
        self.heartbeat = heartbeat.Heartbeat(cfg.agent.run_dir / heartbeat.FILE)
        self.writer = NodeWriter(cfg.staging_path(), self.heartbeat.path)
        self.channel = Channel(Transport(s.ssh_key, s.control_dir, s.known_hosts, s.timeout))
        self.mailbox: Mailbox[Report] = Mailbox()
        self.watches = [
            PeerWatch(Peer(p.name, p.host, p.port, p.user), self.channel, self.mailbox.post)
            for p in s.peers
        ]
        now = time.time()
        self.peers = {p.name: PeerNode(state=STARTING, since=now) for p in s.peers}
        self.heard = {p.name: splitbrain.Heard(None, splitbrain.NOBODY) for p in s.peers}
        self.conflicts: dict[str, splitbrain.Conflict] = {}
        self.me: NodeView | None = None
        self.book = standdown.Book()
        self.listener: Listener | None = None

    def start(self) -> None:
        self.heartbeat.renew(self.clock())  # before the first view that names it
        self._sel.add(self.mailbox.fileno(), self._on_reports)
        for watch in self.watches:
            watch.start()

    def local(self, doc: StatusDoc) -> bool:
        """This node's status as just published: its view goes to the peers if it changed.
        Whether the cluster's part of the status changed with it (to publish again)."""
        me = from_status(doc)
        if not self.writer.write(me):
            return False
        self.me = me
        return self._decide()

    def renew(self, now: float) -> None:
        """On every turn of the loop (``now``: its clock): the heartbeat, when it is due."""
        self.heartbeat.renew(now)

    def _on_reports(self) -> None:
        changed = False
        for report in self.mailbox.results():
            changed |= self._take(report)
        self.seen(PeersSeen(facts.group(self.heard)))  # every answer renews the views' age
        changed |= self._decide()
        if changed:
            self.changed()

    def _take(self, report: Report) -> bool:
        """Fold one report in; whether the peer's part of the status changed."""
        old = self.peers.get(report.peer)
        if old is None:
            return False  # a watch of a peer no longer configured
        up = report.state == UP
        view = report.view if report.view is not None else (old.view if up else None)
        kernel = report.kernel
        by = splitbrain.AGENT if up else splitbrain.NOBODY if kernel is None else splitbrain.KERNEL
        self.heard[report.peer] = splitbrain.Heard(
            view, by, report.answered, report.reason, kernel or frozenset()
        )
        if old.state != report.state:
            log.log(
                logging.INFO if up else logging.WARNING,
                "cluster: peer %s %s%s",
                report.peer,
                report.state,
                f" ({report.reason})" if report.reason else "",
            )
        new = PeerNode(
            state=report.state,
            since=old.since if old.state == report.state else time.time(),
            reason=report.reason,
            view=view if up else old.view,
        )
        if new == old:
            return False
        self.peers[report.peer] = new
        return True

    def _decide(self) -> bool:
        """Split brain on what is known now; whether it changed what the status shows."""
        if self.me is None:
            return False
        decision = splitbrain.decide(
            self.conflicts, self.me, self.heard, self.clock(), time.time(), self.after
        )
        for said in decision.said:
            level = logging.ERROR if said.kind == "split_brain" else logging.WARNING
            log.log(level, "%s", said.text)
            self.alert(said.kind, said.text)
        changed = _shown(decision.state) != _shown(self.conflicts)
        ended = standdown.to_announce(self.conflicts, decision.state, self.heard)
        self.conflicts = decision.state
        self._announce(ended)
        if self.resolve:
            self._stand_down()
        return changed

    def _stand_down(self) -> None:
        """Split brains declared here resolved (``standdown``): what stands down goes to the
        policy (a TRACK to FAULT); the VRRP listener runs while anything does."""
        assert self.me is not None
        heard = self.listener.heard if self.listener is not None else {}
        decision = standdown.decide(
            self.book, self.me, self.heard, self.conflicts, heard, self.clock()
        )
        for said in decision.said:
            level = logging.INFO if said.kind.endswith("_end") else logging.WARNING
            log.log(level, "%s", said.text)
            self.alert(said.kind, said.text)
        before = standdown.instances(self.book)
        self.book = decision.book
        if standdown.instances(self.book) != before:
            stands = tuple((n, s.why) for n, s in sorted(self.book.standing.items()))
            self.seen(StandDown(stands))
        self._listen()

    def _listen(self) -> None:
        if self.book.standing and self.listener is None:
            conf = self.me.keepalived_conf if self.me is not None else None
            settings = conf.instances if conf is not None else {}
            routers = {s.vrid: n for n, s in settings.items() if s.vrid is not None}
            interfaces = {s.interface for s in settings.values() if s.interface}
            from lbwatch.vrrpwire import Listener  # only while standing down: rare

            try:
                self.listener = Listener(self._sel, routers, interfaces, self._on_vrrp_heard)
            except OSError as exc:
                log.warning("cannot listen for VRRP advertisements (%s): a stand-down ends "
                            "only when the peer stops serving or cannot be asked", exc)  # fmt: skip
        elif not self.book.standing and self.listener is not None:
            self.listener.close()
            self.listener = None

    def _on_vrrp_heard(self) -> None:
        if self._decide():
            self.changed()

    def _announce(self, ended: list[splitbrain.Conflict]) -> None:
        """Split brains that ended so that this node, still claiming the instance, holds it
        alone (``standdown.to_announce``): it says so on the wire (gratuitous ARP, through the
        policy)."""
        me = self.me
        assert me is not None
        for c in ended:
            inst = me.vrrp.get(c.instance)
            vips = frozenset(vip_address(v) for v in inst.vips) if inst is not None else frozenset()
            if inst is not None and splitbrain.claims(me, c.instance, vips):
                self.seen(Announce(c.instance, tuple(sorted(vips))))

    def snapshot(self) -> ClusterView:
        return ClusterView(peers=dict(self.peers), split_brain=splitbrain.views(self.conflicts))

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for watch in self.watches:
            watch.stop()
        self.channel.end_sessions()
        for watch in self.watches:
            watch.join(2.0)
        self.channel.end_sessions()  # one a watch opened just before it saw the stop
        self._sel.remove(self.mailbox.fileno())
        self.mailbox.close()


def _shown(state: dict[str, splitbrain.Conflict]) -> dict[str, splitbrain.Conflict]:
    """What of the conflicts the status shows (not the monotonic times)."""
    return {k: replace(c, since=0.0) for k, c in state.items()}
