"""Delivery channels. Each ``send`` blocks (it runs on the sender thread), returns when the
server accepted the message and raises ``DeliveryError`` with a one-line reason otherwise."""

from __future__ import annotations

import os
import smtplib
import ssl
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Protocol

from lbwatch.config import Email, Notify, Webhook
from lbwatch.notify.message import Notification, one_line


class DeliveryError(Exception):
    pass


class Channel(Protocol):
    name: str

    def send(self, note: Notification) -> None: ...

    def idle(self) -> None:
        """Nothing more to send for now: release any connection kept for the next message."""


def read_password(cfg: Email, environ: dict[str, str] | None = None) -> str | None:
    """From ``password_file`` or the systemd credential; read at each send, so a rotated
    secret is picked up without a restart."""
    env = os.environ if environ is None else environ
    if cfg.password_file is not None:
        path = cfg.password_file
    elif cfg.password_credential is not None:
        creds = env.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise DeliveryError(
                f"password_credential {cfg.password_credential!r} set but $CREDENTIALS_DIRECTORY "
                "is not: add LoadCredential= to the unit"
            )
        path = Path(creds) / cfg.password_credential
    else:
        return None
    try:
        return path.read_text().strip("\n")
    except OSError as exc:
        raise DeliveryError(f"cannot read the SMTP password from {path}: {exc.strerror}") from None


class EmailChannel:
    """One SMTP connection is kept while messages keep coming (a burst costs one handshake,
    not one per message) and closed when the sender goes idle."""

    name = "email"

    def __init__(self, cfg: Email) -> None:
        self.cfg = cfg
        self._smtp: smtplib.SMTP | None = None

    def build(self, note: Notification) -> EmailMessage:
        # policy=SMTP refuses a header containing CR or LF; one_line already removed them.
        msg = EmailMessage(policy=SMTP)
        msg["Subject"] = one_line(note.subject, 300)
        msg["From"] = self.cfg.sender
        msg["To"] = ", ".join(self.cfg.to)
        msg["Date"] = formatdate(note.created, localtime=True)
        msg["Message-ID"] = make_msgid("lbwatch")
        msg["X-Lbwatch-Event"] = one_line(note.event, 100)
        msg["X-Lbwatch-Node"] = one_line(note.node, 100)
        msg.set_content(note.body)
        return msg

    def _connect(self) -> smtplib.SMTP:
        cfg = self.cfg
        password = read_password(cfg)
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if cfg.security == "tls":
            smtp = smtplib.SMTP_SSL(cfg.host, cfg.smtp_port(), timeout=cfg.timeout, context=context)
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.smtp_port(), timeout=cfg.timeout)
        try:
            if cfg.security == "starttls":
                smtp.starttls(context=context)
            if cfg.username is not None and password is not None:
                smtp.login(cfg.username, password)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def idle(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                self._smtp.close()
            self._smtp = None

    def send(self, note: Notification) -> None:
        cfg = self.cfg
        msg = self.build(note)
        where = f"{cfg.host}:{cfg.smtp_port()}"
        try:
            refused = None
            if self._smtp is not None:
                try:
                    refused = self._smtp.send_message(msg)
                except (smtplib.SMTPServerDisconnected, OSError):
                    # The kept connection went stale (a server's idle timeout): once more, afresh.
                    self._smtp.close()
                    self._smtp = None
            if self._smtp is None:
                self._smtp = self._connect()
                refused = self._smtp.send_message(msg)
        except smtplib.SMTPException as exc:
            self.idle()
            raise DeliveryError(f"SMTP {where}: {one_line(str(exc))}") from None
        except OSError as exc:
            self.idle()
            raise DeliveryError(f"SMTP {where}: {exc.strerror or type(exc).__name__}") from None
        if refused:
            raise DeliveryError(f"SMTP {cfg.host} refused recipients {sorted(refused)}")


class WebhookChannel:
    def __init__(self, cfg: Webhook) -> None:
        import requests  # only where a webhook is configured: it is the heaviest import

        self.cfg = cfg
        self.name = cfg.name
        self._requests = requests
        self._session = requests.Session()

    @staticmethod
    def payload(note: Notification) -> dict[str, object]:
        return {
            "text": f"{note.subject}\n{note.body}",
            "event": note.event,
            "node": note.node,
            "subject": note.subject,
            "body": note.body,
            "created": note.created,
            "fields": note.fields,
        }

    def send(self, note: Notification) -> None:
        try:
            resp = self._session.post(
                self.cfg.url,
                json=self.payload(note),
                timeout=self.cfg.timeout,
                verify=self.cfg.verify,
                allow_redirects=False,
            )
        except self._requests.RequestException as exc:
            raise DeliveryError(f"POST {self.cfg.url}: {type(exc).__name__}") from None
        if not 200 <= resp.status_code < 300:
            raise DeliveryError(f"POST {self.cfg.url}: HTTP {resp.status_code}")

    def idle(self) -> None:
        """requests' pool manages its connections itself."""


def build_channels(cfg: Notify) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    if cfg.email is not None:
        channels["email"] = EmailChannel(cfg.email)
    for hook in cfg.webhooks:
        channels[hook.name] = WebhookChannel(hook)
    return channels
