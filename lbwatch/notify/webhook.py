"""The webhook channel: POST JSON (with a `text` field for Slack-style receivers) via requests."""

from __future__ import annotations

from lbwatch.config import Webhook
from lbwatch.notify.channels import DeliveryError
from lbwatch.notify.message import Notification


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
