"""Delivery from the spool: one daemon thread per channel, so a dead SMTP server never delays a
webhook. Each thread sends its channel's oldest message first and keeps the order: a message
that cannot be delivered blocks the ones behind it, and is retried with exponential backoff
(``retry_initial`` doubling up to ``retry_max``). ``kick()`` wakes the threads when the loop has
spooled something new; ``warm()``, called as the loop hands a message to the spool writer, has
the connection opened (or checked) while the message is fsynced, so a failover's mail pays no
handshake after it. A connection is kept ``keep_open`` seconds once nothing waits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lbwatch import backoff
from lbwatch.notify.channels import Channel, DeliveryError, PermanentDeliveryError
from lbwatch.notify.message import Notification
from lbwatch.notify.spool import Spool

log = logging.getLogger(__name__)
# A connection warmed for a message being spooled is kept at least this long for it.
WARM_HOLD = 1.0


@dataclass
class ChannelState:
    failures: int = 0
    next_try: float = 0.0
    last_ok: float | None = None  # wall time
    last_error: str | None = None
    delivered: int = 0
    rejected: int = 0  # refused for good by the server, set aside


class ChannelSender:
    def __init__(
        self,
        channel: Channel,
        spool: Spool,
        initial: float,
        cap: float,
        after: tuple[threading.Thread, ...] = (),
    ) -> None:
        self.channel = channel
        # Senders this one replaces (a reload that changed [notify]): it starts delivering only
        # once they have finished the message they were sending, or that message would go twice.
        self._after = after
        self.spool = spool
        self.initial, self.cap = initial, cap
        self.state = ChannelState()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._warm = False
        self.thread = threading.Thread(
            target=self._run, name=f"lbwatch-send-{channel.name}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        self._wake.set()

    def stop(self, wait: float | None = None) -> None:
        """Stop after the message in hand; ``wait``: also wait for that, at most so long."""
        self._stopping = True
        self._wake.set()
        if wait is not None and self.thread.is_alive():
            self.thread.join(wait)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            st = self.state
            retry = max(0.0, st.next_try - time.monotonic()) if st.failures else None
            return {
                "waiting": len(self.spool.pending(self.channel.name)),
                "dropped": self.spool.dropped(self.channel.name),
                "delivered": st.delivered,
                "rejected": st.rejected,
                "failures_in_a_row": st.failures,
                "retry_in": None if retry is None else round(retry, 1),
                "last_ok": st.last_ok,
                "last_error": st.last_error,
            }

    def _run(self) -> None:
        for old in self._after:
            old.join()  # bounded: a send ends by the channel's timeout
        self._after = ()
        while not self._stopping:
            self._wake.clear()
            hold = self.channel.keep_open
            if self._warm:
                self._warm = False
                self._warm_up()
                hold = max(hold, WARM_HOLD)  # the message being spooled is coming
            wait = self._deliver_all()
            if wait is not None:
                self._wake.wait(wait)
            elif not hold or not self._wake.wait(hold):
                # Nothing came for keep_open seconds: the kept connection is closed.
                self.channel.idle()
                self._wake.wait()
        self.channel.idle()  # a kept connection is ended, not left to the garbage collector

    def warm(self) -> None:
        """A message for this channel is being spooled: have the connection ready meanwhile."""
        self._warm = True
        self._wake.set()

    def _warm_up(self) -> None:
        if self.state.failures or time.monotonic() < self.state.next_try:
            return  # failing: the retry connects, once
        try:
            self.channel.warm()
        except Exception:  # send() connects again and says what is wrong
            log.debug("%s: warming the connection failed", self.channel.name, exc_info=True)

    def _deliver_all(self) -> float | None:
        """Deliver until the spool is empty (None) or a failure; then seconds until a retry."""
        name = self.channel.name
        while not self._stopping:
            now = time.monotonic()
            if now < self.state.next_try:
                return self.state.next_try - now
            files = self.spool.pending(name)
            if not files:
                return None
            note = self.spool.load(files[0])
            if note is None:
                continue
            dropped = self.spool.dropped(name)
            if dropped:
                note = note.with_note(
                    f"({dropped} earlier notification(s) for {name} were dropped because the "
                    "spool was full.)"
                )
            try:
                self.channel.send(note)
            except PermanentDeliveryError as exc:
                # Refused for good: set it aside (kept in rejected/) and go on with the rest.
                self.spool.reject(files[0])
                with self._lock:
                    self.state.rejected += 1
                    self.state.last_error = str(exc)
                log.error(
                    "%s refused a notification for good (%s); kept in %s, going on",
                    name,
                    exc,
                    self.spool.path / "rejected",
                )
                continue
            except DeliveryError as exc:
                self.channel.idle()
                self._failed(str(exc), len(files))
                continue
            except Exception as exc:  # a bug in a channel must not kill delivery for good
                log.exception("sending via %s failed unexpectedly", name)
                self._failed(f"internal error: {type(exc).__name__}", len(files))
                continue
            self.spool.remove(files[0])
            if dropped:
                self.spool.clear_dropped(name, dropped)
            with self._lock:
                if self.state.failures:
                    log.info(
                        "%s delivers again after %d failed attempts", name, self.state.failures
                    )
                self.state = ChannelState(
                    last_ok=time.time(),
                    delivered=self.state.delivered + 1,
                    rejected=self.state.rejected,
                )
            log.info("notification sent via %s: %s", name, note.subject)
        return None

    def _failed(self, why: str, waiting: int) -> None:
        with self._lock:
            failures = self.state.failures + 1
            delay = backoff.delay(failures, self.initial, self.cap)
            self.state.failures = failures
            self.state.next_try = time.monotonic() + delay
            self.state.last_error = why
        log.warning(
            "%s delivery failed (%s); %d message(s) waiting, next try in %.0f s",
            self.channel.name,
            why,
            waiting,
            delay,
        )


class Senders:
    """All channels' senders."""

    def __init__(
        self,
        channels: dict[str, Channel],
        spool: Spool,
        initial: float,
        cap: float,
        after: Senders | None = None,
    ) -> None:
        """``after``: the senders these replace (stopped): each new one waits for them."""
        old = after.threads() if after is not None else ()
        self.by_name: dict[str, ChannelSender] = {
            n: ChannelSender(c, spool, initial, cap, old) for n, c in channels.items()
        }

    def threads(self) -> tuple[threading.Thread, ...]:
        return tuple(s.thread for s in self.by_name.values())

    def start(self) -> None:
        for s in self.by_name.values():
            s.start()

    def kick(self) -> None:
        for s in self.by_name.values():
            s.kick()

    def warm(self, names: set[str]) -> None:
        for name in names:
            if name in self.by_name:
                self.by_name[name].warm()

    def stop(self, wait: float | None = None) -> None:
        for s in self.by_name.values():
            s.stop()
        if wait is not None:
            for s in self.by_name.values():
                s.stop(wait)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {n: s.snapshot() for n, s in self.by_name.items()}


class Spooler:
    """Writes routed messages to the spool on its own thread, so an fsync on a slow disk never
    holds up the event loop (and with it the reaction to a dying haproxy). A burst becomes one
    batch: a file fsync each, one directory fsync, then the senders are kicked. The window
    between the loop handing a message over and its fsync is the one place a crash can lose it."""

    def __init__(self, spool: Spool, on_written: Callable[[], None]) -> None:
        self.spool = spool
        self.on_written = on_written
        self._queue: queue.SimpleQueue[tuple[str, Notification] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lbwatch-spooler", daemon=True)
        self._thread.start()

    def submit(self, channel: str, note: Notification) -> None:
        self._queue.put((channel, note))

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what was handed over, then end."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [b for b in batch if b is not None]
            written = 0
            for channel, note in items:
                try:
                    self.spool.put(channel, note, sync_dir=False)
                    written += 1
                except OSError as exc:
                    log.error(
                        "cannot spool a notification for %s under %s: %s",
                        channel,
                        self.spool.path,
                        exc,
                    )
            if written:
                try:
                    self.spool.sync()
                except OSError as exc:
                    log.error("cannot sync the spool %s: %s", self.spool.path, exc)
                self.on_written()
            if None in batch:
                return
