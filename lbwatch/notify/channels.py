"""Delivery channels. Each ``send`` blocks (it runs on the sender thread), returns when the
server accepted the message and raises ``DeliveryError`` with a one-line reason otherwise.

The channels live in ``smtp`` and ``webhook`` and are imported only when configured: smtplib
with ssl and requests with urllib3 cost several MiB of resident memory each, which an agent
without notifications should not carry.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from lbwatch.config import Email, Notify
from lbwatch.notify.message import Notification


class DeliveryError(Exception):
    """Not delivered this time; worth retrying (server down, timeout, 4xx SMTP reply)."""


class PermanentDeliveryError(DeliveryError):
    """The server refused this message for good (5xx SMTP reply, HTTP 4xx): retrying cannot
    help, and keeping it at the head of the queue would block every message behind it."""


class Channel(Protocol):
    name: str
    keep_open: float  # seconds a connection is kept once nothing waits; then ``idle()``

    def send(self, note: Notification) -> str:
        """Returns a one-line receipt: who accepted it (shown by `lbwatch notify --test`)."""

    def idle(self) -> None:
        """Nothing more to send for now: release any connection kept for the next message."""

    def answer(self) -> str:
        """Whether its server answers, without sending a message (raises DeliveryError)."""


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
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DeliveryError(f"cannot read the SMTP password from {path}: {exc.strerror}") from None
    with os.fdopen(fd) as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        # (A systemd credential lives in a directory only the service can reach.)
        if mode & 0o077 and cfg.password_file is not None:
            raise DeliveryError(
                f"the SMTP password file {path} is readable by others (mode {mode:04o}): "
                f"chmod 600 {path}"
            )
        return f.read().strip("\n")


def build_channels(cfg: Notify) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    if cfg.email is not None:
        from lbwatch.notify.smtp import EmailChannel

        channels["email"] = EmailChannel(cfg.email)
    if cfg.webhooks:
        from lbwatch.notify.webhook import WebhookChannel

        for hook in cfg.webhooks:
            channels[hook.name] = WebhookChannel(hook)
    return channels
