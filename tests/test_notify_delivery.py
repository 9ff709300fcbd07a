"""Delivery through a real SMTP server on loopback and a real HTTP receiver."""

from __future__ import annotations

import email.policy
import email.utils
import gc
import json
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.backoff import delay as retry_delay
from lbwatch.config import Email, Webhook
from lbwatch.notify.channels import DeliveryError, PermanentDeliveryError
from lbwatch.notify.message import Notification, agent, one_line, vrrp
from lbwatch.notify.sender import ChannelSender
from lbwatch.notify.smtp import EmailChannel
from lbwatch.notify.spool import Spool
from lbwatch.notify.webhook import WebhookChannel
from tests.conftest import SmtpSink, free_port, server_tls
from tests.util import wait_for


def email_cfg(port: int, **kw: Any) -> Email:
    return Email(
        host="127.0.0.1",
        port=port,
        security="plain",
        sender="lb1@example.org",
        to=["ops@example.org", "oncall@example.org"],
        timeout=2,
        **kw,
    )


def test_email_reaches_the_server(smtp: SmtpSink) -> None:
    """Subject, sender, recipients and body arrive as built."""
    note = vrrp("lb2", "INSTANCE", "VI_1", "BACKUP", "MASTER", 97, ["192.0.2.100"], 1.7e9)
    channel = EmailChannel(email_cfg(smtp.port))
    channel.send(note)
    channel.idle()
    (msg,) = smtp.messages
    assert msg["Subject"] == "[lbwatch] lb2: VI_1 BACKUP -> MASTER (priority 97)"
    assert msg["From"] == "lb1@example.org"
    assert msg["To"] == "ops@example.org, oncall@example.org"
    assert msg["X-Lbwatch-Event"] == "vrrp:MASTER"
    assert "VIPs:        192.0.2.100" in msg.get_content()


def test_names_cannot_inject_headers(smtp: SmtpSink) -> None:
    """CR/LF smuggled into a subject never becomes a header of its own."""
    evil = Notification("agent:x", "hi\r\nBcc: thief@example.org\r\n\r\nbody", "b", "lb1", 1.7e9)
    channel = EmailChannel(email_cfg(smtp.port))
    channel.send(evil)
    channel.idle()
    (msg,) = smtp.messages
    assert msg["Bcc"] is None
    assert "\n" not in msg["Subject"]


def test_auth_with_password_file(tmp_path: Path) -> None:
    """AUTH with the password read from password_file; a wrong one is a DeliveryError."""
    sink = SmtpSink(free_port(), auth=("lb", "s3cret"))
    sink.start()
    try:
        secret = tmp_path / "pw"
        secret.write_text("s3cret\n")
        secret.chmod(0o600)
        cfg = email_cfg(sink.port, username="lb", password_file=secret, allow_plain_password=True)
        channel = EmailChannel(cfg)
        channel.send(agent("lb1", "test", "auth works", 1.7e9))
        channel.idle()
        assert len(sink.messages) == 1
        secret.write_text("wrong\n")
        with pytest.raises(DeliveryError, match=r"SMTP 127\.0\.0\.1"):
            channel.send(agent("lb1", "test", "auth fails", 1.7e9))
    finally:
        sink.stop()


def test_password_from_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """password_credential is read from $CREDENTIALS_DIRECTORY (LoadCredential=)."""
    from lbwatch.notify.channels import read_password

    (tmp_path / "smtp").write_text("from-credential")
    cfg = email_cfg(25, username="lb", password_credential="smtp", allow_plain_password=True)
    assert read_password(cfg, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "from-credential"
    with pytest.raises(DeliveryError, match="LoadCredential"):
        read_password(cfg, {})


def test_outage_spooled_then_delivered_in_order(tmp_path: Path) -> None:
    """Server down: messages stay spooled and are retried with backoff; once it is back they
    are delivered in order and removed."""
    sink = SmtpSink(free_port())
    spool = Spool(tmp_path / "spool", 100)
    sender = ChannelSender(EmailChannel(email_cfg(sink.port)), spool, 0.1, 0.4)
    for i in range(3):
        spool.put("email", agent("lb1", "test", f"message {i}", 1.7e9 + i))
    sender.start()
    try:
        wait_for(lambda: sender.snapshot().failures_in_a_row >= 2, 10, what="retries")
        assert len(spool.pending("email")) == 3
        assert "Connection refused" in (sender.snapshot().last_error or "")
        sink.start()
        wait_for(lambda: len(sink.messages) == 3, 10, what="delivery after the outage")
        assert [m["Subject"].split(": ", 1)[1] for m in sink.messages] == [
            "message 0",
            "message 1",
            "message 2",
        ]
        wait_for(lambda: not spool.pending("email"), 5, what="spool emptied")
        assert sender.snapshot().failures_in_a_row == 0
    finally:
        sender.stop(wait=10)
        sink.stop()


def test_dropped_count_reported_in_next_message(tmp_path: Path, smtp: SmtpSink) -> None:
    """What the bounded spool had to drop is said in the next message that gets through."""
    spool = Spool(tmp_path / "spool", 2)
    for i in range(5):
        spool.put("email", agent("lb1", "test", f"message {i}", 1.7e9 + i))
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.4)
    sender.start()
    try:
        wait_for(lambda: len(smtp.messages) == 2, 10, what="delivery")
        assert "3 earlier notification(s) for email were dropped" in smtp.messages[0].get_content()
        assert "dropped" not in smtp.messages[1].get_content()
        assert spool.dropped("email") == 0
    finally:
        sender.stop(wait=10)


def test_retry_delay_doubles_and_caps() -> None:
    """2, 4, 8 ... seconds, never more than the cap."""
    assert [retry_delay(n, 2.0, 30.0) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    status: ClassVar[int] = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(_Hook.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def hook_server() -> Iterator[str]:
    _Hook.received, _Hook.status = [], 200
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_webhook_posts_json_with_text(hook_server: str) -> None:
    """The JSON payload has the generic fields and a `text` for Slack-style receivers."""
    channel = WebhookChannel(Webhook(name="chat", url=hook_server))
    channel.send(agent("lb1", "giveup", "giving up on haproxy", 1.7e9))
    (payload,) = _Hook.received
    assert payload["event"] == "agent:giveup" and payload["node"] == "lb1"
    assert payload["text"].startswith("[lbwatch] lb1: giving up on haproxy\n")
    _Hook.status = 500
    with pytest.raises(DeliveryError, match="HTTP 500") as temporary:
        channel.send(agent("lb1", "giveup", "again", 1.7e9))
    assert not isinstance(temporary.value, PermanentDeliveryError)
    _Hook.status = 404
    with pytest.raises(PermanentDeliveryError, match="HTTP 404"):
        channel.send(agent("lb1", "giveup", "gone", 1.7e9))
    # A redirect is a wrong URL: set aside with the fix, not retried forever.
    _Hook.status = 301
    with pytest.raises(PermanentDeliveryError, match=r"HTTP 301, redirected to .*retry-rejected"):
        channel.send(agent("lb1", "giveup", "moved", 1.7e9))


def test_kept_connection_reused_and_renewed(smtp: SmtpSink) -> None:
    """A burst shares one SMTP connection; a connection the server dropped meanwhile is
    replaced transparently on the next message."""
    channel = EmailChannel(email_cfg(smtp.port))
    channel.send(agent("lb1", "test", "one", 1.7e9))
    first = channel._smtp
    channel.send(agent("lb1", "test", "two", 1.7e9))
    assert channel._smtp is first
    smtp.stop()
    smtp.start()  # the server restarted: the kept connection is dead
    channel.send(agent("lb1", "test", "three", 1.7e9))
    channel.idle()
    assert [m["Subject"] for m in smtp.messages][-1] == "[lbwatch] lb1: three"
    assert len(smtp.messages) == 3


def test_connection_kept_while_messages_come_and_closed_when_quiet(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    """The next message soon after uses the same connection (no handshake at a failover's
    second mail); after keep_open seconds with nothing to send the connection is ended with a
    QUIT, and the next message opens a new one."""
    spool = Spool(tmp_path / "spool", 100)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port, keep_open=3)), spool, 0.1, 0.4)
    sender.start()
    try:
        for i in (1, 2):
            spool.put("email", agent("lb1", "test", f"message {i}", 1.7e9))
            sender.kick()
            wait_for(lambda n=i: len(smtp.messages) == n, 5, what=f"message {i}")
        assert smtp.peers[0] == smtp.peers[1]
        assert smtp.quits == 0
        wait_for(lambda: smtp.quits == 1, 10, what="the quiet connection closed")
        spool.put("email", agent("lb1", "test", "message 3", 1.7e9))
        sender.kick()
        wait_for(lambda: len(smtp.messages) == 3, 5, what="message 3")
        assert smtp.peers[2] != smtp.peers[1]
    finally:
        sender.stop(wait=10)


def test_a_kept_connection_the_server_closed_is_replaced_without_a_round_trip() -> None:
    """Back to back, the kept connection is used as it is. A server that times an idle
    connection out closes it: that is seen without asking the server anything (no NOOP, a
    round trip on every failover's mail), and the next message goes on a new connection, once."""
    sink = SmtpSink(free_port(), idle_timeout=0.5)
    sink.start()
    try:
        channel = EmailChannel(email_cfg(sink.port))
        channel.send(agent("lb1", "test", "one", 1.7e9))
        kept = channel._smtp
        assert kept is not None and channel._kept() is kept  # open: used as it is
        channel.send(agent("lb1", "test", "two", 1.7e9))
        assert sink.peers[0] == sink.peers[1]
        wait_for(lambda: select.select([kept.sock], [], [], 0)[0], 10, what="the server's timeout")
        assert channel._kept() is None  # seen ended, and closed on this side too
        assert kept.sock is None
        channel.send(agent("lb1", "test", "three", 1.7e9))
        channel.idle()
        assert [str(m["Subject"]) for m in sink.messages][-1] == "[lbwatch] lb1: three"
        assert len(sink.messages) == 3 and sink.peers[2] != sink.peers[1]
        assert sink.noops == 0
    finally:
        sink.stop()


def test_plain_smtp_builds_no_tls_context(smtp: SmtpSink) -> None:
    """Building a TLS context loads the CA bundle (about 30 ms a message before): plain SMTP
    builds none."""
    channel = EmailChannel(email_cfg(smtp.port))
    channel.send(agent("lb1", "test", "one", 1.7e9))
    channel.idle()
    assert len(smtp.messages) == 1
    assert channel._context is None


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_tls_verified_against_ca_file(self_signed: tuple[Path, Path], mode: str) -> None:
    """STARTTLS and implicit TLS: delivered when the server's certificate checks out against
    ca_file (one TLS context for every connection), refused (certificate verify failed)
    against the system's CAs."""
    cert, key = self_signed
    sink = SmtpSink(free_port(), tls=server_tls(cert, key), implicit_tls=mode == "tls")
    sink.start()
    try:
        base = {
            "host": "127.0.0.1",
            "port": sink.port,
            "security": mode,
            "sender": "lb1@example.org",
            "to": ["ops@example.org"],
            "timeout": 5,
        }
        trusted = EmailChannel(Email(**base, ca_file=cert))
        trusted.send(agent("lb1", "test", f"over {mode}", 1.7e9))
        trusted.idle()
        assert [m["Subject"] for m in sink.messages] == [f"[lbwatch] lb1: over {mode}"]
        context = trusted._context  # built once: the next connection uses it again
        trusted.send(agent("lb1", "test", "again", 1.7e9))
        trusted.idle()
        assert context is not None and trusted._context is context
        assert len(sink.messages) == 2
        with pytest.raises(DeliveryError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            EmailChannel(Email(**base)).send(agent("lb1", "test", "untrusted", 1.7e9))
        # smtplib.SMTP_SSL leaves its raw socket to the garbage collector when the handshake
        # fails (CPython's _get_socket); collect it here rather than in some later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    finally:
        sink.stop()


def test_permanent_refusal_set_aside_temporary_retried(tmp_path: Path, smtp: SmtpSink) -> None:
    """A 5xx reply for one message sets it aside and delivery goes on; a 4xx reply is retried
    until the server takes it."""
    smtp.refuse = {"poison": "550 5.7.1 message refused", "later": "451 4.3.0 try again"}
    spool = Spool(tmp_path / "spool", 10)
    for text in ("first", "poison", "later", "last"):
        spool.put("email", agent("lb1", "test", text, 1.7e9))
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.2)
    sender.start()
    try:
        wait_for(lambda: sender.snapshot().failures_in_a_row >= 2, 10, what="4xx retries")
        assert [m["Subject"] for m in smtp.messages] == ["[lbwatch] lb1: first"]
        assert sender.snapshot().rejected == 1
        assert len(list((tmp_path / "spool" / "rejected").iterdir())) == 1
        del smtp.refuse["later"]
        wait_for(lambda: len(smtp.messages) == 3, 10, what="the rest delivered")
        assert [m["Subject"].split(": ")[1] for m in smtp.messages] == ["first", "later", "last"]
    finally:
        sender.stop(wait=10)


def test_partly_refused_recipients_count_as_delivered(
    smtp: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    """One recipient refused, the other accepted: delivered (no duplicate for the one who got
    it), and the refusal logged."""

    async def rcpt(
        server: object, session: object, envelope: object, address: str, options: object
    ) -> str:
        if address.startswith("oncall"):
            return "550 no such user"
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 OK"

    smtp.handle_RCPT = rcpt  # type: ignore[attr-defined]
    channel = EmailChannel(email_cfg(smtp.port))
    channel.send(agent("lb1", "test", "partly", 1.7e9))
    channel.idle()
    assert [m["Subject"] for m in smtp.messages] == ["[lbwatch] lb1: partly"]
    assert smtp.rcpts == [["ops@example.org"]]
    assert "refused oncall@example.org: 550 no such user" in caplog.text


class _Greeter:
    """A real TCP server on loopback that greets every SMTP client with ``reply`` and hangs up:
    a server that refuses service ("554 no SMTP service here")."""

    def __init__(self, reply: bytes) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


def _queue_and_wait(sender: ChannelSender, what: str) -> str:
    wait_for(lambda: sender.snapshot().failures_in_a_row >= 2, 10, what=f"{what}: retries")
    assert sender.snapshot().rejected == 0, f"{what}: set aside as refused"
    return str(sender.snapshot().last_error)


def test_server_wide_refusals_are_retried_not_set_aside(
    tmp_path: Path, self_signed: tuple[Path, Path]
) -> None:
    """A wrong password (535), "STARTTLS required" (530), a 554 greeting: the server refuses
    every message, not this one, so the message stays queued, retried with backoff, the error
    shown as the channel's, and it is delivered once the cause is fixed (positive control of
    a message refusal in test_permanent_refusal_set_aside_temporary_retried)."""
    secret = tmp_path / "pw"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    cases = []
    auth = SmtpSink(free_port(), auth=("lb", "s3cret"))
    cases.append(
        (
            "535",
            auth,
            email_cfg(auth.port, username="lb", password_file=secret, allow_plain_password=True),
        )
    )
    tls = SmtpSink(free_port(), tls=server_tls(*self_signed))
    cases.append(("530", tls, email_cfg(tls.port)))
    for code, sink, cfg in cases:
        sink.start()
        spool = Spool(tmp_path / f"spool-{code}", 10)
        spool.put("email", agent("lb1", "test", f"held by {code}", 1.7e9))
        sender = ChannelSender(EmailChannel(cfg), spool, 0.05, 0.2)
        sender.start()
        try:
            error = _queue_and_wait(sender, code)
            assert f" {code} " in error and "retrying" in error, error
            assert "b'" not in error  # the server's words, not Python bytes
            assert len(spool.pending("email")) == 1
            assert not (tmp_path / f"spool-{code}" / "rejected").exists()
        finally:
            sender.stop(wait=10)
            sink.stop()
    greeter = _Greeter(b"554 5.3.2 no SMTP service here\r\n")
    spool = Spool(tmp_path / "spool-554", 10)
    spool.put("email", agent("lb1", "test", "held by 554", 1.7e9))
    sender = ChannelSender(EmailChannel(email_cfg(greeter.port)), spool, 0.05, 0.2)
    sender.start()
    try:
        assert "554" in _queue_and_wait(sender, "554")
        assert len(spool.pending("email")) == 1
    finally:
        sender.stop(wait=10)
        greeter.close()
    # The cause fixed (the right password): the held message goes out.
    secret.write_text("s3cret\n")
    auth.start()
    spool = Spool(tmp_path / "spool-535", 10)
    sender = ChannelSender(
        EmailChannel(
            email_cfg(auth.port, username="lb", password_file=secret, allow_plain_password=True)
        ),
        spool,
        0.05,
        0.2,
    )
    sender.start()
    try:
        wait_for(lambda: len(auth.messages) == 1, 10, what="delivered once fixed")
        assert auth.subjects() == ["[lbwatch] lb1: held by 535"]
    finally:
        sender.stop(wait=10)
        auth.stop()


def test_retry_rejected_puts_set_aside_messages_back(tmp_path: Path, smtp: SmtpSink) -> None:
    """`lbwatch notify --retry-rejected` puts the messages set aside as refused back in the
    queue, in order, and they are delivered."""
    from lbwatch.cli import main

    smtp.refuse = {"poison": "550 5.7.1 message refused"}
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, 10)
    for text in ("poison one", "poison two"):
        spool.put("email", agent("lb1", "test", text, 1.7e9))
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.05, 0.2)
    sender.start()
    try:
        wait_for(lambda: sender.snapshot().rejected == 2, 10, what="both set aside")
        conf = tmp_path / "lbwatch.toml"
        conf.write_text(
            f'[agent]\nstate_dir = "{tmp_path}"\nrun_dir = "{tmp_path / "run"}"\n'
            f'[notify]\nspool_dir = "{spool_dir}"\n'
        )
        del smtp.refuse["poison"]
        assert main(["--config", str(conf), "notify", "--retry-rejected"]) == 0
        assert not list((spool_dir / "rejected").iterdir())
        sender.kick()  # what the agent's spool watch does when the files land
        wait_for(lambda: len(smtp.messages) == 2, 10, what="delivered after the retry")
        assert [m["Subject"].split(": ")[1] for m in smtp.messages] == ["poison one", "poison two"]
    finally:
        sender.stop(wait=10)


def test_message_id_is_fixed_when_spooled_and_kept_across_retries(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    """The Message-ID is set when the message is spooled: a try the server turned away (451)
    and the retry it accepted carry the same one, so a receiver can de-duplicate."""
    seen: list[str] = []
    plain = smtp.handle_DATA

    async def first_refused(server: Any, session: Any, envelope: Any) -> str:
        import email as email_pkg
        import email.policy

        parsed = email_pkg.message_from_bytes(envelope.content, policy=email.policy.default)
        seen.append(str(parsed["Message-ID"]))
        if len(seen) == 1:
            return "451 4.3.0 try again"
        return await plain(server, session, envelope)

    smtp.handle_DATA = first_refused  # type: ignore[method-assign]
    spool = Spool(tmp_path / "spool", 10)
    path = spool.put("email", agent("lb1", "test", "once", 1.7e9))
    stem = path.name.split(".")[0]
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.05, 0.2)
    sender.start()
    try:
        wait_for(lambda: smtp.messages, 10, what="accepted on the retry")
    finally:
        sender.stop(wait=10)
    assert len(seen) == 2 and seen[0] == seen[1] == f"<{stem}.lbwatch@lb1>"
    assert str(smtp.messages[0]["Message-ID"]) == seen[0]


ENCODED_WORDS = [
    "=?utf-8?q?VI_1=0D=0ABcc:=20thief@example.org?=",
    "=?utf-8?b?VklfMQ0KQmNjOiB0aGllZkBleGFtcGxlLm9yZw==?=",
    "=?utf-8?q?x=0D=0A=0D=0Abody_starts_here?=",
]


@pytest.mark.parametrize("name", ENCODED_WORDS)
def test_encoded_words_in_names_add_no_header(smtp: SmtpSink, name: str) -> None:
    """An instance or node name written as an RFC 2047 encoded word hiding CR LF adds no
    header and does not end the header block, whatever Python runs lbwatch (Pythons without
    the fix for CVE-2024-6923 wrote the decoded CR LF out raw); the message still goes, to the
    configured recipients only (positive control: a plain name arrives as it is)."""
    channel = EmailChannel(email_cfg(smtp.port))
    channel.send(vrrp("lb1", "INSTANCE", "VI_plain", None, "MASTER", 100, [], 1.7e9))
    channel.send(vrrp(name, "INSTANCE", name, None, "MASTER", 100, [], 1.7e9))
    channel.idle()
    plain, hostile = smtp.messages
    assert "VI_plain" in str(plain["Subject"])
    assert sorted(k.lower() for k in hostile) == sorted(k.lower() for k in plain)
    assert hostile["Bcc"] is None and "\n" not in str(hostile["Subject"])
    assert all(r == ["ops@example.org", "oncall@example.org"] for r in smtp.rcpts)


def test_a_header_block_not_as_written_is_never_sent(smtp: SmtpSink) -> None:
    """The last line of defence: a serialized message whose header fields are not exactly the
    ones lbwatch wrote is refused before it reaches the server."""
    from lbwatch.notify.smtp import checked

    good = EmailChannel(email_cfg(smtp.port)).build(agent("lb1", "t", "ok", 1.7e9)).as_bytes()
    assert checked(good, "here") == good
    bad = good.replace(b"\r\nTo:", b"\r\nBcc: thief@example.org\r\nTo:", 1)
    with pytest.raises(PermanentDeliveryError, match="headers are not the ones lbwatch wrote"):
        checked(bad, "here")
    early = good.replace(b"\r\nTo:", b"\r\n\r\nTo:", 1)
    with pytest.raises(PermanentDeliveryError):
        checked(early, "here")


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    """The SMTP password file must be 0600 (or stricter): one readable by group or others is
    refused with the fix to make, before anything is sent (positive control: 0600 is read)."""
    from lbwatch.notify.channels import read_password

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    cfg = email_cfg(25, username="lb", password_file=secret, allow_plain_password=True)
    assert read_password(cfg) == "s3cret"
    for mode in (0o640, 0o644, 0o604):
        secret.chmod(mode)
        with pytest.raises(DeliveryError, match=f"mode {mode:04o}.*chmod 600"):
            read_password(cfg)


def test_a_password_in_clear_needs_saying_so() -> None:
    """security = "plain" with a username would send the password in clear: refused with what
    to do, unless allow_plain_password says it is meant; STARTTLS with a username is fine."""
    from pydantic import ValidationError

    base = {"host": "smtp", "sender": "a@b.c", "to": ["d@e.f"], "username": "lb"}
    Email(**base, security="starttls")  # type: ignore[arg-type]
    Email(**base, security="plain", allow_plain_password=True)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="sends the password in clear"):
        Email(**base, security="plain")  # type: ignore[arg-type]


def test_replaced_senders_never_send_a_message_twice(tmp_path: Path, smtp: SmtpSink) -> None:
    """A reload that changes [notify] while a message is being sent: the new senders wait for
    the old ones to finish it, so it is sent once, not again by the new sender that still finds
    it spooled (positive control: the new senders do deliver what comes next)."""
    import asyncio

    from lbwatch.notify.sender import Senders

    in_data = threading.Event()
    plain = smtp.handle_DATA

    async def slow(server: Any, session: Any, envelope: Any) -> str:
        in_data.set()
        await asyncio.sleep(1.0)
        return await plain(server, session, envelope)

    smtp.handle_DATA = slow  # type: ignore[method-assign]
    spool = Spool(tmp_path / "spool", 10)
    spool.put("email", agent("lb1", "test", "in flight", 1.7e9))
    old = Senders({"email": EmailChannel(email_cfg(smtp.port))}, spool, 0.05, 0.2)
    old.start()
    assert in_data.wait(10), "the first send reached DATA"
    old.stop()  # not waited for: the new senders wait for it
    new = Senders({"email": EmailChannel(email_cfg(smtp.port))}, spool, 0.05, 0.2, after=old)
    new.start()
    try:
        wait_for(lambda: not spool.pending("email"), 10, what="the spool emptied")
        spool.put("email", agent("lb1", "test", "after the reload", 1.7e9))
        new.kick()
        wait_for(lambda: len(smtp.messages) >= 2, 10, what="the next message")
    finally:
        new.stop(wait=10)
    assert [m["Subject"].split(": ")[1] for m in smtp.messages] == ["in flight", "after the reload"]


def _failure(cfg: Email) -> str:
    channel = EmailChannel(cfg)
    with pytest.raises(DeliveryError) as info:
        channel.send(agent("lb1", "test", "x", 1.7e9))
    return str(info.value)


def test_failures_are_told_apart_refused_timeout_tls(
    tmp_path: Path, self_signed: tuple[Path, Path]
) -> None:
    """A refused connection, a server that never answers, an untrusted certificate and an
    SMTP refusal each read differently, the server's reply as text (never b'...')."""
    closed = free_port()
    assert f"SMTP 127.0.0.1:{closed}: Connection refused" in _failure(email_cfg(closed))
    with socket.socket() as silent:  # accepts connections (the backlog) but never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        why = _failure(email_cfg(port).model_copy(update={"timeout": 0.5}))
    assert why == f"SMTP 127.0.0.1:{port}: timed out after 0.5 s"
    cert, key = self_signed
    tls = SmtpSink(free_port(), tls=server_tls(cert, key))
    auth = SmtpSink(free_port(), auth=("lb", "s3cret"))
    tls.start()
    auth.start()
    try:
        why = _failure(email_cfg(tls.port).model_copy(update={"security": "starttls"}))
        assert "TLS: certificate verify failed: " in why and "set ca_file" in why
        secret = tmp_path / "pw"
        secret.write_text("wrong\n")
        secret.chmod(0o600)
        cfg = email_cfg(auth.port, username="lb", password_file=secret, allow_plain_password=True)
        why = _failure(cfg)
        assert why.startswith(f"SMTP 127.0.0.1:{auth.port} refused: 535 ")
        assert "b'" not in why and 'b"' not in why
    finally:
        tls.stop()
        auth.stop()
        with warnings.catch_warnings():  # SMTP_SSL's socket after the failed handshake
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_an_unresolvable_host_is_said_to_be_dns() -> None:
    """A host name that does not resolve reads as DNS, not as a bare errno. Run in a network
    namespace of its own with no interface up, so the lookup fails without leaving the host."""
    code = (
        "from lbwatch.config import Email\n"
        "from lbwatch.notify.smtp import EmailChannel\n"
        "from lbwatch.notify.message import agent\n"
        "cfg = Email(host='lbwatch-test.invalid', port=25, security='plain',\n"
        "            sender='a@example.org', to=['o@example.org'], timeout=2)\n"
        "try:\n"
        "    EmailChannel(cfg).send(agent('lb1', 'test', 'x', 1.7e9))\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.startswith(
        "SMTP lbwatch-test.invalid:25: DNS: cannot resolve 'lbwatch-test.invalid' ("
    ), out.stdout


def test_a_handed_message_is_sent_before_it_is_spooled_and_never_again(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    """Handed to its sender, a message goes out without waiting for the spool write (here the
    write comes only after delivery); the late write then leaves nothing in the queue, so it
    is sent once. Written first and delivered after, the file is removed the same way."""
    spool = Spool(tmp_path / "spool", 100)
    sender = ChannelSender(EmailChannel(email_cfg(smtp.port)), spool, 0.1, 0.4)
    sender.start()
    try:
        first = agent("lb1", "test", "handed, spooled late", 1.7e9)
        stem = spool.stem()
        sender.hand(stem, first)
        wait_for(lambda: len(smtp.messages) == 1, 5, what="the handed message")
        spool.put("email", first, stem=stem)  # the fsync finishing after the delivery
        assert spool.pending("email") == []
        second = agent("lb1", "test", "spooled, then handed", 1.7e9)
        stem = spool.stem()
        spool.put("email", second, stem=stem)
        sender.hand(stem, second)
        wait_for(lambda: len(smtp.messages) == 2, 5, what="the second message")
        wait_for(lambda: sender.snapshot().delivered == 2, 5, what="both counted")
        sender.kick()  # a pass over the spool finds nothing to send again
        wait_for(lambda: not spool.pending("email"), 5, what="an empty queue")
        assert len(smtp.messages) == 2
    finally:
        sender.stop(wait=10)


def test_a_handed_message_never_overtakes_the_queue(tmp_path: Path) -> None:
    """Messages waiting from an outage go first: one handed over meanwhile is sent from the
    spool behind them, once, when the server is back."""
    sink = SmtpSink(free_port())
    spool = Spool(tmp_path / "spool", 100)
    sender = ChannelSender(EmailChannel(email_cfg(sink.port)), spool, 2.0, 2.0)
    for i in range(2):
        spool.put("email", agent("lb1", "test", f"queued {i}", 1.7e9))
    sender.start()
    try:
        wait_for(lambda: sender.snapshot().failures_in_a_row >= 1, 10, what="a failure")
        sink.start()  # back, while the sender waits for its next try
        late = agent("lb1", "test", "handed during the outage", 1.7e9)
        stem = spool.stem()
        sender.hand(stem, late)
        spool.put("email", late, stem=stem)
        wait_for(lambda: len(sink.messages) == 3, 10, what="all three")
        assert [str(m["Subject"]).split(": ", 1)[1] for m in sink.messages] == [
            "queued 0",
            "queued 1",
            "handed during the outage",
        ]
        wait_for(lambda: not spool.pending("email"), 5, what="an empty queue")
        assert len(sink.messages) == 3
    finally:
        sender.stop(wait=10)
        sink.stop()


@settings(max_examples=300, deadline=None)
@given(
    subject=st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FFF), max_size=320),
    node=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
def test_rendering_is_what_the_email_package_writes(subject: str, node: str) -> None:
    """The rendering shortcut (ASCII header values stored as written) puts on the wire the very
    bytes the email package writes when every header is set the ordinary way."""
    note = Notification("vrrp:MASTER", subject, "body\nline 2", node or "lb1", 1.7e9, ident="x")
    channel = EmailChannel(email_cfg(25))
    ours = channel.build(note).as_bytes()
    # The oracle: each header assigned as the email package documents it.
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Subject"] = one_line(note.subject, 300)
    msg["From"] = "lb1@example.org"
    msg["To"] = "ops@example.org, oncall@example.org"
    msg["Date"] = email.utils.formatdate(1.7e9, localtime=True)
    msg["Message-ID"] = f"<x.lbwatch@{re.sub(r'[^A-Za-z0-9.-]', '-', note.node)[:64]}>"
    msg["X-Lbwatch-Event"] = "vrrp:MASTER"
    msg["X-Lbwatch-Node"] = one_line(note.node, 100)
    msg.set_content(note.body)
    assert ours == msg.as_bytes()
