"""How long each step of an edit's way to the peers took, logged at debug level: bench/sync.py
reads these lines from the agents' logs (with their millisecond timestamps) for its breakdown
of the critical path, so that a regression shows where it is."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Logs "sync step NAME: N ms" when the block ends, however it ends."""
    started = time.monotonic()
    try:
        yield
    finally:
        log.debug("sync step %s: %.1f ms", name, (time.monotonic() - started) * 1000)
