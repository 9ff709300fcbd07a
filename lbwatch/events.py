"""Frozen observations and actions that cross module borders.

Data flows one way: observers (procs, health, the state directory) turn the world into the events
below, ``policy.decide`` turns events into ``Action`` objects that carry their reason, and the
executors (services) carry actions out and report back with ``ActionResult``.

Every timestamp here is ``time.monotonic()`` seconds unless its name says ``wall``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Union


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
    # A config sync job (check, install, reload haproxy): carried out by the sync service, on
    # haproxy's slot, so that it never runs beside a start or restart of haproxy.
    SYNC = "sync"
    # Read-only: ask systemd what it is doing with the service's unit (``unitjob``), on the
    # service's slot; the result's ``plan`` is the answer.
    ASK = "ask"
    # Write keepalived's track files (``trackfile``): the instances' priorities without a
    # restart (a drain, a split brain's stand-down), on keepalived's slot; the action's
    # ``track`` says which and to what.
    TRACK = "track"
    # Gratuitous ARP for the VIPs in ``Action.announce`` (``garp``), from the node that holds
    # them alone once a split brain ended: clients that learnt the other node's MAC come back.
    ANNOUNCE = "announce"


class Outcome(str, enum.Enum):
    """How a finished action ended."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"


class UnitPlan(str, enum.Enum):
    """What systemd is doing with a unit whose main process was just seen gone (``unitjob``)."""

    RESTART = "restart"  # a restart job (systemctl restart, try-restart), or it just did one
    AUTO_RESTART = "auto-restart"  # the unit's Restart= brings it back: it exited on its own
    STOP = "stop"  # a stop job
    NONE = "none"  # no job and no restart scheduled (a stop that has finished)
    UNKNOWN = "unknown"  # not answered, or an answer that does not tell


class Health(str, enum.Enum):
    """What the optional HTTP probe concluded, after its fall/rise counts."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class ProcId:
    """One process, identified so that a reused PID never passes for it.

    The identity is the PID plus ``start_ticks``, the start time in clock ticks since boot
    (``pstat``): boot-relative, so no wall-clock step can make a running process look new.
    ``started`` is the same instant on the monotonic clock, for the policy's delays, and
    ``started_wall`` is for people reading the status; neither decides identity.
    """

    pid: int
    start_ticks: int
    name: str
    started: float
    started_wall: float = 0.0

    def same_process(self, other: ProcId | None) -> bool:
        return other is not None and other.pid == self.pid and other.start_ticks == self.start_ticks

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
    leftovers: int = 0  # its children still running when it was found gone


@dataclass(frozen=True)
class LeftoversGone:
    """The last of the children a dead main process of ``service`` left behind has exited."""

    service: Service
    proc: ProcId  # the main process that left them


@dataclass(frozen=True)
class HaproxyReloaded:
    """The haproxy master stayed, its workers were replaced: a reload, not a restart."""

    master: ProcId
    old_workers: frozenset[int]
    new_workers: frozenset[int]


@dataclass(frozen=True)
class ProbeResult:
    """One HTTP health probe of haproxy finished. ``internal``: the probe itself could not be
    carried out (an lbwatch fault, not haproxy's): it counts neither way."""

    ok: bool
    detail: str
    internal: bool = False
    master: ProcId | None = None  # the haproxy master that ran when the probe was started
    # When it was started (monotonic): config sync's canary counts only probes started after
    # the reload it waits on, and the master is the same across a reload.
    started: float = 0.0
    duration: float = 0.0  # seconds the probe took


@dataclass(frozen=True)
class PauseChanged:
    """The maintenance pause flag was set or cleared (``lbwatch pause`` / ``resume``)."""

    paused: bool


@dataclass(frozen=True)
class InstanceFacts:
    """A VRRP instance on one node, as that node's agent last saw it: keepalived's last word on
    it (``state``: MASTER, BACKUP, FAULT, STOP, or "unknown" where no notify FIFO reports), its
    VIP addresses as the node's configs name them, and whether any of them sits on the node's
    interfaces (``held``: measured, not keepalived's word)."""

    name: str
    state: str
    vips: frozenset[str] = frozenset()
    held: bool = False

    @property
    def holds(self) -> bool:
        """The node holds the instance: its VIP is there, or keepalived said MASTER."""
        return self.held or self.state == "MASTER"


@dataclass(frozen=True)
class PeerFacts:
    """What a peer's agent last said of its node in a current view (``cluster.facts``), as far
    as the policy weighs it. ``answered``: when that answer came, on this node's monotonic
    clock; the policy takes it as current for ``handover.CURRENT_FOR`` seconds after."""

    node: str
    answered: float
    serving: bool  # its haproxy runs, is not failing its probe, and was not given up on
    keepalived: bool  # its keepalived runs
    paused: bool
    instances: tuple[InstanceFacts, ...] = ()
    drained: frozenset[str] = frozenset()  # its instances drained by its operator


@dataclass(frozen=True)
class Group:
    """Every configured peer: those whose agent spoke in its last answer, and those that cannot
    be asked now (link down, agent stopped or hung, no view)."""

    peers: tuple[PeerFacts, ...] = ()
    silent: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeersSeen:
    """The cluster watch heard its peers (``group``); None: this node watches no peers."""

    group: Group | None


@dataclass(frozen=True)
class Drain:
    """The operator's drain (``lbwatch drain``): ``instances`` named, or every instance of the
    node when none is; ``since`` (wall clock), ``reason`` and ``by`` for people."""

    instances: frozenset[str] = frozenset()
    since: float = 0.0
    reason: str = ""
    by: str = ""

    def covers(self, instance: str) -> bool:
        return not self.instances or instance in self.instances


@dataclass(frozen=True)
class DrainChanged:
    """The drain flag was set, changed or cleared (None)."""

    drain: Drain | None


@dataclass(frozen=True)
class TrackSeen:
    """keepalived's track files as read now: each instance's value (None: no file, or no
    number in it: keepalived reads 0)."""

    values: tuple[tuple[str, int | None], ...]


@dataclass(frozen=True)
class StandDown:
    """The split-brain resolution (``cluster.standdown``): the instances this node stands down
    for now, each with the sentence that says why (empty: none)."""

    instances: tuple[tuple[str, str], ...] = ()

    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.instances)


@dataclass(frozen=True)
class Announce:
    """A split brain on ``instance`` ended with this node holding it alone: its ``vips`` are
    announced (gratuitous ARP)."""

    instance: str
    vips: tuple[str, ...]


@dataclass(frozen=True)
class VrrpSeen:
    """This node's VRRP instances changed (keepalived's report, a VIP come or gone)."""

    instances: tuple[InstanceFacts, ...]


@dataclass(frozen=True)
class Tick:
    """Time passed; lets timers (backoff, start delays) fire."""


SyncKind = Literal[
    "startup",  # reconcile the live file with the recorded version, then take staged versions
    "local",  # the live file (or an extra file) changed on this node
    "staged",  # a peer staged a version here
    "now",  # `lbwatch sync --now`
]


@dataclass(frozen=True)
class SyncJob:
    """Config sync work that installs or reloads, and so goes through the policy."""

    kind: SyncKind
    file: str  # the live config, for the sentences
    seen_ns: int = 0  # "local": wall-clock time the edit was seen, the version's edit time

    def sentence(self) -> tuple[str, str]:
        """(cause, what is done) for the action's reason."""
        return {
            "startup": ("lbwatch started", f"reconciling {self.file} with the recorded version"),
            "local": (f"{self.file} changed", "checking, reloading and pushing it"),
            "staged": ("a peer staged a new version", f"checking and installing it as {self.file}"),
            "now": ("sync --now requested", f"checking, reloading and pushing {self.file}"),
        }[self.kind]


@dataclass(frozen=True)
class SyncWanted:
    """Config sync has work that installs or reloads; the policy decides when it runs."""

    job: SyncJob


@dataclass(frozen=True)
class SyncStopped:
    """Config sync was switched off or rebuilt (SIGHUP): the jobs it queued are void."""


@dataclass(frozen=True)
class Action:
    """Something the policy wants done to a service, with the sentence that explains why:
    ``cause`` (what was observed) and ``doing`` (what is done about it). Several actions with
    one cause are logged as one line."""

    service: Service
    verb: Verb
    cause: str
    doing: str
    # The process a TERMINATE is aimed at; an ASK's dead master; for a STOP, the process that
    # gets SIGTERM through its pidfd the moment the action is issued, on the event loop, before
    # the stop command starts on a worker: keepalived's priority-0 advertisement leaves within
    # a millisecond of haproxy's death seen, not after a command has been spawned (1-10 ms, and
    # 10-30 ms more for systemctl to start). The command still runs, so that the service
    # manager records the stop (``services.CommandController.begin``).
    target: ProcId | None = None
    alert: str = ""  # non-empty: also a notification of this kind (haproxy_down, ...)
    job: SyncJob | None = None  # what a SYNC action runs
    track: tuple[tuple[str, int], ...] = ()  # what a TRACK action writes: (instance, value)
    announce: tuple[str, ...] = ()  # the VIPs an ANNOUNCE sends gratuitous ARP for
    deadline: float = 60.0  # seconds; no result by then counts as a failure (a hung executor)
    # Numbered by the policy as it issues them: two actions alike in every other field (a
    # second start, "attempt 2" after a window) are still two, and the late result of one
    # that passed its deadline is never taken for the other's.
    seq: int = 0

    @property
    def reason(self) -> str:
        return f"{self.cause}; {self.doing}"

    def describe(self) -> str:
        return f"{self.verb.value} {self.service.value}"


@dataclass(frozen=True)
class ActionResult:
    """An executor finished an action."""

    action: Action
    outcome: Outcome
    detail: str  # one line: the command's exit status and the last line it printed
    duration: float
    plan: UnitPlan | None = None  # an ASK's answer


Change = Union[ProcessUp, ProcessDown, HaproxyReloaded, LeftoversGone]


@dataclass(frozen=True)
class Observation:
    """Everything one scan (or one pidfd wake-up) saw, applied as one: a scan that finds the old
    haproxy master gone and a new one running never lets the policy act on the moment between."""

    changes: tuple[Change, ...]


Event = Union[
    ProcessUp,
    ProcessDown,
    HaproxyReloaded,
    Observation,
    ProbeResult,
    PauseChanged,
    SyncWanted,
    SyncStopped,
    Tick,
    ActionResult,
    PeersSeen,
    VrrpSeen,
    DrainChanged,
    TrackSeen,
    StandDown,
    Announce,
]


@dataclass(frozen=True)
class Note:
    """A sentence worth one log line that is not tied to an action (a reload seen, a give-up)."""

    level: int  # logging level
    text: str
    alert: str = ""  # non-empty: also a notification of this kind (giveup, action_failed)
