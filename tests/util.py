"""Small helpers shared by the tests, the lab and the benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    cond: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll ``cond`` until it is true; bounded in time, raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
