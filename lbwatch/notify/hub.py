"""The notification side of the agent, as one object the loop drives: the FIFO (registered in
the loop's selector), the router, the spool writer and the senders.

Everything here runs on the loop thread except the spooler and sender threads it owns.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import inotify_simple

from lbwatch.config import Config
from lbwatch.events import ProcId
from lbwatch.loop import Selector
from lbwatch.notify import boot, rules, writer
from lbwatch.notify.channels import build_channels
from lbwatch.notify.fifo import FifoError, FifoReader, fifo_ident
from lbwatch.notify.parse import Malformed, VrrpEvent, parse_line
from lbwatch.notify.sender import Senders, Spooler
from lbwatch.notify.spool import AGENT_WAIT, Spool
from lbwatch.notify.vrrpmemo import VrrpMemory
from lbwatch.statusdoc import NotifyView

log = logging.getLogger(__name__)
NOISE_FIRST, NOISE_EVERY = 5, 60.0


class Throttle:
    """At most ``first`` log lines per ``every`` seconds; the rest are counted, and the count is
    taken (``summary``) once the interval is over."""

    def __init__(self, first: int, every: float) -> None:
        self.first, self.every = first, every
        self.since: float | None = None
        self.logged = self.quiet = 0

    def allow(self, now: float) -> bool:
        # With lines held back, the window restarts when their count is taken (summary).
        if self.since is None or (not self.quiet and now >= self.since + self.every):
            self.since, self.logged = now, 0
        if self.logged < self.first:
            self.logged += 1
            return True
        self.quiet += 1
        return False

    def summary(self, now: float) -> int:
        """The lines not logged, once their interval is over (then a new one starts)."""
        if not self.quiet or self.since is None or now < self.since + self.every:
            return 0
        quiet, self.quiet, self.since, self.logged = self.quiet, 0, now, 0
        return quiet


class NotifyHub:
    def __init__(
        self,
        cfg: Config,
        selector: Selector,
        clock: Callable[[], float],
        node: Callable[[], str],
        vrrp_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self._sel = selector
        self.clock = clock
        self.node = node
        self.vrrp_changed = vrrp_changed  # a VRRP line was read: the agent looks at its VIPs
        self.router = rules.RouterState()
        self.wake: float | None = None  # when a flap digest falls due
        self.fifo = FifoReader(cfg.fifo_path())
        self.fifo_error: str | None = None
        self.writer = writer.WriterWatch(clock)
        self.malformed = 0
        self._first_read = False
        self._boot_fifo: tuple[int, int] | None = None
        self._boot_scripts: list[str] = []  # the script reports pending at start, by file name
        # Garbage on the FIFO is logged a few lines at a time, then counted: a flood would
        # otherwise fill the journal, whose rate limit then drops the lines that matter.
        self._noise = Throttle(NOISE_FIRST, NOISE_EVERY)
        self.memory = VrrpMemory(cfg.agent.run_dir)
        self.spool = Spool(cfg.spool_path(), cfg.notify.spool_max)
        self.senders = self._make_senders(cfg)
        self.spooler = Spooler(self.spool, self.senders.kick)
        # Messages other processes spool (`lbwatch notify` when the FIFO write fails, `notify
        # --retry-rejected`) land by rename: each wakes the senders at once.
        self._spool_watch = inotify_simple.INotify()
        self._spool_wd: int | None = None
        self._watch_spool()

    def _watch_spool(self) -> None:
        if self._spool_wd is not None:
            with contextlib.suppress(OSError):
                self._spool_watch.rm_watch(self._spool_wd)
        self._spool_wd = self._spool_watch.add_watch(self.spool.path, inotify_simple.flags.MOVED_TO)

    def _on_spool(self) -> None:
        self._spool_watch.read(timeout=0)
        self.senders.kick()

    def start(self) -> None:
        # Before the FIFO's first reading (in open_fifo): what scripts spooled while no agent
        # ran is in the FIFO too.
        with self.spool.scripts_lock(agent=True) as locked:
            if not locked:
                log.warning(
                    "a notify script held %s for %.0f s; reading what scripts spooled without "
                    "waiting longer (a report spooled meanwhile may be mailed twice)",
                    self.spool.path / ".scripts.lock",
                    AGENT_WAIT,
                )
            reports, self._boot_scripts = boot.script_reports(self.spool)
        self.router = rules.spooled(self.router, reports)
        self._first_read = True
        # Only the FIFO there now can hold keepalived's copies of what scripts spooled.
        self._boot_fifo = fifo_ident(self.fifo.path)
        self.open_fifo()
        self._sel.add(self._spool_watch.fileno(), self._on_spool)
        self.senders.start()

    def _first_read_over(self) -> None:
        """The FIFO's first reading is done (or cannot be had): later lines are new, and the
        script reports pending at start are never matched again, by this agent or the next."""
        self._first_read = False
        self.router = rules.first_read_done(self.router)
        boot.remember_matched(self.spool, self._boot_scripts)

    def _make_senders(self, cfg: Config, after: Senders | None = None) -> Senders:
        n = cfg.notify
        return Senders(build_channels(n), self.spool, n.retry_initial, n.retry_max, after)

    def check_fifo(
        self, keepalived: ProcId | None, children: list[int], keepalived_fifo: str | None
    ) -> None:
        """Called at each rescan: reopen a FIFO that was replaced or could not be opened, and
        see that ``keepalived`` (its config naming ``keepalived_fifo``) writes the one read."""
        if self.fifo.fd is None or self.fifo.replaced():
            self.open_fifo()
        path = str(self.fifo.path)
        if not writer.names_fifo(keepalived_fifo, path) or self.fifo.ident is None:
            keepalived = None  # notify scripts, or lbwatch cannot read it: said elsewhere
        pids = [keepalived.pid, *children] if keepalived is not None else []
        new = self.writer.check(path, self.fifo.ident, keepalived, pids)
        if new is not None:
            self.alert("fifo_unread", f"{new}; {writer.FIX}")

    def open_fifo(self) -> None:
        """(Re)open the notify FIFO; an unusable path is an error in the log and the status,
        never a reason to stop supervising."""
        old_fd = self.fifo.fd
        try:
            self.fifo.open()
        except (FifoError, OSError) as exc:
            error = str(exc) if isinstance(exc, FifoError) else f"{self.fifo.path}: {exc.strerror}"
            if error != self.fifo_error:
                log.error("notify FIFO unusable, keepalived events are not read: %s", error)
            self.fifo_error = error
            if old_fd is not None:
                self._sel.remove(old_fd)
            self.fifo.close()
            return
        if old_fd is not None:
            self._sel.remove(old_fd)
        if old_fd is not None or self.fifo_error is not None:
            log.warning(
                "notify FIFO %s reopened (it was replaced or unusable); a keepalived still "
                "writing the old one is said within %g s",
                self.fifo.path,
                writer.GRACE + self.cfg.agent.scan_interval,
            )
        self.fifo_error = None
        if self.fifo.notice is not None:
            log.warning("notify FIFO: %s", self.fifo.notice)
        self._sel.add(self.fifo.fileno(), self.on_fifo)
        if self._first_read and self.fifo.ident != self._boot_fifo:
            # Not the FIFO of the start (it was unusable, then replaced, or there was none):
            # everything in it was written since, a transition of its own, never a copy.
            self._first_read_over()
        if self._first_read:
            # What keepalived wrote before the agent started is in the pipe now: read it at
            # once, so only it is matched against what scripts spooled meanwhile.
            self.on_fifo()

    def on_fifo(self) -> None:
        now = self.clock()
        vrrp = False
        for raw in self.fifo.read_lines():
            parsed = parse_line(raw)
            if isinstance(parsed, Malformed):
                self.malformed += 1
                if self._noise.allow(now):
                    log.warning(
                        "ignoring a malformed notify line (%s): %s", parsed.why, parsed.line
                    )
                continue
            if isinstance(parsed, VrrpEvent):
                vrrp = True
                log.info("keepalived: %s", parsed.line())
            else:
                log.info(
                    "keepalived: %s %s %s",
                    parsed.kind,
                    parsed.server,
                    "UP" if parsed.up else "DOWN",
                )
            self.route(parsed)
        if self._first_read:
            self._first_read_over()
        if vrrp:
            self.vrrp_changed()
        if self.fifo.fragments:
            self.malformed += self.fifo.fragments
            if self._noise.allow(now):
                log.warning(
                    "dropped %d piece(s) of a line without its newline from the notify FIFO "
                    "(keepalived writes whole lines): %r",
                    self.fifo.fragments,
                    self.fifo.last_fragment,
                )
            self.fifo.fragments = 0
        quiet = self._noise.summary(now)
        if quiet:
            log.warning(
                "%d more malformed notify line(s) not logged in the last %.0f s (%d in all)",
                quiet,
                NOISE_EVERY,
                self.malformed,
            )

    def alert(self, kind: str, text: str) -> None:
        """One of lbwatch's own events."""
        self.route(rules.AgentAlert(kind, text))

    def route(self, item: rules.Item) -> None:
        routed = rules.route(self.router, item, self.clock(), time.time(), self.node(), self.cfg)
        self._spool(routed)

    def flush(self, now: float) -> None:
        """The flap window of some instance has passed: send its digest."""
        self._spool(rules.flush(self.router, now, time.time(), self.node(), self.cfg))

    def _spool(self, routed: rules.Routed) -> None:
        self.router = routed.state
        self.wake = routed.wake_at
        for why in routed.dropped:
            log.debug("no notification: %s", why)
        for out in routed.out:
            for channel in out.channels:
                stem = self.spool.stem()
                note = replace(out.notification, ident=stem)
                # Handed to the sender first (see ChannelSender._deliver_handed), then spooled;
                # the sender delivers it while the spool fsyncs.
                self.senders.hand(channel, stem, note)
                self.spooler.submit(channel, note, stem)

    def vrrp_states(self, keepalived: ProcId | None) -> dict[str, str]:
        """Each VRRP instance's and sync group's state as ``keepalived`` (the one running now)
        last reported it, keyed "INSTANCE:NAME" and "GROUP:NAME": what the router folds in (FIFO
        lines, and notify scripts' reports of instances the FIFO never mentioned), over what an
        earlier agent heard from the same keepalived (``vrrpmemo``)."""
        heard = {k: v for k, v in self.router.last.items() if k.startswith(("INSTANCE:", "GROUP:"))}
        return self.memory.states(heard, keepalived)

    def snapshot(self) -> NotifyView:
        return NotifyView(
            fifo=str(self.fifo.path),
            fifo_error=self.fifo_error,
            fifo_notice=self.fifo.notice,
            fifo_unread=self.writer.problem,
            malformed_lines=self.malformed,
            spool=str(self.spool.path),
            held_in_memory=self.spool.held(),
            channels=self.senders.snapshot(),
        )

    def apply_config(self, new: Config) -> None:
        old, self.cfg = self.cfg, new
        if new.notify != old.notify or new.spool_path() != old.spool_path():
            self.senders.stop()  # not waited for here: the new senders wait for them
            self.spooler.stop()
            if new.spool_path() != old.spool_path():
                self.spool = Spool(new.spool_path(), new.notify.spool_max)
            else:
                # The same queue, not a new one: what a full disk makes it hold in memory, and
                # the hand-overs under way, would be lost with the old object.
                self.spool.max = new.notify.spool_max
            self.senders = self._make_senders(new, after=self.senders)
            self.spooler = Spooler(self.spool, self.senders.kick)
            self._watch_spool()
            self.senders.start()
        if new.fifo_path() != old.fifo_path():
            if self.fifo.fd is not None:
                self._sel.remove(self.fifo.fd)
            self.fifo.close()
            self.fifo = FifoReader(new.fifo_path())
            self.open_fifo()

    def close(self) -> None:
        self.spooler.stop()  # what was handed over reaches the disk before exit
        self.senders.stop()
        self._sel.remove(self._spool_watch.fileno())
        self._spool_watch.close()
        self.fifo.close()
