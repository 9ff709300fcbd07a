"""The one backoff rule: exponential, capped. Used for restarting a service (policy), for
retrying a notification channel (notify.sender) and for retrying a peer (sync.peers)."""

from __future__ import annotations


def delay(attempt: int, initial: float, cap: float, factor: float = 2.0) -> float:
    """The wait after attempt number ``attempt`` (1-based; anything lower counts as 1):
    ``initial * factor ** (attempt - 1)``, at most ``cap``."""
    return float(min(cap, initial * factor ** max(0, attempt - 1)))
