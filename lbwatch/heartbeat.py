"""Whether the agent that wrote a node view still speaks for it: the agent's heartbeat, and the
receiver's judgement of a view by it.

Who reaches what: the agent (root) renews the heartbeat, a file in its run directory
(``[agent] run_dir``, root's, 0755); the peers' receiver (``sync.sink``, root, run by sshd for
a peer's sync key) reads it, and the node view that names it, and answers for the view. A key
holder reaches neither file: it can only ask, and hear the node's answer.

A stopped agent (SIGSTOP, a debugger, a loop hung in a call) still exists: its PID and start
time pass /proc's check, and the view it wrote last (MASTER, holding the VIP) would go on being
served as the node's current one. So the agent renews a heartbeat from its one loop
(``Heartbeat.renew``, called on every turn; never from a thread of its own, which would outlive
a hung loop), and a view is current only while that heartbeat is younger than ``STALE_AFTER``.

Why a file of its own, not a field of ``node.json``: the view is written only when it changes
and the peers' long poll answers only a change, so an idle pair exchanges one small ``SAME``
a second and writes nothing to disk. Renewing the view every second would make every answer a
``DATA`` and write staging's disk every second; the heartbeat is one rename a second on a tmpfs
(``/run``), which no peer is sent. The view names the file (``NodeAgent.heartbeat``).

The heartbeat holds the agent's PID and start time, so it is that agent's and no other's, and
the moment of its renewal on CLOCK_BOOTTIME (``pstat.since_boot``): boot-relative, so no
wall-clock step makes an old heartbeat look new or a new one old. The receiver runs on the same
host as the agent and reads the same clock.

When a view is not current (its agent has ended, or is not responding), the receiver answers
with what the node's kernel holds of the view's VIPs instead (``kernel_holds``): the receiver
is a process of its own, started by sshd, so that answer does not depend on the agent.

Imported by the receiver before anything heavy: stdlib and ``pstat`` only (and psutil, for a
view that is not current).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lbwatch import pstat

log = logging.getLogger(__name__)

EVERY = 1.0  # seconds: the agent renews its heartbeat at least this often
# Seconds without a renewal after which a view is not current: "agent not responding". Two
# renewals missed. ``[cluster] split_brain_after`` may not go below it (plus a margin:
# ``config.SPLIT_BRAIN_FLOOR``), so that a view served just before it went stale cannot confirm
# a claim.
STALE_AFTER = 2.0
FILE = "heartbeat"  # in the agent's run_dir
MAGIC = "lbwatch-heartbeat"
MAX_SIZE = 128


class Heartbeat:
    """The agent's side: renewed from its loop. ``wake``: when it must be renewed next, on the
    loop's clock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wake = 0.0  # due at once
        me = pstat.read_stat(os.getpid())
        assert me is not None
        self._who = f"{MAGIC} {me.pid} {me.start_ticks}"
        self._failed = False

    def renew(self, now: float) -> bool:
        """Renew it if half its period has passed (``now``: the loop's clock). Called on every turn
        of the loop: an idle agent's scans wake it once a second, and renewing on those turns
        means the heartbeat rarely wakes it on its own. Whether it was renewed."""
        if now < self.wake - EVERY / 2:
            return False
        self.wake = now + EVERY
        data = f"{self._who} {pstat.since_boot():.3f}\n".encode("ascii")
        try:
            _replace(self.path, data)
        except OSError as exc:
            # The receiver then finds it stale and says "not responding": what the peers must
            # hear while this node's view cannot be vouched for.
            if not self._failed:
                log.error("cannot renew the heartbeat %s: %s", self.path, exc)
            self._failed = True
            return False
        if self._failed:
            log.info("heartbeat %s renewed again", self.path)
        self._failed = False
        return True


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name renamed over ``path``: a reader sees the old heartbeat
    or the new one, never half of one. No fsync: the file is on a tmpfs, and one that did not
    survive a crash is only a heartbeat that stopped, as it should."""
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def silent_for(path: str, pid: int, ticks: int, now: float) -> float:
    """Seconds since the agent ``pid`` (started at ``ticks``) last renewed the heartbeat at
    ``path``, at ``now`` (``pstat.since_boot``); infinite when there is none of that agent's
    there (missing, not a regular file, another agent's, damaged)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return math.inf
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return math.inf
        words = os.read(fd, MAX_SIZE).decode("ascii", "replace").split()
    except OSError:
        return math.inf
    finally:
        os.close(fd)
    if len(words) != 4 or words[:3] != [MAGIC, str(pid), str(ticks)]:
        return math.inf
    try:
        at = float(words[3])
    except ValueError:
        return math.inf
    return max(0.0, now - at) if math.isfinite(at) else math.inf


@dataclass(frozen=True)
class Verdict:
    """A node view judged: ``current`` for ``current_for`` more seconds (infinite for the view of
    an agent older than the heartbeat, whose PID alone is checked); or not current, because its
    agent has ``ended``, or is ``silent`` (running, its heartbeat older than ``STALE_AFTER``):
    ``why``, in a sentence."""

    state: Literal["current", "ended", "silent"]
    current_for: float = 0.0
    why: str = ""


def judge(view: Mapping[str, Any], now: float) -> Verdict:
    """Whether the node view ``view`` (parsed JSON) is current at ``now`` (``pstat.since_boot``).
    Raises KeyError, TypeError or ValueError for what is not a node view."""
    agent = view["agent"]
    pid, ticks = int(agent["pid"]), int(agent["start_ticks"])
    running = pstat.read_stat(pid)
    if running is None or running.start_ticks != ticks or not running.alive:
        return Verdict("ended", why=f"lbwatch is not running (its agent, PID {pid}, has ended)")
    path = agent.get("heartbeat")
    if path is None:
        # A view written by an agent older than the heartbeat (until it is restarted after an
        # upgrade): its PID is all there is to go by.
        return Verdict("current", math.inf)
    left = STALE_AFTER - silent_for(str(path), pid, ticks, now)
    if left > 0:
        return Verdict("current", left)
    if left == -math.inf:
        how = f"has no heartbeat at {path}"
    else:
        how = f"has not renewed its heartbeat for {STALE_AFTER:g} s"
    return Verdict("silent", why=f"lbwatch is not responding (its agent, PID {pid}, {how})")


def vip_address(vip: str) -> str:
    """A VIP as written (in lbwatch's config or keepalived's: "192.0.2.100/24 dev eth0") to
    its address alone, which is what is compared. Here, not in ``config`` (which re-exports
    it), because the receiver uses it and imports no pydantic."""
    return vip.split("/", 1)[0].split(maxsplit=1)[0]


def kernel_holds(view: Mapping[str, Any]) -> list[str]:
    """The VIPs of ``view`` (every instance's, addresses only) that sit on this node's interfaces
    now, as the kernel says (getifaddrs, through psutil): the node's claim when its agent cannot
    speak for it. Raises as ``judge`` does for what is not a node view."""
    import psutil  # only for a view that is not current: the receiver starts without it

    vips = {
        vip_address(str(vip))
        for instance in view.get("vrrp", {}).values()
        for vip in instance.get("vips", [])
        if str(vip).strip()
    }
    if not vips:
        return []
    # Not guarded: a node whose addresses cannot be read is not said to hold none of them.
    on = {
        a.address.split("%")[0]
        for infos in psutil.net_if_addrs().values()
        for a in infos
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }
    return sorted(vips & on)
