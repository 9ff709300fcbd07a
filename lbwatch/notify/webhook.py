"""The webhook channel: POST JSON (with a `text` field for Slack-style receivers) via requests."""

from __future__ import annotations

import socket
import ssl

from lbwatch.config import Webhook
from lbwatch.notify.channels import DeliveryError, PermanentDeliveryError
from lbwatch.notify.message import Notification


class WebhookChannel:
    keep_open = 0.0  # requests' pool keeps its connections itself

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
            "id": note.ident,  # the same on every retry: fixed when the message was spooled
            "event": note.event,
            "node": note.node,
            "subject": note.subject,
            "body": note.body,
            "created": note.created,
            "fields": note.fields,
        }

    def send(self, note: Notification) -> str:
        try:
            resp = self._session.post(
                self.cfg.url,
                json=self.payload(note),
                timeout=self.cfg.timeout,
                verify=self.cfg.verify,
                allow_redirects=False,
            )
        except self._requests.RequestException as exc:
            raise DeliveryError(f"POST {self.cfg.url}: {self._why(exc)}") from None
        code = resp.status_code
        if 200 <= code < 300:
            return f"{self.cfg.url} accepted it (HTTP {code})"
        if 300 <= code < 400:
            # The URL is wrong (moved, or http that redirects to https): a configuration error,
            # which no retry mends. Set aside, said with the fix; `lbwatch notify
            # --retry-rejected` sends them once the URL is corrected.
            where = resp.headers.get("Location", "?")
            raise PermanentDeliveryError(
                f"POST {self.cfg.url}: HTTP {code}, redirected to {where}: set this webhook's "
                "url to where it should post, then `lbwatch notify --retry-rejected`"
            )
        # 4xx means this request will never be accepted, except "try later" ones.
        permanent = 400 <= code < 500 and code not in (408, 425, 429)
        error = PermanentDeliveryError if permanent else DeliveryError
        raise error(f"POST {self.cfg.url}: HTTP {code}")

    def answer(self) -> str:
        """Whether the URL's server answers, without posting anything (``lbwatch doctor``): a
        HEAD; any HTTP status counts, since a receiver may take nothing but POST."""
        try:
            resp = self._session.head(
                self.cfg.url, timeout=self.cfg.timeout, verify=self.cfg.verify,
                allow_redirects=False,
            )  # fmt: skip
        except self._requests.RequestException as exc:
            raise DeliveryError(f"HEAD {self.cfg.url}: {self._why(exc)}") from None
        return f"{self.cfg.url} answers (HTTP {resp.status_code} to HEAD)"

    def _why(self, exc: Exception) -> str:
        """DNS, TLS, a timeout, a refused connection told apart, from the exception chain
        (requests wraps urllib3's, which wraps the socket's)."""
        if isinstance(exc, self._requests.Timeout):
            return f"timed out after {self.cfg.timeout:g} s"
        seen: list[BaseException] = []
        todo: list[BaseException] = [exc]
        while todo and len(seen) < 20:
            e = todo.pop()
            if e in seen:
                continue
            seen.append(e)
            if isinstance(e, socket.gaierror):
                return f"DNS: cannot resolve the host ({e.strerror})"
            if isinstance(e, ssl.SSLCertVerificationError):
                return f"TLS: certificate verify failed: {e.verify_message}"
            if isinstance(e, ConnectionRefusedError):
                return "Connection refused"
            more = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
            todo += [m for m in more if isinstance(m, BaseException)]
        if isinstance(exc, self._requests.exceptions.SSLError):
            return "TLS: handshake failed"
        return type(exc).__name__

    def idle(self) -> None:
        """requests' pool manages its connections itself."""
