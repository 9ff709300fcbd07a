"""Delivery from the spool: one daemon thread per channel, so a dead SMTP server never delays a
webhook. Each thread sends its channel's oldest message first and keeps the order: a message
that cannot be delivered blocks the ones behind it, and is retried with exponential backoff
(``retry_initial`` doubling up to ``retry_max``). ``kick()`` wakes the threads when the loop has
spooled something new. A message is also handed to its sender as the loop hands it to the
spool writer (``hand``): with nothing ahead of it, it is delivered while it is fsynced, and
``Spool.settle`` keeps it from being sent again from the spool (or, refused for good, sets it
aside at once). One handed over after a message left to the spool waits for that one, even
before its write lands (``Spool.writing``), and the bound never drops the message being sent
(``Spool.sending``), which would count a delivered message as dropped. A crash before the
fsync could lose it either way; handing it over early only adds the chance that it was
delivered. A connection is kept ``keep_open`` seconds once nothing waits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lbwatch import backoff
from lbwatch.notify.channels import Channel, DeliveryError, PermanentDeliveryError
from lbwatch.notify.message import Notification
from lbwatch.notify.spool import Spool
from lbwatch.statusdoc import ChannelView

log = logging.getLogger(__name__)
HELD_RETRY = 1.0  # seconds between tries to write what a full disk refused


@dataclass
class ChannelState:
    failures: int = 0
    next_try: float = 0.0
    last_ok: float | None = None  # wall time
    last_error: str | None = None
    delivered: int = 0
    rejected: int = 0  # refused for good by the server, set aside
    failed: int = 0  # delivery attempts that failed, over the agent's lifetime


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
        self._handed: queue.SimpleQueue[tuple[str, Notification]] = queue.SimpleQueue()
        self._from_spool: set[str] = set()  # stems delivered from the spool, not by hand
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

    def snapshot(self) -> ChannelView:
        with self._lock:
            st = self.state
            retry = max(0.0, st.next_try - time.monotonic()) if st.failures else None
            return ChannelView(
                waiting=len(self.spool.pending(self.channel.name)),
                dropped=self.spool.dropped(self.channel.name),
                delivered=st.delivered,
                rejected=st.rejected,
                failed=st.failed,
                failures_in_a_row=st.failures,
                retry_in=None if retry is None else round(retry, 1),
                last_ok=st.last_ok,
                last_error=st.last_error,
            )

    def _run(self) -> None:
        for old in self._after:
            old.join()  # bounded: a send ends by the channel's timeout
        self._after = ()
        while not self._stopping:
            self._wake.clear()
            self._deliver_handed()
            wait = self._deliver_all()
            if wait is not None:
                self._wake.wait(wait)
            elif not self.channel.keep_open or not self._wake.wait(self.channel.keep_open):
                # Nothing came for keep_open seconds: the kept connection is closed.
                self.channel.idle()
                self._wake.wait()
        self.channel.idle()  # a kept connection is ended, not left to the garbage collector

    def hand(self, stem: str, note: Notification) -> None:
        """``note`` is being spooled as ``stem``: deliver it meanwhile if nothing is ahead of
        it, rather than after the fsync (a failover's mail is not held up by the disk)."""
        self.spool.expect(self.channel.name, stem)
        self._handed.put((stem, note))
        self._wake.set()

    def _deliver_handed(self) -> None:
        """The messages handed over, in order, as long as nothing is ahead of them; the first
        one not delivered here leaves it and the rest to the spool, which keeps the order."""
        name = self.channel.name
        spooled_only = False
        while not self._stopping:
            try:
                stem, note = self._handed.get_nowait()
            except queue.Empty:
                # Each message is handed over before it is spooled, so one the spool path
                # delivered had its hand-over queued already: seen by now.
                self._from_spool.clear()
                return
            if stem in self._from_spool or spooled_only:
                self.spool.unsent(name, stem)
                continue
            # An older message left to the spool whose write has not landed yet is ahead too.
            # Asked first: a write that lands (on disk, or held) after this answer is in the
            # queue looked at next; the other way round it could slip between the two looks.
            writing = self.spool.writing(name, before=stem)
            ahead = [p for p in self.spool.pending(name) if not p.name.startswith(f"{stem}.")]
            if (
                writing
                or ahead
                or self.state.failures
                or self.spool.dropped(name)
                or not self.spool.sending(name, stem)  # dropped by the bound meanwhile
            ):
                self.spool.unsent(name, stem)
                spooled_only = True
                continue
            try:
                self.channel.send(note)
            except PermanentDeliveryError as exc:
                # Set aside now, not offered to the server again from the spool.
                self.spool.settle(name, stem, rejected=True)
                self._rejected(str(exc))
                continue
            except DeliveryError as exc:
                # Spooled as well: retried from there, in order.
                self.spool.unsent(name, stem)
                spooled_only = True
                self.channel.idle()
                self._failed(str(exc), 1)
                continue
            except Exception as exc:
                self.spool.unsent(name, stem)
                spooled_only = True
                log.exception("sending via %s failed unexpectedly", name)
                self._failed(f"internal error: {type(exc).__name__}", 1)
                continue
            self.spool.settle(name, stem)
            self._delivered(note)

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
            stem = files[0].name.split(".", 1)[0]
            note = self.spool.load(files[0])
            if note is None or not self.spool.sending(name, stem):
                continue  # gone meanwhile (unreadable, or dropped by the bound)
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
                self._rejected(str(exc))
                continue
            except DeliveryError as exc:
                self.spool.unsent(name, stem)
                self.channel.idle()
                self._failed(str(exc), len(files))
                continue
            except Exception as exc:  # a bug in a channel must not kill delivery for good
                self.spool.unsent(name, stem)
                log.exception("sending via %s failed unexpectedly", name)
                self._failed(f"internal error: {type(exc).__name__}", len(files))
                continue
            self.spool.remove(files[0])
            self._from_spool.add(stem)
            if dropped:
                self.spool.clear_dropped(name, dropped)
            self._delivered(note)
        return None

    def _delivered(self, note: Notification) -> None:
        with self._lock:
            if self.state.failures:
                log.info(
                    "%s delivers again after %d failed attempts",
                    self.channel.name,
                    self.state.failures,
                )
            self.state = ChannelState(
                last_ok=time.time(),
                delivered=self.state.delivered + 1,
                rejected=self.state.rejected,
            )
        log.info("notification sent via %s: %s", self.channel.name, note.subject)

    def _rejected(self, why: str) -> None:
        with self._lock:
            self.state.rejected += 1
            self.state.last_error = why
        log.error(
            "%s refused a notification for good (%s); kept in %s, going on",
            self.channel.name,
            why,
            self.spool.path / "rejected",
        )

    def _failed(self, why: str, waiting: int) -> None:
        with self._lock:
            failures = self.state.failures + 1
            delay = backoff.delay(failures, self.initial, self.cap)
            self.state.failures = failures
            self.state.failed += 1
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
        # Kept, and passed on by threads(): a reload to a config without a channel makes no
        # sender that would wait for the old ones, and the next reload's senders must still.
        self._after = after.threads() if after is not None else ()
        self.by_name: dict[str, ChannelSender] = {
            n: ChannelSender(c, spool, initial, cap, self._after) for n, c in channels.items()
        }

    def threads(self) -> tuple[threading.Thread, ...]:
        """These senders' threads, and those of replaced ones still finishing a message."""
        mine = tuple(s.thread for s in self.by_name.values())
        return mine + tuple(t for t in self._after if t.is_alive())

    def start(self) -> None:
        for s in self.by_name.values():
            s.start()

    def kick(self) -> None:
        for s in self.by_name.values():
            s.kick()

    def hand(self, channel: str, stem: str, note: Notification) -> None:
        sender = self.by_name.get(channel)
        if sender is not None:
            sender.hand(stem, note)

    def stop(self, wait: float | None = None) -> None:
        for s in self.by_name.values():
            s.stop()
        if wait is not None:
            for s in self.by_name.values():
                s.stop(wait)

    def snapshot(self) -> dict[str, ChannelView]:
        return {n: s.snapshot() for n, s in self.by_name.items()}


class Spooler:
    """Writes routed messages to the spool on its own thread, so an fsync on a slow disk never
    holds up the event loop (and with it the reaction to a dying haproxy). A burst becomes one
    batch: a file fsync each, one directory fsync, then the senders are kicked. The window
    between the loop handing a message over and its fsync is the one place a crash can lose it."""

    def __init__(self, spool: Spool, on_written: Callable[[], None]) -> None:
        self.spool = spool
        self.on_written = on_written
        self._queue: queue.SimpleQueue[tuple[str, Notification, str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lbwatch-spooler", daemon=True)
        self._thread.start()

    def submit(self, channel: str, note: Notification, stem: str) -> None:
        """``stem``: the message's spool name, from ``Spool.stem()``."""
        self._queue.put((channel, note, stem))

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what was handed over, then end."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                # While the disk has no room, what it refused is tried again every so often.
                first = self._queue.get(timeout=HELD_RETRY if self.spool.held() else None)
            except queue.Empty:
                self._write_held()
                continue
            batch = [first]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [b for b in batch if b is not None]
            if self.spool.held():
                self._write_held()  # older than the batch: on disk first, and not starved by it
            written = 0
            for channel, note, stem in items:
                try:
                    self.spool.put(channel, note, sync_dir=False, stem=stem)
                    written += 1
                except OSError as exc:
                    log.error(
                        "cannot spool a notification for %s under %s: %s; %d held in memory "
                        "until it has room",
                        channel,
                        self.spool.path,
                        exc,
                        self.spool.held(),
                    )
            if written:
                try:
                    self.spool.sync()
                except OSError as exc:
                    log.error("cannot sync the spool %s: %s", self.spool.path, exc)
                self.on_written()
            if None in batch:
                return

    def _write_held(self) -> None:
        held = self.spool.held()
        try:
            left = self.spool.write_held()
        except OSError as exc:
            log.error("cannot sync the spool %s: %s", self.spool.path, exc)
            return
        if left < held:
            if not left:
                log.info(
                    "the spool %s has room again: %d notification(s) held in memory written",
                    self.spool.path,
                    held,
                )
            self.on_written()
