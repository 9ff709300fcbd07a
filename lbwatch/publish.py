"""What the agent tells the outside: the status document (``status.json``, read by ``lbwatch
status``), the recent actions in it, and systemd's READY=1 and STATUS= lines.

The document is rewritten only when something in it changed, so an idle agent writes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from lbwatch import __version__, kaconf, policy, pstat, trackfile, vrrpview
from lbwatch.config import Config, MetricsCfg
from lbwatch.events import Action, ActionResult, Outcome, ProbeResult, Service, Verb
from lbwatch.heartbeat import vip_address
from lbwatch.metrics.tally import Tally
from lbwatch.status import write_status
from lbwatch.statusdoc import (
    ActionEntry,
    AgentInfo,
    ClusterView,
    DrainView,
    HealthView,
    KeepalivedConfView,
    KeptView,
    NotifyView,
    PauseInfo,
    ServiceView,
    StatusDoc,
    SyncView,
    VipsView,
)
from lbwatch.systemd import Notifier

if TYPE_CHECKING:
    from lbwatch.metrics.output import Exporter

log = logging.getLogger(__name__)

HISTORY = 20


def node_name(cfg: Config) -> str:
    return cfg.agent.node_name or socket.gethostname()


def local_addresses(cfg: Config) -> frozenset[str]:
    """The addresses on this node's interfaces now (only looked up when VIPs are configured)."""
    if not any(inst.vips for inst in cfg.vrrp_instances):
        return frozenset()
    return frozenset(
        a.address.split("%")[0]
        for infos in psutil.net_if_addrs().values()
        for a in infos
        if a.family in (socket.AF_INET, socket.AF_INET6)
    )


def vrrp_sources(
    conf: kaconf.Keepalived | None, interfaces: Mapping[str, tuple[str, ...]]
) -> dict[str, str]:
    """Each instance's VRRP source address, as keepalived picks it: ``unicast_src_ip`` or
    ``mcast_src_ip`` when set, else the first IPv4 address of its interface that is none of
    the configured VIPs; VRRP breaks a tie of priorities by it (RFC 5798 6.4.3: the higher
    address wins). ``interfaces``: each interface's IPv4 addresses, in the kernel's order."""
    if conf is None:
        return {}
    vips = {vip_address(v) for i in conf.instances for v in i.vips}
    out = {}
    for inst in conf.instances:
        own = [a for a in interfaces.get(inst.interface or "", ()) if a not in vips]
        source = inst.source or (own[0] if own else None)
        if source:
            out[inst.name] = source
    return out


def interface_addresses() -> dict[str, tuple[str, ...]]:
    """Each interface's IPv4 addresses."""
    return {
        name: tuple(a.address for a in infos if a.family == socket.AF_INET)
        for name, infos in psutil.net_if_addrs().items()
    }


def vrrp_view(
    cfg: Config, addresses: frozenset[str], states: Mapping[str, str], keepalived_up: bool
) -> dict[str, VipsView]:
    """Each VRRP instance (by name) and sync group ("group:NAME"): its state as keepalived last
    reported it on the FIFO (``states``, keyed "INSTANCE:NAME" and "GROUP:NAME"; "STOP" while
    keepalived is not running), and which of the configured VIPs sit on this node's interfaces."""

    def state(key: str) -> str:
        return states.get(key, "unknown") if keepalived_up else "STOP"

    out = {
        inst.name: VipsView(
            state=state(f"INSTANCE:{inst.name}"),
            vips=list(inst.vips),
            held=[v for v in inst.vips if vip_address(v) in addresses],
        )
        for inst in cfg.vrrp_instances
    }
    for key in sorted(states):
        kind, _, name = key.partition(":")
        shown = name if kind == "INSTANCE" else f"group:{name}"
        if shown not in out:
            out[shown] = VipsView(state=state(key))
    return out


@dataclass(frozen=True)
class Sections:
    """The parts of the document other modules own."""

    pause: PauseInfo | None
    vrrp: dict[str, VipsView]
    notify: NotifyView
    sync: SyncView
    cluster: ClusterView | None = None


class Publisher:
    def __init__(self, notifier: Notifier, config_path: Path | None) -> None:
        self.notifier = notifier
        self.config_path = config_path
        self.history: deque[ActionEntry] = deque(maxlen=HISTORY)
        self.tally = Tally()
        self.keepalived_conf = kaconf.Watched()
        self.exporter: Exporter | None = None  # [metrics]: prometheus_client is loaded then
        self.ready_sent = False
        self._kept_view: tuple[float, KeptView] | None = None  # (monotonic start, as shown)
        self._sources_at: float | None = None
        self._sources_seen: dict[str, str] = {}
        self._last: StatusDoc | None = None
        self._unwritten = False  # the last document could not be written
        me = pstat.read_stat(os.getpid())
        assert me is not None
        # The agent's identity for `lbwatch status` (is the agent that wrote this still
        # running?) is boot-relative like every other; the wall-clock start is for reading.
        self._start_ticks = me.start_ticks
        self._started_wall = time.time() - pstat.age(me.start_ticks, pstat.since_boot())

    # -- recent actions -------------------------------------------------------------------------

    def dispatched(self, action: Action) -> None:
        self.tally.dispatched(action)
        self.history.append(
            ActionEntry(
                at=time.time(),
                seq=action.seq,
                action=action.describe(),
                reason=action.reason,
                outcome="in progress",
            )
        )

    def finished(self, result: ActionResult) -> None:
        if result.outcome is Outcome.OK:  # a sync job's is told by the sync service
            level = logging.DEBUG if result.action.verb is Verb.SYNC else logging.INFO
            log.log(level, "%s done in %.2f s (%s)", result.action.describe(), result.duration,
                    result.detail)  # fmt: skip
        self.tally.finished(result)
        for i in range(len(self.history) - 1, -1, -1):
            entry = self.history[i]
            if entry.seq == result.action.seq and entry.outcome == "in progress":
                self.history[i] = entry.model_copy(
                    update={
                        "outcome": result.outcome.value,
                        "detail": result.detail,
                        "duration": round(result.duration, 3),
                    }
                )
                return

    def probed(self, result: ProbeResult) -> None:
        self.tally.probed(result, result.duration)

    # -- metrics --------------------------------------------------------------------------------

    def configure_metrics(self, cfg: MetricsCfg) -> None:
        """Start, change or stop what ``[metrics]`` asks for."""
        if self.exporter is not None and self.exporter.cfg == cfg:
            return
        self.close()
        if cfg.listen is not None or cfg.textfile is not None:
            from lbwatch.metrics.output import Exporter  # 5 MB of RSS: only when asked for

            self.exporter = Exporter(cfg)
            if self._last is not None:
                self.exporter.update(self._last, self.tally.counts())

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    # -- the document ---------------------------------------------------------------------------

    def publish(
        self,
        cfg: Config,
        state: policy.State,
        now: float,
        children: Callable[[Service], list[int]],
        sections: Sections,
    ) -> StatusDoc:
        """Say READY=1 once the first reconcile has played out (no start or stop in flight, no
        started process still awaited), STATUS= when the summary changes, and rewrite the document
        when anything in it changed. The document, as built."""
        summary = policy.summary(state, cfg)
        # A config sync job does not count: the services are up without it, and it may take
        # longer than systemd's start timeout allows.
        primed_and_idle = state.primed and all(
            (s.inflight is None or s.inflight.verb is Verb.SYNC) and s.confirming_since is None
            for s in (state.haproxy, state.keepalived)
        )
        if not self.ready_sent and primed_and_idle:
            self.ready_sent = True
            self.notifier.ready(summary)
            log.info("ready: %s", summary)
        elif self.ready_sent and (self._last is None or summary != self._last.summary):
            self.notifier.status(summary)
        self.tally.seen(Service.HAPROXY, state.haproxy.proc)
        self.tally.seen(Service.KEEPALIVED, state.keepalived.proc)
        doc = self._document(cfg, state, now, summary, children, sections)
        if self.exporter is not None:
            self.exporter.update(doc, self.tally.counts())
        # A document whose write failed (no descriptor left, the run directory unusable) is
        # written again at the next publish: left as it was, the file would go on saying what
        # it said before until the document next changes, a dead haproxy still running.
        if doc == self._last and not self._unwritten:
            return doc
        self._last = doc
        try:
            write_status(cfg.agent.run_dir, doc.model_copy(update={"updated": time.time()}))
        except OSError as exc:
            if not self._unwritten:  # once per episode: this is retried every scan
                log.error("cannot write status under %s: %s", cfg.agent.run_dir, exc)
            self._unwritten = True
            return doc
        if self._unwritten:
            log.info("status written again under %s", cfg.agent.run_dir)
            self._unwritten = False
        return doc

    def _document(
        self,
        cfg: Config,
        state: policy.State,
        now: float,
        summary: str,
        children: Callable[[Service], list[int]],
        sections: Sections,
    ) -> StatusDoc:
        services = {}
        for service in (Service.HAPROXY, Service.KEEPALIVED):
            svc = state.svc(service)
            proc = svc.proc
            next_attempt = (
                round(svc.not_before - now, 1)
                if proc is None and svc.inflight is None and svc.not_before > now
                else None
            )
            services[service.value] = ServiceView(
                running=proc is not None,
                pid=proc.pid if proc else None,
                started=round(proc.started_wall, 2) if proc else None,
                children=children(service) if proc else [],
                in_progress=svc.inflight.describe() if svc.inflight else None,
                attempts=len(svc.attempts),
                given_up=svc.given_up,
                next_attempt_in=next_attempt,
                down_reason=None if proc else svc.down_reason,
                last_failure=svc.last_failure or None,
            )
        health = cfg.haproxy.health
        return StatusDoc(
            agent=AgentInfo(
                pid=os.getpid(),
                start_ticks=self._start_ticks,
                create_time=self._started_wall,
                node=node_name(cfg),
                version=__version__,
                config=str(self.config_path) if self.config_path else None,
                # Where the pause flag lives: lets `pause`/`resume` work from the run directory
                # alone while the file on disk is broken.
                state_dir=str(cfg.agent.state_dir),
            ),
            summary=summary,
            ready=self.ready_sent,
            paused=state.paused,
            kept=self._kept(state, now),
            drain=drain_view(
                state, self.keepalived_conf.get(cfg.keepalived.config), cfg.keepalived.track_dir
            ),
            track=dict(state.track),
            standing_down=dict(state.standdown.instances),
            sources=self._sources(cfg, now),
            services=services,
            health=HealthView(
                url=health.url if health else None,
                state=state.health.value,
                detail=policy.health_line(state, cfg) or None,
            ),
            recent_actions=list(self.history),
            pause=sections.pause,
            vrrp=sections.vrrp,
            notify=sections.notify,
            sync=sections.sync,
            cluster=sections.cluster,
            keepalived_conf=self._keepalived_conf(cfg),
        )

    def _sources(self, cfg: Config, now: float) -> dict[str, str]:
        """``vrrp_sources``, the interfaces looked at once a second at most (every publish
        would be a netlink dump each time)."""
        if self._sources_at is None or now - self._sources_at >= 1.0:
            self._sources_at = now
            conf = self.keepalived_conf.get(cfg.keepalived.config)
            self._sources_seen = vrrp_sources(conf, interface_addresses()) if conf else {}
        return self._sources_seen

    def _kept(self, state: policy.State, now: float) -> KeptView | None:
        """The keep as the document shows it, its start on the wall clock read once."""
        kept = state.kept
        if kept is None:
            return None
        if self._kept_view is None or self._kept_view[0] != kept.since:
            since = round(time.time() - (now - kept.since), 2)
            self._kept_view = (kept.since, KeptView(since=since, why=kept.why))
        return self._kept_view[1]

    def keepalived_fifo(self, cfg: Config) -> str | None:
        """The notify FIFO keepalived's config names (None: none, or it cannot be read)."""
        conf = self.keepalived_conf.get(cfg.keepalived.config)
        return conf.notify_fifo if conf is not None else None

    def _keepalived_conf(self, cfg: Config) -> KeepalivedConfView:
        path = cfg.keepalived.config
        conf = self.keepalived_conf.get(path)
        if conf is None:
            return KeepalivedConfView(path=str(path), error=self.keepalived_conf.error)
        return KeepalivedConfView(path=str(path), instances=vrrpview.settings(conf))


def drain_view(
    state: policy.State, conf: kaconf.Keepalived | None, track_dir: Path
) -> DrainView | None:
    """The drain as the document shows it: applied where the track file says so and
    keepalived.conf tracks that file (``conf``: None when it cannot be read: not said)."""
    d = state.drain
    if d is None:
        return None
    covers = [i.name for i in state.vrrp if d.covers(i.name)]
    track = dict(state.track)
    unlevered = [n for n in covers if conf is not None and trackfile.lever(conf, n, track_dir)]
    return DrainView(
        instances=sorted(d.instances),
        since=d.since,
        reason=d.reason,
        by=d.by,
        covers=covers,
        applied=[n for n in covers if track.get(n) == trackfile.DRAINED and n not in unlevered],
        no_lever=unlevered,
    )


def log_actions(actions: tuple[Action, ...]) -> None:
    """One line per cause: the actions one observation caused share it ("haproxy master 4711
    exited (pidfd); stopping keepalived so the VIP moves; starting haproxy (attempt 1)")."""
    by_cause: dict[str, list[Action]] = {}
    for action in actions:
        by_cause.setdefault(action.cause, []).append(action)
    for cause, group in by_cause.items():
        quiet = all(a.verb in (Verb.START, Verb.SYNC) for a in group)
        doing = "; ".join(a.doing for a in group)
        log.log(logging.INFO if quiet else logging.WARNING, "%s; %s", cause, doing)
