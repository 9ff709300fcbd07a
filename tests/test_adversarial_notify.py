"""Adversarial tests of the notification path: the hand-over of a message to its sender while it
is spooled, SMTP connection reuse, senders replaced by a reload, and the boot dedupe of what
notify scripts spooled against keepalived's FIFO. Each test states the promise it holds the
code to; real SMTP server (aiosmtpd) on loopback, the real agent where the agent is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lbwatch.notify.channels import PermanentDeliveryError
from lbwatch.notify.fifo import write_line
from lbwatch.notify.message import Notification, agent
from lbwatch.notify.sender import ChannelSender, Senders, Spooler
from lbwatch.notify.smtp import EmailChannel
from lbwatch.notify.spool import Spool
from tests.conftest import SmtpSink, fill, free_port, needs, use_up_inodes
from tests.test_agent import Rig
from tests.test_agent_notify import NOTIFY_KEYS, email_section, fifo, keepalived_fifo, spooled
from tests.test_notify_delivery import email_cfg
from tests.util import wait_for


class DataLog:
    """Wraps an SmtpSink's DATA handler: counts every DATA by subject (accepted or refused),
    and can hold DATA until ``gate`` is set, as a slow server would."""

    def __init__(self, sink: SmtpSink, hold: bool = False) -> None:
        self.subjects: list[str] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.entered = threading.Event()
        self.once: dict[str, str] = {}  # subject substring -> a reply given once, then accepted
        plain = sink.handle_DATA

        async def handle(server: Any, session: Any, envelope: Any) -> str:
            text = envelope.content.decode(errors="replace")
            subject = next((ln[9:] for ln in text.splitlines() if ln.startswith("Subject: ")), "")
            self.subjects.append(subject)
            self.entered.set()
            for needle, reply in list(self.once.items()):
                if needle in subject:
                    del self.once[needle]
                    return reply
            for _ in range(2000):  # at most 20 s
                if self.gate.is_set():
                    break
                await asyncio.sleep(0.01)
            return str(await plain(server, session, envelope))

        sink.handle_DATA = handle  # type: ignore[method-assign]

    def count(self, needle: str) -> int:
        return sum(needle in s for s in self.subjects)


def seen_twice(data: DataLog, within: float) -> bool:
    """Whether a second DATA arrives within ``within`` seconds: the window in which a sender
    that did not wait for the first one would have offered the message again."""
    try:
        wait_for(lambda: len(data.subjects) >= 2, within)
    except TimeoutError:
        return False
    return True


def note(text: str) -> Notification:
    return agent("lb1", "test", text, 1.7e9)


def texts(sink: SmtpSink) -> list[str]:
    return [s.split(": ", 1)[1] for s in sink.subjects()]


# -- the hand-over --------------------------------------------------------------------------------


def test_a_message_left_to_the_spool_is_not_overtaken_by_the_next_handed_one(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    """A message handed over while another waits in the queue is left to the spool; a message
    handed over after it must not be sent before it, even when its spool write has not landed
    yet (a slow fsync): the channel keeps its order."""
    data = DataLog(smtp, hold=True)
    spool = Spool(tmp_path / "spool", 100)
    spool.put("email", note("0 waiting"))  # e.g. spooled by `lbwatch notify`
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port, keep_open=0.3)), spool, 0.1, 0.4)
    first, first_stem = note("1 handed while 0 waits"), spool.stem()
    sender.hand(first_stem, first)  # its spool write is slow: not on disk yet
    sender.start()
    try:
        assert data.entered.wait(10), "message 0 reached DATA"
        second, second_stem = note("2 handed after 0 went"), spool.stem()
        sender.hand(second_stem, second)  # its hand-over is looked at as soon as 0 is sent
        data.gate.set()
        # The kept connection is closed once the sender has nothing left that it may send.
        wait_for(lambda: smtp.quits == 1, 10, what="the sender going quiet")
        spool.put("email", first, stem=first_stem)  # the spool writer catches up, in order
        spool.put("email", second, stem=second_stem)
        sender.kick()
        wait_for(lambda: len(smtp.messages) == 3, 10, what="all three")
        wait_for(lambda: not spool.pending("email"), 5, what="an empty queue")
    finally:
        sender.stop(wait=10)
    assert texts(smtp) == ["0 waiting", "1 handed while 0 waits", "2 handed after 0 went"]


def test_a_message_refused_for_good_by_hand_is_not_sent_again_from_the_spool(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    """A handed message the server refuses for good (550 to DATA) is set aside in
    spool/rejected/ after that one refusal, not offered to the server a second time from the
    spool (positive control: the next message goes out)."""
    data = DataLog(smtp)
    smtp.refuse["refused"] = "550 5.7.1 content refused"
    spool = Spool(tmp_path / "spool", 100)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.4)
    sender.start()
    try:
        for text in ("refused here", "after it"):
            stem = spool.stem()
            sender.hand(stem, note(text))
            spool.put("email", note(text), stem=stem)
        wait_for(lambda: texts(smtp) == ["after it"], 10, what="the message after it")
        wait_for(lambda: sender.snapshot().rejected == 1, 10, what="the refusal counted")
        assert len(list((spool.path / "rejected").glob("*.email.json"))) == 1
        assert not spool.pending("email")
    finally:
        sender.stop(wait=10)
    assert data.count("refused here") == 1, data.subjects


def test_a_refusal_on_a_kept_connection_is_not_retried_afresh(smtp: SmtpSink) -> None:
    """On a kept connection, only a dead connection (or the server's 421 closing it) is worth
    a second try on a new one: a 550 to DATA is the server's answer about this message and is
    raised at once, the message offered once (positive control: a 421 is retried afresh)."""
    data = DataLog(smtp)
    channel = EmailChannel(email_cfg(smtp.port))
    try:
        channel.send(note("opens the connection"))
        data.once["closing"] = "421 4.3.2 shutting down"
        channel.send(note("closing, then retried"))  # kept one answers 421; a new one takes it
        assert data.count("closing, then retried") == 2
        assert texts(smtp) == ["opens the connection", "closing, then retried"]
        channel.send(note("keeps it again"))
        smtp.refuse["refused"] = "550 5.7.1 content refused"
        with pytest.raises(PermanentDeliveryError, match="550"):
            channel.send(note("refused for good"))
    finally:
        channel.idle()
    assert data.count("refused for good") == 1, data.subjects


def test_a_message_sent_by_hand_while_the_spool_overflows_is_not_counted_as_dropped(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    """Five messages handed over at once into a spool that keeps two: the one being sent by
    hand meanwhile is delivered, so the drop count written into the next message names only
    those really dropped (delivered + counted = 5)."""
    data = DataLog(smtp, hold=True)
    spool = Spool(tmp_path / "spool", 2)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.4)
    burst = [(spool.stem(), note(f"m{i}")) for i in range(5)]
    for stem, n in burst:
        sender.hand(stem, n)
    sender.start()
    try:
        assert data.entered.wait(10), "m0 reached DATA"
        for stem, n in burst:  # the spool writer, while m0 is being sent
            spool.put("email", n, stem=stem)
        data.gate.set()
        wait_for(lambda: sender.snapshot().delivered >= 2, 10, what="delivery")
        wait_for(lambda: not spool.pending("email"), 10, what="an empty queue")
        wait_for(lambda: len(smtp.messages) == sender.snapshot().delivered, 5)
    finally:
        sender.stop(wait=10)
    said = [re.findall(r"\((\d+) earlier", m.get_content()) for m in smtp.messages]
    counted = sum(int(n) for found in said for n in found)
    assert texts(smtp)[0] == "m0"
    assert len(smtp.messages) + counted == 5, (texts(smtp), said)
    assert spool.dropped("email") == 0


def spool_as_the_hub(sender: ChannelSender, spooler: Spooler, text: str) -> str:
    """One message routed as the hub does it: handed to its sender, then to the spool writer."""
    stem = sender.spool.stem()
    sender.hand(stem, replace(note(text), ident=stem))
    spooler.submit(sender.channel.name, replace(note(text), ident=stem), stem)
    return stem


@contextlib.contextmanager
def threads(
    spool: Spool, port: int, retry: tuple[float, float] = (0.1, 0.4)
) -> Iterator[tuple[ChannelSender, Spooler]]:
    """The agent's two threads for one email channel over ``spool``, as the hub runs them: its
    sender (started) and the spool writer; both stopped at the end."""
    sender = ChannelSender(EmailChannel(email_cfg(port)), spool, *retry)
    spooler = Spooler(spool, sender.kick)
    sender.start()
    try:
        yield sender, spooler
    finally:
        sender.stop(wait=10)
        spooler.stop()


def test_a_handed_message_the_disk_has_no_room_for_is_still_sent_by_hand(
    small_disk: Path, smtp: SmtpSink
) -> None:
    """The spool's disk is full: the handed message cannot be written, and with the server
    up its sender delivers it from memory, once, and nothing stays queued."""
    spool = Spool(small_disk / "spool", 100)
    fill(small_disk)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.4)
    stem = spool.stem()
    sender.hand(stem, note("not on disk"))
    with pytest.raises(OSError):
        spool.put("email", note("not on disk"), stem=stem)
    assert spool.held() == 1
    sender.start()
    try:
        wait_for(lambda: texts(smtp) == ["not on disk"], 10, what="delivery by hand")
        wait_for(lambda: sender.snapshot().delivered == 1, 5, what="the delivery counted")
    finally:
        sender.stop(wait=10)
    assert not spool.pending("email") and spool.held() == 0


def test_a_message_settled_before_its_write_fails_leaves_nothing_behind(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Handed over, refused for good by its server before the spool write, whose write then
    fails for want of room: nothing is held, nothing queued, the hand-over's record is gone
    (it was kept forever), and the log says it could not be set aside."""
    spool = Spool(small_disk / "spool", 100)
    fill(small_disk)
    stem = spool.stem()
    spool.expect("email", stem)
    spool.settle("email", stem, rejected=True)
    with pytest.raises(OSError):
        spool.put("email", note("refused early"), stem=stem)
    assert spool.held() == 0 and not spool.pending("email")
    assert not spool._settled
    assert "could not be set aside" in caplog.text


def test_no_room_on_disk_and_the_server_down_loses_nothing(
    small_disk: Path, smtp: SmtpSink
) -> None:
    """The disk full and the SMTP server down while two events come: neither can be written
    nor sent. Held in memory, both are in the queue (status counts them); when the server is
    back both are delivered, in order, once each, although the disk is still full."""
    spool = Spool(small_disk / "spool", 100)
    fill(small_disk)
    smtp.stop()
    with threads(spool, smtp.port) as (sender, spooler):
        for text in ("first", "second"):
            spool_as_the_hub(sender, spooler, text)
        wait_for(lambda: spool.held() == 2, 10, what="both held in memory")
        wait_for(lambda: sender.snapshot().failures_in_a_row >= 2, 10, what="sends failing")
        assert sender.snapshot().waiting == 2
        smtp.start()
        wait_for(lambda: len(texts(smtp)) == 2, 10, what="both delivered")
        wait_for(lambda: spool.held() == 0, 5, what="nothing held")
    assert texts(smtp) == ["first", "second"]
    assert not spool.pending("email")


def test_what_was_held_reaches_the_disk_once_it_has_room(small_disk: Path, smtp: SmtpSink) -> None:
    """With the server down and the disk full an event is held in memory; once the disk has
    room again it is written to the spool (it survives an agent restart from then on) within
    a retry, and sent once when the server is back."""
    spool = Spool(small_disk / "spool", 100)
    filler = fill(small_disk)
    smtp.stop()
    with threads(spool, smtp.port, (0.5, 1.0)) as (sender, spooler):
        stem = spool_as_the_hub(sender, spooler, "held")
        wait_for(lambda: spool.held() == 1, 10, what="held in memory")
        assert not list(spool.path.glob("*.json"))
        filler.unlink()
        wait_for(lambda: spool.held() == 0, 10, what="written once the disk has room")
        assert [p.name for p in spool.path.glob("*.json")] == [f"{stem}.email.json"]
        smtp.start()
        wait_for(lambda: texts(smtp) == ["held"], 10, what="delivered")
        wait_for(lambda: not spool.pending("email"), 5, what="removed from the spool")
    assert texts(smtp) == ["held"]


def test_a_wall_clock_stepped_back_never_puts_a_new_message_ahead(tmp_path: Path) -> None:
    """Names sort in delivery order and come from the wall clock: one written an hour before a
    backward clock step would sort after every new one. New names come after the newest seen,
    in the same agent and in one started after the step."""
    ahead = time.time_ns() + 3600 * 10**9  # the clock was an hour ahead, then stepped back
    spool = Spool(tmp_path / "spool", 100)
    spool.put("email", note("before the step"), stem=f"{ahead:020d}-1-0")
    spool.put("email", note("after the step"))
    restarted = Spool(tmp_path / "spool", 100)
    restarted.put("email", note("after a restart"))
    order = [restarted.load(p) for p in restarted.pending("email")]
    assert [n.subject.split(": ", 1)[1] for n in order if n] == [
        "before the step",
        "after the step",
        "after a restart",
    ]


def test_room_for_one_of_three_held_keeps_the_order_on_disk_and_in_the_mail(
    small_disk: Path, smtp: SmtpSink
) -> None:
    """Three messages held, the server down; the disk frees one page, room for one message:
    the oldest is written, the other two stay held (and a fourth joins them), and when the
    server is back all four are mailed once each, in order, from disk and memory mixed."""
    spool = Spool(small_disk / "spool", 100)
    reserve = small_disk / ".reserve"
    reserve.write_bytes(b"\0" * 4096)  # one page, freed later
    fill(small_disk)
    smtp.stop()
    with threads(spool, smtp.port) as (sender, spooler):
        stems = [spool_as_the_hub(sender, spooler, text) for text in ("a", "b", "c")]
        wait_for(lambda: spool.held() == 3, 10, what="three held")
        reserve.unlink()
        wait_for(lambda: spool.held() == 2, 10, what="the oldest written")
        assert [p.name for p in spool.path.glob("*.json")] == [f"{stems[0]}.email.json"]
        spool_as_the_hub(sender, spooler, "d")
        wait_for(lambda: spool.held() == 3, 10, what="the fourth held")
        smtp.start()
        wait_for(lambda: not spool.pending("email") and not spool.held(), 10, what="all out")
    assert texts(smtp) == ["a", "b", "c", "d"]


def test_a_full_disk_keeps_the_bound_and_counts_what_it_drops(
    small_disk: Path, smtp: SmtpSink
) -> None:
    """Five messages into a spool that keeps two while the disk is full (no inode left either):
    the bound holds for messages held in memory too (else memory grows without end), the
    three oldest dropped and counted although neither the count nor the lock file that guards
    it can be written; the next one delivered names them."""
    spool = Spool(small_disk / "spool", 2)
    fill(small_disk)
    use_up_inodes(small_disk)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.4)
    spooler = Spooler(spool, sender.kick)
    try:
        for i in range(5):
            spool_as_the_hub(sender, spooler, f"m{i}")
        wait_for(lambda: spool.held() + spool.dropped("email") == 5, 10, what="all five queued")
        assert (spool.held(), spool.dropped("email")) == (2, 3)
        sender.start()
        wait_for(lambda: not spool.pending("email"), 10, what="an empty queue")
    finally:
        sender.stop(wait=10)
        spooler.stop()
    assert texts(smtp) == ["m3", "m4"]
    assert "(3 earlier notification(s)" in smtp.messages[0].get_content()
    assert spool.dropped("email") == 0


def test_a_held_message_reaches_the_disk_before_a_newer_one(small_disk: Path) -> None:
    """A message is held for want of room; room comes back and the next message is spooled at
    once: the held one is written first, not left in memory behind a newer one on disk (while
    messages keep coming faster than the retry, it would never be written)."""
    spool = Spool(small_disk / "spool", 100)
    filler = fill(small_disk)
    sender = ChannelSender(EmailChannel(email_cfg(free_port())), spool, 0.1, 0.4)  # not started
    spooler = Spooler(spool, sender.kick)
    try:
        held = spool_as_the_hub(sender, spooler, "held")
        wait_for(lambda: spool.held() == 1, 10, what="held in memory")
        filler.unlink()
        newer = spool_as_the_hub(sender, spooler, "newer")
        wait_for((spool.path / f"{newer}.email.json").exists, 10, what="newer written")
        assert (spool.path / f"{held}.email.json").exists() and spool.held() == 0
    finally:
        spooler.stop()


def test_a_refusal_with_no_room_even_for_rejected_does_not_stop_delivery(
    small_disk: Path, smtp: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    """No inode left, so not even rejected/ can be made: a message refused for good (550),
    on disk or held in memory, leaves the queue all the same (logged, as it cannot be kept)
    and the sender goes on with the next one; before, the mkdir's error ended its thread."""
    smtp.refuse["refused"] = "550 5.7.1 content refused"
    spool = Spool(small_disk / "spool", 100)
    spool.put("email", note("refused, on disk"))
    fill(small_disk)
    use_up_inodes(small_disk)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.4)
    spooler = Spooler(spool, sender.kick)
    try:
        spool_as_the_hub(sender, spooler, "refused, held")
        spool_as_the_hub(sender, spooler, "after them")
        wait_for(lambda: spool.held() == 2, 10, what="both held in memory")
        sender.start()
        wait_for(lambda: texts(smtp) == ["after them"], 10, what="the next one delivered")
        wait_for(lambda: not spool.pending("email"), 5, what="an empty queue")
    finally:
        sender.stop(wait=10)
        spooler.stop()
    assert sender.snapshot().rejected == 2
    assert caplog.text.count("could not be set aside") == 2


class LandsLate(Spool):
    """A spool whose writer's puts of ``late`` land just as a sender asks whether an older
    message is still being written: the race between the spooler and the sender thread."""

    late: tuple[tuple[str, Notification], ...] = ()

    def writing(self, channel: str, before: str) -> bool:
        late, self.late = self.late, ()
        for stem, n in late:
            with contextlib.suppress(OSError):  # no room: held in memory
                self.put(channel, n, stem=stem)
        return super().writing(channel, before)


def test_a_message_held_as_the_next_is_handed_over_is_not_overtaken(
    small_disk: Path, smtp: SmtpSink
) -> None:
    """1 is left to the spool (0 waits); 2 is handed over after 0 went, and the full disk makes
    the spool hold 1 and 2 just as the sender looks whether anything is ahead of 2: 2 must
    not be sent by hand before 1."""
    data = DataLog(smtp, hold=True)
    spool = LandsLate(small_disk / "spool", 100)
    spool.put("email", note("0 waiting"))
    fill(small_disk)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.4)
    first = spool.stem()
    sender.hand(first, note("1 left to the spool"))
    sender.start()
    try:
        assert data.entered.wait(10), "message 0 reached DATA"
        second = spool.stem()
        sender.hand(second, note("2 handed after 0 went"))
        spool.late = ((first, note("1 left to the spool")), (second, note("2 handed after 0 went")))
        data.gate.set()
        wait_for(lambda: len(smtp.messages) == 3, 10, what="all three")
        wait_for(lambda: not spool.pending("email"), 5, what="an empty queue")
    finally:
        sender.stop(wait=10)
    assert texts(smtp) == ["0 waiting", "1 left to the spool", "2 handed after 0 went"]


def churn(disk: Path, smtp: SmtpSink, stop: threading.Event) -> None:
    """Until ``stop``: fill ``disk`` (its blocks, every third time its inodes too) and free it
    every few ms; have the server refuse everything for a while now and then (451: try again
    later; a server stopped under a reply would make a duplicate at-least-once allows)."""
    for i in range(10_000):  # bounded in count too
        if stop.wait(0.003 * (1 + i % 7)):
            return
        taken = list(disk.glob(".[fi]*"))  # .filler, .inode<N>
        for path in taken:
            path.unlink()
        if not taken:
            with contextlib.suppress(OSError):  # no inode left for .filler: full already
                fill(disk)
            if i % 3 == 0:
                use_up_inodes(disk)
        if i % 29 in (5, 20):  # a new dict, not changed in place: the server reads it meanwhile
            smtp.refuse = {"": "451 4.3.0 try again later"} if i % 29 == 5 else {}


def test_a_disk_filling_and_freeing_under_a_stream_mails_each_message_once_in_order(
    small_disk: Path, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 messages handed over as the hub does, into a spool that keeps 30, while another
    thread fills the disk (its blocks, or its inodes too) and frees it every few ms and the
    server refuses everything now and then, and held messages are written as often as they can
    be: each message is mailed once, in order, or counted once as dropped (mailed + counted =
    300), and nothing stays queued or held."""
    import lbwatch.notify.sender as sender_module

    monkeypatch.setattr(sender_module, "HELD_RETRY", 0.005)
    spool = Spool(small_disk / "spool", 30)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port, keep_open=0.2)), spool, 0.02, 0.1)
    spooler = Spooler(spool, sender.kick)
    stop = threading.Event()
    chaos = threading.Thread(target=churn, args=(small_disk, smtp, stop))
    sender.start()
    chaos.start()
    try:
        for i in range(300):
            spool_as_the_hub(sender, spooler, f"m{i:03d}")
            if i % 20 == 0:
                stop.wait(0.01)  # now and then a pause: the spooler's retry of held messages
        stop.set()
        chaos.join()
        for path in small_disk.glob(".[fi]*"):
            path.unlink()
        smtp.refuse = {}
        wait_for(lambda: not spool.pending("email") and not spool.held(), 30, what="all out")
    finally:
        stop.set()
        chaos.join()
        sender.stop(wait=10)
        spooler.stop()
    mailed = texts(smtp)
    said = [re.findall(r"\((\d+) earlier", m.get_content()) for m in smtp.messages]
    assert mailed == sorted(set(mailed)), "out of order or twice"
    assert len(mailed) + sum(int(n) for ns in said for n in ns) + spool.dropped("email") == 300


# -- senders replaced by reloads -------------------------------------------------------------------


def test_senders_replaced_twice_through_no_channel_never_send_a_message_twice(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    """A reload that removes every channel while a message is being sent, then one that adds
    the channel back: the new sender waits for the first one to finish that message, so it is
    sent once (as for a single reload, tests/test_notify_delivery.py)."""
    data = DataLog(smtp, hold=True)
    spool = Spool(tmp_path / "spool", 10)
    spool.put("email", note("in flight"))
    first = Senders({"email": EmailChannel(email_cfg(smtp.port))}, spool, 0.05, 0.2)
    first.start()
    assert data.entered.wait(10), "the first send reached DATA"
    first.stop()  # SIGHUP: [notify.email] removed
    none = Senders({}, spool, 0.05, 0.2, after=first)
    none.start()
    none.stop()  # SIGHUP: [notify.email] back
    again = Senders({"email": EmailChannel(email_cfg(smtp.port))}, spool, 0.05, 0.2, after=none)
    again.start()
    try:
        # A sender that did not wait finds the message still spooled and offers it again at
        # once; a second DATA is looked for while the first is held (a slow server).
        seen_twice(data, 1.0)
        data.gate.set()
        wait_for(lambda: not spool.pending("email"), 10, what="the spool emptied")
        spool.put("email", note("after the reloads"))
        again.kick()
        wait_for(lambda: len(smtp.messages) >= 2, 10, what="the next message")
    finally:
        data.gate.set()
        again.stop(wait=10)
        first.stop(wait=10)
    assert texts(smtp) == ["in flight", "after the reloads"]


def test_a_reload_keeps_what_the_full_disk_made_the_spool_hold(
    tmp_path: Path, small_disk: Path, smtp: SmtpSink
) -> None:
    """The disk full and the server down, an alert is held in memory; a reload that changes
    [notify] (not the spool's path) comes meanwhile: the new senders still have it, and it is
    delivered once when the server is back."""
    from lbwatch.config import Config
    from lbwatch.loop import Selector
    from lbwatch.notify.hub import NotifyHub
    from lbwatch.status_text import _notify_lines
    from tests.fakes import config

    def cfg(retry: float) -> Config:
        email = {"host": "127.0.0.1", "port": smtp.port, "security": "plain", "timeout": 2}
        return config(
            agent={"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
            notify={
                "fifo": str(tmp_path / "keepalived.fifo"),
                "spool_dir": str(small_disk / "spool"),
                "retry_initial": retry,
                "email": {**email, "sender": "lb1@example.org", "to": ["ops@example.org"]},
            },
        )

    smtp.stop()
    hub = NotifyHub(cfg(0.1), Selector(), lambda: 1000.0, lambda: "lb1")
    fill(small_disk)
    hub.start()
    try:
        hub.alert("test", "held across the reload")
        wait_for(lambda: hub.snapshot().held_in_memory == 1, 10, what="held in memory")
        hub.apply_config(cfg(0.2))  # SIGHUP
        assert hub.snapshot().held_in_memory == 1
        # `lbwatch status` says so, and what it would cost.
        said = "\n".join(_notify_lines(hub.snapshot()))
        assert "NO ROOM on disk: 1 message(s) held in memory" in said
        assert "lost if lbwatch stops meanwhile" in said
        smtp.start()
        wait_for(lambda: len(smtp.messages) == 1, 10, what="the held alert delivered")
        wait_for(lambda: not hub.spool.pending(), 5, what="an empty queue")
    finally:
        hub.close()
    assert len(smtp.messages) == 1


# -- the boot dedupe, with the real agent ----------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink(free_port())  # not started: each test decides
    yield s
    s.stop()


@pytest.fixture
def arig(tmp_path: Path, sink: SmtpSink) -> Iterator[Rig]:
    r = Rig(tmp_path)
    r.write_config(notify=NOTIFY_KEYS, extra=email_section(sink.port))
    try:
        yield r
    finally:
        r.close()


def script(rig: Rig, state: str) -> None:
    """keepalived running its notify script: `lbwatch notify INSTANCE VI_1 STATE 100`."""
    out = rig.cli("notify", "INSTANCE", "VI_1", state, "100")
    assert out.returncode == 0, out.stderr


@needs("haproxy", "start-stop-daemon")
@pytest.mark.usefixtures("subreaper")
def test_a_fifo_unusable_at_start_is_not_matched_later_against_the_boot_spool(
    arig: Rig, sink: SmtpSink
) -> None:
    """The spooled transitions are matched against the FIFO's reading at start only: with no
    usable FIFO at start (a file in its place), a FIFO made later holds only new transitions,
    and its MASTER is mailed, not dropped as a copy of the MASTER the script spooled at boot."""
    path = fifo(arig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a fifo")
    script(arig, "MASTER")  # no agent: spooled
    assert len(spooled(arig)) == 1  # positive control: the script did spool
    sink.start()
    arig.start()
    wait_for(arig.both_up, 10, what="both services up")
    wait_for(lambda: len(sink.messages) == 1, 10, what="the spooled MASTER")
    assert "notify FIFO unusable" in arig.text()
    path.unlink()  # the operator fixes it; keepalived, restarted, writes its new transitions
    os.mkfifo(path, 0o600)
    ka = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        for state in ("BACKUP", "MASTER"):
            os.write(ka, f'INSTANCE "VI_1" {state} 100\n'.encode())
        wait_for(lambda: "reopened" in arig.text(), 10, what="the FIFO opened")
        os.write(ka, b'INSTANCE "VI_1" FAULT 0\n')
        wait_for(lambda: any("FAULT" in s for s in sink.subjects()), 10, what="the FAULT")
    finally:
        os.close(ka)
    assert sink.subjects() == [
        "[lbwatch] t1: VI_1 MASTER (priority 100)",
        "[lbwatch] t1: VI_1 BACKUP -> MASTER (priority 100)",
        "[lbwatch] t1: VI_1 MASTER -> FAULT (priority 0)",
    ]


@needs("haproxy", "start-stop-daemon")
@pytest.mark.usefixtures("subreaper")
def test_a_script_report_matched_at_one_start_is_not_matched_again_at_the_next(
    arig: Rig, sink: SmtpSink
) -> None:
    """A MASTER the script spooled at boot, still waiting (SMTP down), was matched at the
    first agent's start with the FIFO's copy; the agent hangs and is killed (the watchdog),
    and the MASTER keepalived wrote meanwhile, whose script found the agent still holding its
    lock and so wrote to the FIFO instead of spooling, is a transition of its own: the next
    agent mails it, it is no copy of that old spooled one."""
    with keepalived_fifo(arig) as ka:
        os.write(ka, b'INSTANCE "VI_1" MASTER 100\n')
        script(arig, "MASTER")  # no agent: spooled
        assert len(spooled(arig)) == 1
        arig.start()  # SMTP down: the spooled MASTER stays queued
        wait_for(arig.both_up, 10, what="both services up")
        wait_for(lambda: "VI_1 MASTER was spooled by the notify script" in arig.text(), 10)
        pid = arig.agent_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # hung, still holding its lock
        try:
            for state in ("BACKUP", "MASTER"):
                os.write(ka, f'INSTANCE "VI_1" {state} 100\n'.encode())
                script(arig, state)  # the agent "runs": to the FIFO, not spooled
            assert len(spooled(arig)) == 1  # positive control: nothing more spooled
        finally:
            arig.stop_agent(signal.SIGKILL)
        sink.start()
        arig.start()
        wait_for(lambda: len(sink.messages) >= 1, 15, what="the spooled MASTER")
        wait_for(lambda: 'keepalived: SCRIPT INSTANCE "VI_1" MASTER' in arig.text(), 10)
        os.write(ka, b'INSTANCE "VI_1" FAULT 0\n')
        wait_for(lambda: any("FAULT" in s for s in sink.subjects()), 10, what="the FAULT")
    assert sink.subjects() == [
        "[lbwatch] t1: VI_1 MASTER (priority 100)",
        "[lbwatch] t1: VI_1 BACKUP -> MASTER (priority 100)",
        "[lbwatch] t1: VI_1 MASTER -> FAULT (priority 0)",
    ]


@needs("haproxy", "start-stop-daemon")
@pytest.mark.usefixtures("subreaper")
def test_a_script_that_spools_just_after_the_agent_started_does_not_double_the_mail(
    arig: Rig, sink: SmtpSink
) -> None:
    """keepalived's MASTER is in the FIFO at start, and its notify script, which found no
    agent, is still spooling (it holds the scripts' lock, shared) when the agent starts: the
    agent reads the spool only once the script is done, so the FIFO's copy is matched and
    mailed once. Without the lock the agent read the spool first: two mails."""
    from lbwatch.config import load
    from lbwatch.notify import rules
    from lbwatch.notify.parse import VrrpEvent, parse_line

    cfg = load(arig.config)
    spool = Spool(cfg.spool_path(), cfg.notify.spool_max)
    with keepalived_fifo(arig) as ka:
        os.write(ka, b'INSTANCE "VI_1" MASTER 100\n')
        sink.start()
        with spool.scripts_lock():  # the script, mid-way
            arig.start()
            wait_for(rig_locked_its_run_dir(arig), 10, what="the agent's run lock")
            # What `lbwatch notify` does after it found no agent (lbwatch/notify/cli.py).
            event = parse_line(b'SCRIPT INSTANCE "VI_1" MASTER 100')
            assert isinstance(event, VrrpEvent)
            routed = rules.route(rules.RouterState(), event, 0.0, 1.7e9, "t1", cfg)
            for out in routed.out:
                for channel in out.channels:
                    spool.put(channel, out.notification)
            assert 'keepalived: INSTANCE "VI_1" MASTER 100' not in arig.text()  # still waiting
        wait_for(lambda: 'keepalived: INSTANCE "VI_1" MASTER 100' in arig.text(), 10)
        os.write(ka, b'INSTANCE "VI_1" FAULT 0\n')
        wait_for(lambda: any("FAULT" in s for s in sink.subjects()), 10, what="the FAULT")
        wait_for(lambda: not spooled(arig), 10, what="an empty queue")
    assert [s for s in sink.subjects() if "MASTER (priority 100)" in s] == [
        "[lbwatch] t1: VI_1 MASTER (priority 100)"
    ]


def rig_locked_its_run_dir(rig: Rig) -> Callable[[], bool]:
    """The agent holds its run lock (it takes it before it reads the spool)."""
    from lbwatch.agentlock import agent_running

    return lambda: agent_running(str(rig.tmp / "run"))


@needs("haproxy", "start-stop-daemon")
@pytest.mark.usefixtures("subreaper")
def test_a_burst_beyond_spool_max_is_mailed_in_order_and_counted_once(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """300 instances go MASTER at once on an agent whose spool keeps 20 per channel: the
    mails go out in the FIFO's order, and every transition is either mailed once or counted
    once in a "(N earlier notification(s) ... dropped" note: mailed + counted = 300."""
    rig = Rig(tmp_path)
    rig.write_config(notify=NOTIFY_KEYS + "spool_max = 20\n", extra=email_section(sink.port))
    sink.start()
    try:
        rig.start()
        wait_for(rig.both_up, 10, what="both services up")
        for i in range(300):
            assert write_line(fifo(rig), f'INSTANCE "VI_{i:03d}" MASTER 100')
        wait_for(lambda: 'keepalived: INSTANCE "VI_299"' in rig.text(), 20, what="the burst read")
        wait_for(lambda: not spooled(rig), 30, what="an empty queue")
        wait_for(
            lambda: (
                (doc := rig.status()) is not None
                and doc.notify is not None
                and doc.notify.channels["email"].delivered == len(sink.messages)
            ),
            10,
            what="every mail counted",
        )
    finally:
        rig.close()
    names = [s.split(": ", 1)[1].split(" ")[0] for s in sink.subjects()]
    counted = sum(
        int(n) for m in sink.messages for n in re.findall(r"\((\d+) earlier", m.get_content())
    )
    assert names == sorted(set(names)), "out of order or twice"
    assert len(names) + counted == 300, (len(names), counted)
