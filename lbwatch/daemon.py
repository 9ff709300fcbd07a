"""The agent: one loop on one thread that wires observers -> policy -> executors.

Observers: the process observer (pidfds and periodic scans), the HTTP probe, the state
directory (the pause flag), keepalived's notify FIFO (``notify.hub``), config sync's watchers
(``sync.service``), signals. Each observation becomes an event, ``policy.decide`` turns it into
actions with reasons, and the actions run on worker threads (the controller's commands, or a
sync job) whose results come back as events. This module decides nothing itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lbwatch import __version__, flags, policy
from lbwatch.cluster import facts
from lbwatch.config import Config
from lbwatch.events import (
    Action,
    ActionResult,
    Announce,
    Event,
    Outcome,
    PeersSeen,
    ProbeResult,
    Service,
    StandDown,
    SyncJob,
    SyncStopped,
    SyncWanted,
    Tick,
    Verb,
    VrrpSeen,
)
from lbwatch.loop import Selector, SignalPipe, Workers
from lbwatch.notify.hub import NotifyHub
from lbwatch.observe import ProcessObserver, StateDirWatch
from lbwatch.peering import Peering, rebuilt_by
from lbwatch.probing import Probing
from lbwatch.publish import Publisher, Sections, local_addresses, log_actions, node_name, vrrp_view
from lbwatch.services import CommandController, Controller
from lbwatch.status import AlreadyRunning, lock_run_dir, pause_info
from lbwatch.statusdoc import StatusDoc
from lbwatch.sync.service import SyncService, sync_off
from lbwatch.systemd import Notifier, booted, load_vetted, set_log_level

log = logging.getLogger(__name__)

# Rescan quickly for a moment after an action finished, so a started daemon is seen at once.
FAST_SCANS = (0.05, 0.1, 0.2, 0.4, 0.8)
SWITCH_INTERVAL = 0.0005  # seconds (sys.setswitchinterval): see run()

__all__ = ["Agent", "AlreadyRunning"]


class Agent:
    def __init__(
        self,
        cfg: Config,
        config_path: Path | None = None,
        controller: Controller | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.controller = controller or CommandController(cfg)
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.state = policy.State()
        self.stopping = False
        self.wake_at: float | None = None
        self._sel = Selector()
        self._workers: Workers[ActionResult | ProbeResult] = Workers()
        self._signals: SignalPipe | None = None
        self._lock_fd: int | None = None
        self.processes = ProcessObserver(cfg, self._sel, self._feed)
        self.state_dir = StateDirWatch(self._sel, self._on_state_dir)
        self.probing = Probing(cfg.haproxy.health, self._workers.submit, clock)
        self.publisher = Publisher(self.notifier, config_path)
        self.publisher.configure_metrics(cfg.metrics)
        self.notify = NotifyHub(cfg, self._sel, clock, lambda: node_name(self.cfg), self._on_vrrp)
        self.peering = Peering(
            self._sel, self.notify.alert, self._publish, self._want_sync, self._on_peers, clock
        )
        self._addresses: frozenset[str] = frozenset()
        self._fast: list[float] = []
        self._next_scan = 0.0
        self._next_watchdog = 0.0

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        self._lock_fd = lock_run_dir(self.cfg.agent.run_dir)
        # A worker woken with work (systemd's answer, a command started) waits for the GIL while
        # the loop logs and publishes: up to Python's default 5 ms, measured as most of the time
        # from haproxy's death to keepalived's stop under systemd.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        self._sel.add(self._signals.fileno(), self._on_signals)
        self._sel.add(self._workers.fileno(), self._on_results)
        self.state_dir.watch(self.cfg.agent.state_dir)
        self.notify.start()
        self.peering.start(self.cfg)
        log.info(
            "lbwatch %s starting on %s (pid %d); config %s",
            __version__,
            node_name(self.cfg),
            os.getpid(),
            self.config_path or "(built-in defaults)",
        )
        # Fold in the first full picture before acting on any of it.
        self._scan("start-up")
        self._feed(policy.Primed(systemd=booted()))
        try:
            while not self.stopping:
                self._once()
        finally:
            self._shutdown()
        return 0

    def _deadlines(self, now: float) -> list[float]:
        deadlines = [self._next_scan, *self._fast[:1]]
        if self.notifier.watchdog_interval:
            deadlines.append(self._next_watchdog)
        for wake in (self.wake_at, self.notify.wake, self.peering.wake, self._probe_due_at()):
            if wake is not None:
                deadlines.append(wake)
        return deadlines

    def _once(self) -> None:
        now = self.clock()
        for callback in self._sel.wait(min(self._deadlines(now)) - now):
            self._guard(callback)
        self._guard(self._timers)

    def _guard(self, callback: Callable[[], None]) -> None:
        """A bug in one handler is logged with its traceback and the loop goes on."""
        try:
            callback()
        except Exception:
            what = getattr(callback, "func", callback)  # a partial: the function it calls
            log.exception("internal error in %s; continuing", getattr(what, "__name__", "?"))

    def _timers(self) -> None:
        now = self.clock()
        if (self._fast and now >= self._fast[0]) or now >= self._next_scan:
            self._fast = [t for t in self._fast if t > now]
            self._scan()
        due = self._probe_due_at()
        if due is not None and now >= due:
            self.probing.start(self.state.haproxy.proc)
        if self.notifier.watchdog_interval and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self.notifier.watchdog_interval
        if self.wake_at is not None and now >= self.wake_at:
            self._feed(Tick())
        if self.notify.wake is not None and now >= self.notify.wake:
            self.notify.flush(now)
        self.peering.on_timer(now)  # sync's timers, and the heartbeat: after the scan above

    # -- observers ------------------------------------------------------------------------------

    def _scan(self, how: str = "scan") -> None:
        self._next_scan = self.clock() + self.cfg.agent.scan_interval
        self.processes.scan(how)
        ka = self.state.keepalived.proc, self.processes.children(Service.KEEPALIVED)
        self.notify.check_fifo(*ka, self.publisher.keepalived_fifo(self.cfg))
        if self.sync is not None:
            self.sync.check_peers()
        self._addresses = local_addresses(self.cfg)
        self._levers()
        # Also catches what changes without an event: VIPs, the senders' progress.
        self._publish()

    def _on_vrrp(self) -> None:
        """keepalived reported a transition: its VIPs come or go with it."""
        self._addresses = local_addresses(self.cfg)
        self._publish()

    def _levers(self) -> None:
        """The pause and drain flags and keepalived's track files, fed when they changed."""
        for event in flags.news(self.cfg, self.state):
            self._feed(event)

    def _on_state_dir(self) -> None:
        self._levers()
        if self.sync is not None:
            self.sync.check_now_flag(self.cfg.agent.state_dir)

    def _probe_due_at(self) -> float | None:
        canary = self.sync.probe_wanted() if self.sync else None  # soon after a sync reload
        return self.probing.due_at(self.state.haproxy.proc, canary)

    def _on_results(self) -> None:
        for result in self._workers.results():
            if isinstance(result, ProbeResult):
                self.probing.done()
                self.publisher.probed(result)
                if self.sync is not None:
                    self.sync.probe_done(result)
                self._feed(result)
                continue
            self.publisher.finished(result)  # logged there
            # Look at the world before taking the result: a stop command returns once keepalived
            # has exited, and the policy must see that exit (as lbwatch's own doing) before the
            # slot is free, or it would stop the "still running" keepalived a second time. A
            # scan that fails must not cost the result: unfed, its slot would wait for expiry.
            if result.action.verb is not Verb.ASK:  # an answer changes no process: no scan
                self._guard(self._scan)
            self._feed(result)
            self._fast = [self.clock() + d for d in FAST_SCANS]

    def _on_signals(self) -> None:
        assert self._signals is not None
        for signum in self._signals.received():
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info(
                    "%s received: exiting, leaving haproxy and keepalived as they are",
                    signal.Signals(signum).name,
                )
                self.stopping = True
            elif signum == signal.SIGHUP:
                self.reload_config()

    @property
    def sync(self) -> SyncService | None:
        return self.peering.sync

    # -- policy and executors ---------------------------------------------------------------------

    def _on_peers(self, event: PeersSeen | StandDown | Announce) -> None:
        """What the cluster heard. An answer that only renews the peers' views is folded in
        without a new status unless it changed what the policy does (a view lapsing)."""
        if self.stopping:
            return  # shutting down: nothing is decided on the way out
        old = self.state.group
        group = event.group if isinstance(event, PeersSeen) else None
        renewal = old is not None and group is not None and facts.renewal(old, group)
        self._feed(event, publish=not renewal)

    def _feed(self, event: Event | policy.Primed, publish: bool = True) -> None:
        now = self.clock()
        decision = policy.decide(self.state, event, now, self.cfg)
        if decision.state.haproxy.proc is not self.state.haproxy.proc:
            self.probing.now()  # a new master proves its health at once
        self.state = decision.state
        self.wake_at = decision.wake_at
        for action in decision.actions:  # before anything is logged: a stop's signal goes first
            self._guard(functools.partial(self._dispatch, action))  # one failing, the rest go
        for res in decision.expired:
            self.publisher.finished(res)
        for note in decision.notes:
            log.log(note.level, "%s", note.text)
            if note.alert:
                self.notify.alert(note.alert, note.text)
        log_actions(decision.actions)
        for action in decision.actions:
            if action.alert:
                self.notify.alert(action.alert, action.reason)
        if publish or decision.actions or decision.notes or decision.expired:
            self._publish()

    def _dispatch(self, action: Action) -> None:
        self.publisher.dispatched(action)
        sync = self.sync
        if action.verb is Verb.SYNC:
            execute = sync.execute if sync is not None else sync_off
        else:
            self._guard(functools.partial(self.controller.begin, action))  # executed anyway
            execute = self.controller.execute
        self._workers.submit(
            lambda: execute(action),
            lambda exc: ActionResult(
                action, Outcome.FAILED, f"internal error: {type(exc).__name__}: {exc}", 0.0
            ),
        )

    def _want_sync(self, job: SyncJob) -> None:
        self._feed(SyncWanted(job))

    # -- reporting ------------------------------------------------------------------------------

    def _publish(self) -> None:
        doc = self._publish_once()
        if self.peering.local(doc):
            doc = self._publish_once()  # with the split brain this node's new view made or ended
        # The VRRP instances as published are what the policy weighs before letting a VIP go;
        # folding them in publishes again, and then they are the same.
        vrrp = facts.instances(doc.vrrp, doc.keepalived_conf)
        if vrrp != self.state.vrrp:
            self._feed(VrrpSeen(vrrp))

    def _publish_once(self) -> StatusDoc:
        paused = self.state.paused
        keepalived = self.state.keepalived.proc
        return self.publisher.publish(
            self.cfg,
            self.state,
            self.clock(),
            self.processes.children,
            Sections(
                pause=pause_info(self.cfg.agent.state_dir) if paused else None,
                vrrp=vrrp_view(
                    self.cfg,
                    self._addresses,
                    self.notify.vrrp_states(keepalived),
                    keepalived is not None,
                ),
                notify=self.notify.snapshot(),
                sync=self.peering.sync_view(),
                cluster=self.peering.cluster_view(),
            ),
        )

    # -- reload and shutdown --------------------------------------------------------------------

    def reload_config(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP received but lbwatch runs on built-in defaults; nothing to reload")
            return
        self.notifier.reloading()
        new, problems = load_vetted(self.config_path)
        if new is None:
            for line in problems:
                log.error("%s", line)
            log.error("configuration not reloaded; keeping the running one")
            self.notify.alert(
                "config_rejected",
                f"{self.config_path} rejected on reload, running config kept: {problems[0]}",
            )
        else:
            self.apply_config(new)
            log.info("configuration reloaded from %s", self.config_path)
        self.notifier.ready(policy.summary(self.state, self.cfg))

    def apply_config(self, new: Config) -> None:
        old, self.cfg = self.cfg, new
        set_log_level(new.agent.log_level)
        self.processes.apply_config(new)
        if isinstance(self.controller, CommandController):
            self.controller.cfg = new
        self.probing.configure(new.haproxy.health)
        if new.agent.state_dir != old.agent.state_dir:
            self.state_dir.watch(new.agent.state_dir)
        self.notify.apply_config(new)
        self.publisher.configure_metrics(new.metrics)
        if rebuilt_by(new) != rebuilt_by(old):
            self._stop_sync()
            self.peering.start(new)
        self._scan()  # the flags under the new state directory too

    def _stop_sync(self) -> None:
        if self.peering.stop() and not self.stopping:
            self._feed(SyncStopped())  # its queued jobs go; a new one asks afresh

    def _shutdown(self) -> None:
        self.stopping = True
        self.notifier.stopping()
        self._stop_sync()
        self.publisher.close()
        self.notify.close()
        self.processes.close()
        self.state_dir.close()
        if self._signals:
            self._signals.close()
        self.probing.close()
        self._sel.close()
        self._workers.close()
        self.notifier.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
        log.info("lbwatch stopped")
