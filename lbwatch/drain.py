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
import os
import time
from pathlib import Path

from lbwatch.events import Drain
from lbwatch.fsutil import write_atomic

FILE = "drained"


def read(state_dir: Path) -> Drain | None:
    try:
        raw = (state_dir / FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return Drain()
    try:
        doc = json.loads(raw)
        names = doc.get("instances", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return Drain()
        return Drain(
            frozenset(names),
            since=float(doc.get("since", 0.0)),
            reason=str(doc.get("reason", ""))[:200],
            by=str(doc.get("by", ""))[:64],
        )
    except (ValueError, TypeError, AttributeError):
        return Drain()


def write(state_dir: Path, instances: list[str], reason: str = "") -> None:
    """Drain ``instances`` (none named: every instance of the node)."""
    note = {
        "since": time.time(),
        "instances": sorted(set(instances)),
        "reason": reason,
        "by": os.environ.get("SUDO_USER", ""),
    }
    write_atomic(state_dir / FILE, json.dumps(note).encode(), mode=0o600)


def clear(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / FILE).unlink()
