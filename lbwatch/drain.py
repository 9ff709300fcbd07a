"""The operator's drain (``lbwatch drain`` / ``undrain``): a flag file in the state directory,
kept across agent restarts and reboots until undrain, as the pause flag is. The agent reads it
(inotify on the state directory) and the policy moves the drained instances to the peers
through keepalived's track files (``trackfile``), never by stopping keepalived or haproxy.

Who writes: root (``lbwatch drain`` run as root; the state directory is root's). A flag that
cannot be read (edited by hand, cut short) still drains, every instance: the safe reading of
an operator's intent to take the node out.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

from lbwatch.events import Drain
from lbwatch.fsutil import read_small, write_atomic

FILE = "drained"
MAX_SIZE = 64 * 1024  # bytes: a flag `lbwatch drain` writes is far smaller
MAX_REASON = 200


def read(state_dir: Path) -> Drain | None:
    try:
        raw = read_small(state_dir / FILE, MAX_SIZE)
    except FileNotFoundError:
        return None
    except OSError:
        return Drain()
    if len(raw) > MAX_SIZE:
        return Drain()
    try:
        doc = json.loads(raw)
        names = doc.get("instances", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return Drain()
        return Drain(
            frozenset(names),
            since=_since(doc.get("since", 0.0)),
            reason=str(doc.get("reason", ""))[:MAX_REASON],
            by=str(doc.get("by", ""))[:64],
        )
    except (ValueError, TypeError, AttributeError, RecursionError):
        # RecursionError: json's parser on nesting deeper than the interpreter's stack
        return Drain()


def _since(value: object) -> float:
    """The wall-clock start as a finite number, or 0.0: a NaN or an infinity cannot be carried
    by the status document (JSON has neither; pydantic writes null, and then cannot read it)."""
    try:
        since = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return since if math.isfinite(since) else 0.0


def write(state_dir: Path, instances: list[str], reason: str = "") -> None:
    """Drain ``instances`` (none named: every instance of the node)."""
    note = {
        "since": time.time(),
        "instances": sorted(set(instances)),
        "reason": reason[:MAX_REASON],
        "by": os.environ.get("SUDO_USER", ""),
    }
    write_atomic(state_dir / FILE, json.dumps(note).encode(), mode=0o600)


def clear(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / FILE).unlink()
