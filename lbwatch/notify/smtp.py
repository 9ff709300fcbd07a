"""The email channel: smtplib, plain, STARTTLS or implicit TLS, optional AUTH."""

from __future__ import annotations

import contextlib
import logging
import re
import select
import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid

from lbwatch.config import Email
from lbwatch.notify.channels import DeliveryError, PermanentDeliveryError, read_password
from lbwatch.notify.message import Notification, one_line

log = logging.getLogger(__name__)


class EmailChannel:
    """A connection is kept for ``keep_open`` seconds after the queue empties (a burst, or the
    next event soon after, costs no handshake), then closed by the sender. The TLS context is
    built once, and only for TLS: building one loads the CA bundle (about 30 ms)."""

    name = "email"

    def __init__(self, cfg: Email) -> None:
        self.cfg = cfg
        self.keep_open = cfg.keep_open
        self._smtp: smtplib.SMTP | None = None
        self._context: ssl.SSLContext | None = None

    def build(self, note: Notification) -> EmailMessage:
        msg = EmailMessage(policy=SMTP)
        # The same on every retry of this message: fixed when it was spooled.
        ident = (
            f"<{note.ident}.lbwatch@{_domain(note.node)}>" if note.ident else make_msgid("lbwatch")
        )
        for name, value in (
            ("Subject", one_line(note.subject, 300)),
            ("From", self.cfg.sender),
            ("To", ", ".join(self.cfg.to)),
            ("Date", formatdate(note.created, localtime=True)),
            ("Message-ID", ident),
            ("X-Lbwatch-Event", one_line(note.event, 100)),
            ("X-Lbwatch-Node", one_line(note.node, 100)),
        ):
            if value.isascii() and value:
                # Stored as written, not parsed into a header object: the same bytes on the
                # wire (tests/test_notify_delivery.py), half the rendering time. one_line took
                # out line breaks and encoded words; ``checked`` verifies the result.
                msg.set_raw(name, value)
            else:
                msg[name] = value  # to be RFC 2047 encoded; policy=SMTP refuses CR and LF
        msg.set_content(note.body)
        return msg

    def _tls(self) -> ssl.SSLContext:
        if self._context is None:
            ca = self.cfg.ca_file
            self._context = ssl.create_default_context(cafile=str(ca) if ca else None)
        return self._context

    def _connect(self) -> smtplib.SMTP:
        cfg = self.cfg
        password = read_password(cfg)
        smtp: smtplib.SMTP
        if cfg.security == "tls":
            smtp = smtplib.SMTP_SSL(
                cfg.host, cfg.smtp_port(), timeout=cfg.timeout, context=self._tls()
            )
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.smtp_port(), timeout=cfg.timeout)
        try:
            if cfg.security == "starttls":
                smtp.starttls(context=self._tls())
            if cfg.username is not None and password is not None:
                smtp.login(cfg.username, password)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _kept(self) -> smtplib.SMTP | None:
        """The kept connection unless the server has ended it: a server that timed it out
        sends a 421 and closes, or just closes, and either makes the socket readable, since the
        server says nothing unasked otherwise. Looked at without a round trip (a NOOP would
        add one to every failover's mail); a connection silently lost on the way costs the
        channel's timeout once, then a new connection (``send``)."""
        smtp = self._smtp
        if smtp is None:
            return None
        try:
            ended = smtp.sock is None or bool(select.select([smtp.sock], [], [], 0)[0])
        except (OSError, ValueError):
            ended = True
        if ended:
            smtp.close()
            self._smtp = None
        return self._smtp

    def answer(self) -> str:
        """Whether the server takes this channel's connection (TLS and login as configured),
        without sending anything: connect, NOOP, QUIT (``lbwatch doctor``)."""
        cfg = self.cfg
        where = f"{cfg.host}:{cfg.smtp_port()}"
        try:
            smtp = self._connect()
            try:
                smtp.noop()
            finally:
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    smtp.quit()
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"{where}: login refused: {_text(exc.smtp_error)}") from None
        except smtplib.SMTPException as exc:
            raise DeliveryError(f"{where}: {exc}") from None
        except OSError as exc:
            raise DeliveryError(f"{where}: {_network(exc, cfg)}") from None
        login = f", logged in as {cfg.username}" if cfg.username else ""
        return f"{where} answers ({cfg.security}{login})"

    def idle(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                self._smtp.close()
            self._smtp = None

    def send(self, note: Notification) -> str:
        cfg = self.cfg
        where = f"{cfg.host}:{cfg.smtp_port()}"
        raw = checked(self.build(note).as_bytes(), where)
        try:
            refused = None
            kept = self._kept()
            if kept is not None:
                try:
                    refused = kept.sendmail(cfg.sender, list(cfg.to), raw)
                except (smtplib.SMTPServerDisconnected, OSError) as exc:
                    # SMTPException is an OSError too: a reply about this message (a 550 to
                    # DATA, refused recipients) is the answer, not a dead connection, and a
                    # new connection would only offer the message again.
                    if isinstance(exc, smtplib.SMTPException) and not _closing(exc):
                        raise
                    # The kept connection died in between (or the server said 421, closing
                    # it): once more, afresh.
                    kept.close()
                    self._smtp = None
            if self._smtp is None:
                self._smtp = self._connect()
                refused = self._smtp.sendmail(cfg.sender, list(cfg.to), raw)
        except smtplib.SMTPRecipientsRefused as exc:
            self.idle()
            codes = [code for code, _ in exc.recipients.values()]
            error = PermanentDeliveryError if all(c >= 500 for c in codes) else DeliveryError
            raise error(
                f"SMTP {where} refused every recipient: {_refusals(exc.recipients)}"
            ) from None
        except smtplib.SMTPDataError as exc:
            # The server refused this message's content: only that is a refusal for good.
            self.idle()
            error = PermanentDeliveryError if exc.smtp_code >= 500 else DeliveryError
            raise error(
                f"SMTP {where} refused the message: {exc.smtp_code} {_text(exc.smtp_error)}"
            ) from None
        except smtplib.SMTPResponseException as exc:
            # The greeting (554), HELO, STARTTLS, AUTH (535), MAIL FROM ("530 STARTTLS
            # required", a refused sender): the server refuses every message, not this one, so
            # it is retried with backoff until the cause is fixed, never set aside.
            self.idle()
            raise DeliveryError(
                f"SMTP {where} refused: {exc.smtp_code} {_text(exc.smtp_error)} "
                "(the server refuses every message; retrying)"
            ) from None
        except smtplib.SMTPException as exc:
            self.idle()
            # smtplib turns a timeout or reset while reading a reply into "Connection
            # unexpectedly closed": the socket's error says more.
            cause = exc.__context__
            why = _network(cause, cfg) if isinstance(cause, OSError) else one_line(str(exc))
            raise DeliveryError(f"SMTP {where}: {why}") from None
        except OSError as exc:
            self.idle()
            raise DeliveryError(f"SMTP {where}: {_network(exc, cfg)}") from None
        receipt = f"{where} ({cfg.security}) accepted it for "
        receipt += ", ".join(a for a in cfg.to if a not in (refused or {}))
        if refused:
            # Some recipients took it: sending again would duplicate it for them, so it counts
            # as delivered, and the refusal is logged for the operator.
            log.warning("SMTP %s accepted the message but refused %s", where, _refusals(refused))
            receipt += f"; refused {_refusals(refused)}"
        return receipt


def _closing(exc: smtplib.SMTPException) -> bool:
    """The connection is gone or going, whatever the reply was about: a disconnect, or a 421
    ("closing transmission channel", RFC 5321 section 3.8), after which smtplib closes it."""
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return True
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return any(code == 421 for code, _ in exc.recipients.values())
    return isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code == 421


def _refusals(recipients: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{a}: {code} {_text(reply)}" for a, (code, reply) in recipients.items())


def _network(exc: OSError, cfg: Email) -> str:
    """What went wrong below SMTP, told apart: DNS, TLS, a timeout, a refused connection."""
    if isinstance(exc, socket.gaierror):
        return f"DNS: cannot resolve {cfg.host!r} ({exc.strerror})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        fix = "" if cfg.ca_file else "; if a private CA signed it, set ca_file"
        return f"TLS: certificate verify failed: {exc.verify_message}{fix}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc.strerror or type(exc).__name__}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out after {cfg.timeout:g} s"
    return exc.strerror or type(exc).__name__


def _text(reply: bytes | str) -> str:
    """An SMTP reply as one line of text, not Python bytes."""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return one_line(reply)


def _domain(node: str) -> str:
    """A node name made safe for the right-hand side of a Message-ID."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", node)[:64] or "lbwatch"


# The header fields lbwatch writes, and those the email package adds for the body.
HEADERS = frozenset(
    {
        "subject",
        "from",
        "to",
        "date",
        "message-id",
        "x-lbwatch-event",
        "x-lbwatch-node",
        "content-type",
        "content-transfer-encoding",
        "mime-version",
    }
)


def checked(raw: bytes, where: str) -> bytes:
    """``raw`` as it will go on the wire, after making sure its header block holds exactly the
    fields lbwatch wrote, each once: whatever a Python's email package does with a hostile
    name, no extra header and no early end of the header block is ever sent."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    names = [
        line.split(b":", 1)[0].decode("ascii", "replace").strip().lower()
        for line in head.split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t")
    ]
    wrote = {"subject", "from", "to", "date", "message-id", "x-lbwatch-event", "x-lbwatch-node"}
    if not sep or len(names) != len(set(names)) or not wrote <= set(names) <= HEADERS:
        raise PermanentDeliveryError(
            f"SMTP {where}: refusing to send a message whose headers are not the ones lbwatch "
            f"wrote ({', '.join(names)})"
        )
    return raw
