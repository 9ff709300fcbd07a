"""The agent: one loop on one thread that wires observers -> policy -> executors.

Observers: pidfds and periodic psutil scans (procs), the HTTP probe (health), inotify on the state
directory (the pause flag), keepalived's notify FIFO (through ``notify.hub``), signals. Each
observation becomes an event, ``policy.decide`` turns it into actions with reasons, and the
actions run on worker threads whose results come back as events. This module decides nothing
itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import inotify_simple
import psutil

from lbwatch import __version__, policy
from lbwatch.config import Config, ConfigError, load
from lbwatch.events import (
    Action,
    ActionResult,
    Event,
    Outcome,
    PauseChanged,
    ProbeResult,
    ProcessUp,
    ProcId,
    Service,
    Tick,
    Verb,
)
from lbwatch.health import Prober
from lbwatch.loop import Selector, SignalPipe, Workers
from lbwatch.notify.hub import NotifyHub
from lbwatch.procs import ProcessWatcher
from lbwatch.services import CommandController, Controller
from lbwatch.status import is_paused, pause_info, write_status
from lbwatch.sync.service import SyncService
from lbwatch.systemd import Notifier

log = logging.getLogger(__name__)

HISTORY = 20
# Rescan quickly for a moment after an action finished, so a started daemon is seen at once.
FAST_SCANS = (0.05, 0.1, 0.2, 0.4, 0.8)


class AlreadyRunning(Exception):
    pass


def node_name(cfg: Config) -> str:
    return cfg.agent.node_name or socket.gethostname()


def vips_held(cfg: Config) -> dict[str, dict[str, list[str]]]:
    """For each configured VRRP instance, which of its VIPs sit on this node's interfaces now."""
    if not cfg.vrrp_instances:
        return {}
    addrs = {
        a.address.split("%")[0]
        for infos in psutil.net_if_addrs().values()
        for a in infos
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }
    return {
        inst.name: {
            "vips": list(inst.vips),
            "held": [v for v in inst.vips if v.split("/")[0] in addrs],
        }
        for inst in cfg.vrrp_instances
    }


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
        self.watchers = {
            Service.HAPROXY: ProcessWatcher(Service.HAPROXY, cfg.haproxy),
            Service.KEEPALIVED: ProcessWatcher(Service.KEEPALIVED, cfg.keepalived),
        }
        self.prober = Prober(cfg.haproxy.health) if cfg.haproxy.health else None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.stopping = False
        self.ready_sent = False
        self.wake_at: float | None = None
        self.probe_inflight = False
        self._sel = Selector()
        self._workers = Workers()
        self._signals: SignalPipe | None = None
        self._inotify: inotify_simple.INotify | None = None
        self._pidfds: dict[Service, tuple[int, ProcId]] = {}
        self._fast: list[float] = []
        self._next_scan = 0.0
        self._next_probe = 0.0
        self._next_watchdog = 0.0
        self._last_status: dict[str, Any] = {}
        self._lock_fd: int | None = None
        self._create_time = psutil.Process().create_time()
        self.notify = NotifyHub(cfg, self._sel, clock, lambda: node_name(self.cfg))
        self._vips: dict[str, dict[str, list[str]]] = {}
        self.sync: SyncService | None = None
        self.sync_error: str | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def _lock(self) -> None:
        """One agent per node: a second one would fight the first over the services."""
        run_dir = self.cfg.agent.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / "lbwatch.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(
                f"another lbwatch (PID {other or '?'}) holds {run_dir / 'lbwatch.lock'}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _watch_state_dir(self) -> None:
        state_dir = self.cfg.agent.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        if self._inotify is not None:
            self._sel.remove(self._inotify.fileno())
            self._inotify.close()
        flags = inotify_simple.flags
        self._inotify = inotify_simple.INotify()
        self._inotify.add_watch(
            state_dir,
            flags.CREATE | flags.DELETE | flags.MOVED_TO | flags.MOVED_FROM | flags.CLOSE_WRITE,
        )
        self._sel.add(self._inotify.fileno(), self._on_state_dir)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        self._lock()
        self._signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        self._sel.add(self._signals.fileno(), self._on_signals)
        self._sel.add(self._workers.fileno(), self._on_results)
        self._watch_state_dir()
        self.notify.start()
        self._start_sync()
        log.info(
            "lbwatch %s starting on %s (pid %d); config %s",
            __version__,
            node_name(self.cfg),
            os.getpid(),
            self.config_path or "(built-in defaults)",
        )
        # Fold in the first full picture before acting on any of it.
        self._feed(PauseChanged(is_paused(self.cfg.agent.state_dir)))
        self._scan("start-up")
        self._feed(policy.Primed())
        try:
            while not self.stopping:
                self._once()
        finally:
            self._shutdown()
        return 0

    def _once(self) -> None:
        now = self.clock()
        deadlines = [
            self._next_scan,
            self._next_watchdog if self.notifier.watchdog_interval else now + 3600,
        ]
        if self.prober and self.state.haproxy.proc and not self.probe_inflight:
            deadlines.append(self._next_probe)
        if self.wake_at is not None:
            deadlines.append(self.wake_at)
        if self._fast:
            deadlines.append(self._fast[0])
        if self.notify.wake is not None:
            deadlines.append(self.notify.wake)
        if self.sync is not None and self.sync.wake is not None:
            deadlines.append(self.sync.wake)
        for callback in self._sel.wait(min(deadlines) - now):
            self._guard(callback)
        self._guard(self._timers)

    def _guard(self, callback: Callable[[], None]) -> None:
        """A bug in one handler is logged with its traceback and the loop goes on."""
        try:
            callback()
        except Exception:
            log.exception("internal error in %s; continuing", getattr(callback, "__name__", "?"))

    def _timers(self) -> None:
        now = self.clock()
        if self._fast and now >= self._fast[0]:
            while self._fast and now >= self._fast[0]:
                self._fast.pop(0)
            self._scan("scan")
        if now >= self._next_scan:
            self._scan("scan")
        if (
            self.prober
            and self.state.haproxy.proc
            and not self.probe_inflight
            and now >= self._next_probe
        ):
            self._start_probe()
        if self.notifier.watchdog_interval and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self.notifier.watchdog_interval
        if self.wake_at is not None and now >= self.wake_at:
            self._feed(Tick())
        if self.notify.wake is not None and now >= self.notify.wake:
            self.notify.flush(now)
        if self.sync is not None and self.sync.wake is not None and now >= self.sync.wake:
            self.sync.on_timer(now)

    # -- observers ------------------------------------------------------------------------------

    def _scan(self, how: str) -> None:
        self._next_scan = self.clock() + self.cfg.agent.scan_interval
        for watcher in self.watchers.values():
            self._feed_all(watcher.rescan(how))
            self._sync_pidfd(watcher)
        self.notify.check_fifo()
        if self.sync is not None:
            self.sync.check_peers()
        self._vips = vips_held(self.cfg)
        # Also catches what changes without an event: VIPs, the senders' progress.
        self._publish()

    def _sync_pidfd(self, watcher: ProcessWatcher) -> None:
        """Keep the selector's registration in step with the watcher's pidfd, by the process it
        refers to: a new pidfd often reuses the number of the one just closed."""
        old = self._pidfds.get(watcher.service)
        if old is not None and old[1] is watcher.pidfd_owner:
            return
        if old is not None:
            self._sel.remove(old[0])
            del self._pidfds[watcher.service]
        if watcher.pidfd is not None and watcher.pidfd_owner is not None:
            self._pidfds[watcher.service] = (watcher.pidfd, watcher.pidfd_owner)
            self._sel.add(watcher.pidfd, functools.partial(self._on_pidfd, watcher))

    def _on_pidfd(self, watcher: ProcessWatcher) -> None:
        events = watcher.pidfd_fired()
        self._sync_pidfd(watcher)
        self._feed_all(events)

    def _on_state_dir(self) -> None:
        assert self._inotify is not None
        self._inotify.read(timeout=0)
        paused = is_paused(self.cfg.agent.state_dir)
        if paused != self.state.paused:
            self._feed(PauseChanged(paused))
        if self.sync is not None:
            self.sync.check_now_flag(self.cfg.agent.state_dir)

    def _start_probe(self) -> None:
        assert self.prober is not None and self.cfg.haproxy.health is not None
        self.probe_inflight = True
        self._next_probe = self.clock() + self.cfg.haproxy.health.interval
        self._workers.submit(self.prober.probe)

    def _on_results(self) -> None:
        for result in self._workers.results():
            if isinstance(result, ProbeResult):
                self.probe_inflight = False
                self._feed(result)
            elif isinstance(result, ActionResult):
                self._record_result(result)
                self._feed(result)
                now = self.clock()
                self._fast = [now + d for d in FAST_SCANS]
                self._scan("scan")
            else:
                # A job raised (already logged by the worker); free the slot it held.
                self.probe_inflight = False

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

    # -- policy and executors ---------------------------------------------------------------------

    def _feed_all(self, events: list[Event]) -> None:
        for event in events:
            self._feed(event)

    def _feed(self, event: Event | policy.Primed) -> None:
        if isinstance(event, ProcessUp) and event.service is Service.HAPROXY:
            self._next_probe = self.clock()  # a new master proves its health at once
        now = self.clock()
        decision = policy.decide(self.state, event, now, self.cfg)
        self.state = decision.state
        self.wake_at = decision.wake_at
        for note in decision.notes:
            log.log(note.level, "%s", note.text)
            if note.alert:
                self.notify.alert(note.alert, note.text)
        for action in decision.actions:
            self._dispatch(action, now)
            if action.alert:
                self.notify.alert(action.alert, action.reason)
        self._publish()

    def _dispatch(self, action: Action, now: float) -> None:
        level = logging.INFO if action.verb is Verb.START else logging.WARNING
        log.log(level, "%s", action.reason)
        self.history.append(
            {
                "at": time.time(),
                "action": action.describe(),
                "reason": action.reason,
                "outcome": "in progress",
            }
        )
        self._workers.submit(lambda: self.controller.execute(action))

    def _record_result(self, result: ActionResult) -> None:
        if result.outcome is Outcome.OK:
            log.info(
                "%s done in %.2f s (%s)", result.action.describe(), result.duration, result.detail
            )
        for entry in reversed(self.history):
            if entry["reason"] == result.action.reason and entry["outcome"] == "in progress":
                entry.update(
                    outcome=result.outcome.value,
                    detail=result.detail,
                    duration=round(result.duration, 3),
                )
                break

    # -- reporting ------------------------------------------------------------------------------

    def _publish(self) -> None:
        now = self.clock()
        summary = policy.summary(self.state, self.cfg)
        # READY=1 once the first reconcile has played out: nothing in flight and no started
        # process still awaited.
        primed_and_idle = self.state.primed and all(
            s.inflight is None and s.confirming_since is None
            for s in (self.state.haproxy, self.state.keepalived)
        )
        if not self.ready_sent and primed_and_idle:
            self.ready_sent = True
            self.notifier.ready(summary)
            log.info("ready: %s", summary)
        elif self.ready_sent and summary != self._last_status.get("summary"):
            self.notifier.status(summary)
        status = self.status_dict(summary, now)
        if status != self._last_status:
            self._last_status = status
            try:
                write_status(self.cfg.agent.run_dir, {**status, "updated": time.time()})
            except OSError as exc:
                log.error("cannot write status under %s: %s", self.cfg.agent.run_dir, exc)

    def status_dict(self, summary: str, now: float) -> dict[str, Any]:
        services = {}
        for service, watcher in self.watchers.items():
            svc = self.state.svc(service)
            proc = svc.proc
            next_attempt = (
                round(svc.not_before - now, 1)
                if proc is None and svc.inflight is None and svc.not_before > now
                else None
            )
            services[service.value] = {
                "running": proc is not None,
                "pid": proc.pid if proc else None,
                "started": proc.create_time_wall if proc else None,
                "children": sorted(watcher.view.children) if proc else [],
                "in_progress": svc.inflight.describe() if svc.inflight else None,
                "attempts": len(svc.attempts),
                "given_up": svc.given_up,
                "next_attempt_in": next_attempt,
                "down_reason": None if proc else svc.down_reason,
                "last_failure": svc.last_failure or None,
            }
        health = self.cfg.haproxy.health
        return {
            "agent": {
                "pid": os.getpid(),
                "create_time": self._create_time,
                "node": node_name(self.cfg),
                "version": __version__,
                "config": str(self.config_path) if self.config_path else None,
                # Where the pause flag lives: lets `pause`/`resume` work from the run directory
                # alone while the file on disk is broken.
                "state_dir": str(self.cfg.agent.state_dir),
            },
            "summary": summary,
            "ready": self.ready_sent,
            "paused": self.state.paused,
            "pause": pause_info(self.cfg.agent.state_dir) if self.state.paused else None,
            "services": services,
            "health": {
                "url": health.url if health else None,
                "state": self.state.health.value,
                "detail": self.state.probe_detail or None,
            },
            "vrrp": self._vips,
            "notify": self.notify.snapshot(),
            "sync": self.sync.snapshot() if self.sync else {"error": self.sync_error},
            "recent_actions": list(self.history),
        }

    # -- reload and shutdown --------------------------------------------------------------------

    def reload_config(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP received but lbwatch runs on built-in defaults; nothing to reload")
            return
        self.notifier.reloading()
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("%s", line)
            log.error("configuration not reloaded; keeping the running one")
            self.notify.alert(
                "config_rejected",
                f"{self.config_path} rejected on reload, running config kept: {exc.problems[0]}",
            )
        else:
            self.apply_config(new)
            log.info("configuration reloaded from %s", self.config_path)
        self.notifier.ready(policy.summary(self.state, self.cfg))

    def apply_config(self, new: Config) -> None:
        old = self.cfg
        self.cfg = new
        self.watchers[Service.HAPROXY].cfg = new.haproxy
        self.watchers[Service.KEEPALIVED].cfg = new.keepalived
        if isinstance(self.controller, CommandController):
            self.controller.cfg = new
        if new.haproxy.health != old.haproxy.health:
            if self.prober:
                self.prober.close()
            self.prober = Prober(new.haproxy.health) if new.haproxy.health else None
        if new.agent.state_dir != old.agent.state_dir:
            self._watch_state_dir()
        self.notify.apply_config(new)
        if new.sync != old.sync or new.staging_path() != old.staging_path():
            self._stop_sync()
            self._start_sync()
        self._scan("scan")
        self._feed(PauseChanged(is_paused(new.agent.state_dir)))

    def _start_sync(self) -> None:
        if not self.cfg.sync.active():
            return
        try:
            self.sync = SyncService(
                self.cfg, self._sel, node_name(self.cfg), self.notify.alert, self._publish
            )
        except OSError as exc:
            # Supervision goes on without sync; the status says why.
            self.sync_error = f"config sync not started: {exc}"
            log.error("%s", self.sync_error)
            return
        self.sync_error = None
        self.sync.start()

    def _stop_sync(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.sync = None

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self._stop_sync()
        self.notify.close()
        for watcher in self.watchers.values():
            watcher.close()
        if self._signals:
            self._signals.close()
        if self._inotify:
            self._inotify.close()
        if self.prober:
            self.prober.close()
        self._sel.close()
        self._workers.close()
        self.notifier.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
        log.info("lbwatch stopped")
