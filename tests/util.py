"""Small helpers shared by the tests, the lab and the benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lbwatch.config import Config
from lbwatch.statusdoc import StatusDoc
from lbwatch.sync.confine import Confine, confine_for


def wait_for(
    cond: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll ``cond`` until it is true; bounded in time, raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def load_status(path: Path) -> StatusDoc | None:
    """The agent's status document at ``path``, read through its model; None until the agent
    has written one. The agent replaces it by rename, so it is never read half written: any
    other failure, a document the model no longer accepts, is raised here, at the read."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return StatusDoc.model_validate_json(raw)


def confined() -> Confine:
    """The walls a node with the default ``[sync.received]`` puts up for received versions."""
    return confine_for(Config(), Path("/etc/haproxy/haproxy.cfg"), [])


def unconfined() -> Confine:
    """The same rules, the check run as lbwatch runs it (``sandbox = false``): for tests whose
    checker must act on the node (an operator's save made during the check)."""
    return replace(confined(), sandbox=None)
