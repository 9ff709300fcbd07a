"""Frozen observations and actions that cross module borders.

Data flows one way: observers (procs, health, the state directory) turn the world into the events
below, ``policy.decide`` turns events into ``Action`` objects that carry their reason, and the
executors (services) carry actions out and report back with ``ActionResult``.

Every timestamp here is ``time.monotonic()`` seconds unless its name says ``wall``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union


class Service(str, enum.Enum):
    """The two daemons lbwatch keeps in step."""

    HAPROXY = "haproxy"
    KEEPALIVED = "keepalived"


class Verb(str, enum.Enum):
    """What an action asks a service controller to do."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    RELOAD = "reload"
    # Direct SIGTERM to the identified process: the fallback when a stop command failed while
    # keepalived must not keep the VIP.
    TERMINATE = "terminate"


class Outcome(str, enum.Enum):
    """How a finished action ended."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"


class Health(str, enum.Enum):
    """What the optional HTTP probe concluded, after its fall/rise counts."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class ProcId:
    """One process, identified so that a reused PID never passes for it.

    ``create_time_wall`` is psutil's create_time() (seconds since the epoch); together with the PID
    it is the identity. ``started`` is the same instant on the monotonic clock, computed once at
    the observation boundary so that the policy never reads a wall clock.
    """

    pid: int
    create_time_wall: float
    name: str
    started: float

    def same_process(self, other: ProcId | None) -> bool:
        return (
            other is not None
            and other.pid == self.pid
            and abs(other.create_time_wall - self.create_time_wall) < 0.01
        )

    def __str__(self) -> str:
        return f"{self.name} {self.pid}"


# ---------------------------------------------------------------------------------------------
# Events in


@dataclass(frozen=True)
class ProcessUp:
    """A new main process of ``service`` was found (first sighting, a restart, or our start)."""

    service: Service
    proc: ProcId
    previous: ProcId | None  # the main process seen before this one, if any


@dataclass(frozen=True)
class ProcessDown:
    """The main process of ``service`` is gone (exited, zombie, or its PID now names another)."""

    service: Service
    proc: ProcId
    how: str  # "pidfd", "scan": which observer noticed


@dataclass(frozen=True)
class HaproxyReloaded:
    """The haproxy master stayed, its workers were replaced: a reload, not a restart."""

    master: ProcId
    old_workers: frozenset[int]
    new_workers: frozenset[int]


@dataclass(frozen=True)
class ProbeResult:
    """One HTTP health probe of haproxy finished."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class PauseChanged:
    """The maintenance pause flag was set or cleared (``lbwatch pause`` / ``resume``)."""

    paused: bool


@dataclass(frozen=True)
class Tick:
    """Time passed; lets timers (backoff, start delays) fire."""


@dataclass(frozen=True)
class Action:
    """Something the policy wants done to a service, with the sentence that explains why."""

    service: Service
    verb: Verb
    reason: str
    target: ProcId | None = None  # the process a TERMINATE is aimed at
    alert: str = ""  # non-empty: also a notification of this kind (haproxy_down, ...)

    def describe(self) -> str:
        return f"{self.verb.value} {self.service.value}"


@dataclass(frozen=True)
class ActionResult:
    """An executor finished an action."""

    action: Action
    outcome: Outcome
    detail: str  # one line: the command's exit status and the last line it printed
    duration: float


Event = Union[
    ProcessUp, ProcessDown, HaproxyReloaded, ProbeResult, PauseChanged, Tick, ActionResult
]


@dataclass(frozen=True)
class Note:
    """A sentence worth one log line that is not tied to an action (a reload seen, a give-up)."""

    level: int  # logging level
    text: str
    alert: str = ""  # non-empty: also a notification of this kind (giveup, action_failed)
