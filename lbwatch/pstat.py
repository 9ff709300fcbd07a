"""What the kernel says about one process, read from ``/proc/PID/stat`` in one go: its name, state,
parent and start time, the start time in clock ticks since boot.

That start time is lbwatch's notion of process identity. It never changes for a process and no
clock step moves it. psutil's ``create_time()`` is the same number plus ``boot_time()``, and
``boot_time()`` is /proc/stat's ``btime``, the wall clock minus the time since boot: it moves by
the whole step whenever the wall clock is stepped (NTP, ``date -s``, a leap second), and by a
second on its own from rounding, so a process compared by ``create_time()`` can look like a new
one. See proc(5), /proc/[pid]/stat field 22 (starttime).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Errors that say nothing about the process: the kernel had no descriptor or memory to give
# for the read. Taking one for "no such process" reports a live daemon dead.
SHORT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass(frozen=True)
class Stat:
    pid: int
    comm: str  # the kernel's name for it, at most 15 characters
    state: str  # R, S, D, T, t, Z (zombie), X (dead), ...
    ppid: int
    session: int  # the session ID: equal to pid for a session leader (a daemon, a service)
    start_ticks: int  # when it started, in clock ticks since boot

    @property
    def alive(self) -> bool:
        """Running in any sense that counts: a zombie has exited, it only waits to be reaped."""
        return self.state not in ("Z", "X", "x")


def parse_stat(pid: int, text: str) -> Stat | None:
    """``text`` is the content of /proc/PID/stat. The name sits in parentheses and may itself
    hold spaces and parentheses, so the fields are counted from the last ')'."""
    head, sep, tail = text.rpartition(")")
    if not sep or "(" not in head:
        return None
    comm = head.split("(", 1)[1]
    fields = tail.split()
    # fields[0] is field 3 (state), so field N is fields[N - 3].
    try:
        return Stat(pid, comm, fields[0], int(fields[1]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def lookup(pid: int) -> Stat | None:
    """The process's stat, or None when there is no such process (any more). Raises the
    OSError when /proc could not be read for want of a descriptor or memory (``SHORT_OF``):
    then nothing is known of the process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        if exc.errno in SHORT_OF:
            raise
        return None
    return parse_stat(pid, text)


def read_stat(pid: int) -> Stat | None:
    """The process's stat, or None when there is no such process or it cannot be read now."""
    try:
        return lookup(pid)
    except OSError:
        return None


def since_boot() -> float:
    """Seconds since boot on the clock /proc's start times count in (CLOCK_BOOTTIME: it goes on
    through suspend, and a time namespace shifts both alike)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def age(start_ticks: int, now_since_boot: float) -> float:
    """How long a process that started at ``start_ticks`` has been running (>= 0; the start time
    is known to one clock tick, 10 ms on most kernels)."""
    return max(0.0, now_since_boot - start_ticks / CLOCK_TICKS)
