"""The VRRP states an agent learned, kept for the next agent on this node.

keepalived writes a transition to its FIFO once, when it happens. An agent that restarts (an
upgrade, a crash) would know no instance's state until the next transition, days later
perhaps, and show "unknown" meanwhile. So the agent keeps the states it knows in the run
directory, with the identity of the keepalived that reported them: the next agent takes them
only while that same keepalived still runs (same boot, PID and start time), and lets anything
the FIFO says (its backlog included) override them. A keepalived started since reported its
own states on its start, through the FIFO.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from lbwatch.events import ProcId
from lbwatch.fsutil import write_atomic

log = logging.getLogger(__name__)

MEMO = "vrrp-states.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class Memo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    boot: str
    pid: int
    start_ticks: int
    states: dict[str, str]


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class VrrpMemory:
    def __init__(self, run_dir: Path, boot: Optional[str] = None) -> None:
        self.path = run_dir / MEMO
        self.boot = boot_id() if boot is None else boot
        self.saved = self._load()

    def _load(self) -> Memo | None:
        try:
            return Memo.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError, ValueError):
            return None

    def states(self, heard: Mapping[str, str], keepalived: ProcId | None) -> dict[str, str]:
        """The states to show: what this agent ``heard`` on the FIFO, over what an earlier
        agent heard from the same ``keepalived`` (None: not running, nothing to remember)."""
        if keepalived is None:
            return dict(heard)
        saved = self.saved
        same = saved is not None and (saved.boot, saved.pid, saved.start_ticks) == (
            self.boot,
            keepalived.pid,
            keepalived.start_ticks,
        )
        merged = {**(saved.states if saved is not None and same else {}), **heard}
        if same and saved is not None and merged == saved.states:
            return merged  # the usual case, every publish: nothing new to keep
        memo = Memo(
            boot=self.boot, pid=keepalived.pid, start_ticks=keepalived.start_ticks, states=merged
        )
        if memo != saved:
            self.saved = memo
            try:
                write_atomic(self.path, memo.model_dump_json().encode())
            except OSError as exc:
                log.warning("cannot keep the VRRP states in %s: %s", self.path, exc)
        return merged
