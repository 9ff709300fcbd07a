"""The supervision state: what the policy knows of each service, frozen, and the read-only views
of it that others show (the one-line summary, the health line, readiness).

``policy.decide`` is the only thing that makes a new ``State``; everything here is pure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Optional

from lbwatch.config import Config, ServiceCfg
from lbwatch.events import (
    Action,
    ActionResult,
    Announce,
    Drain,
    Group,
    Health,
    InstanceFacts,
    Note,
    ProcId,
    Service,
    StandDown,
    SyncJob,
    UnitPlan,
)

HAPROXY, KEEPALIVED = Service.HAPROXY, Service.KEEPALIVED


class DownCause(str, enum.Enum):
    """Why a service is not running, which decides how its start is explained."""

    INITIAL = "initial"  # never seen since lbwatch started
    OURS = "ours"  # lbwatch stopped it
    UNEXPECTED = "unexpected"  # it exited on its own or someone else stopped it


@dataclass(frozen=True)
class ServiceState:
    proc: Optional[ProcId] = None
    inflight: Optional[Action] = None
    inflight_since: float = 0.0
    # Start attempts (monotonic times) since the service was last stable; drives backoff.
    attempts: tuple[float, ...] = ()
    not_before: float = 0.0  # backoff: no start attempt before this instant
    # A start command succeeded at this instant and its process has not shown up yet; no new
    # attempt until policy.start_confirm has passed.
    confirming_since: Optional[float] = None
    given_up: bool = False
    giveup_announced: bool = False  # said once per episode, until the service is stable again
    silent_start_warned: bool = False  # a start "succeeded" but no process came, said once
    down_reason: str = "not running when lbwatch started"
    down_cause: DownCause = DownCause.INITIAL
    restart_pending: bool = False  # keepalived: on_haproxy_restart = "restart" fired
    last_failure: str = ""
    stop_failed_at: Optional[float] = None  # keepalived: when a stop attempt failed
    # keepalived: the haproxy master that ran when lbwatch stopped keepalived (None: none ran),
    # so that the start that follows says truthfully what changed.
    stopped_while: Optional[ProcId] = None
    # keepalived: a start waits until this instant, or until the children the last keepalived
    # left behind have exited (fold.LEFTOVER_WAIT).
    leftovers_until: Optional[float] = None


# What systemd may be doing that keepalived is kept running for, within policy.restart_grace:
# not said yet (it is being asked), or restarting haproxy's unit on request. Restart= bringing
# back a haproxy that crashed may join once it is weighed against a failover.
WAIT_FOR: frozenset[Optional[UnitPlan]] = frozenset({None, UnitPlan.RESTART})


@dataclass(frozen=True)
class Comeback:
    """haproxy's master exited without lbwatch stopping it, haproxy is managed through its unit,
    and systemd is asked whether it is restarting that unit (``unitjob``). Until the episode ends
    (``Phase``) keepalived is not stopped and lbwatch does not start haproxy itself."""

    master: ProcId  # the master seen gone
    since: float  # the episode's first exit: the grace counts from here
    cause: str  # that exit in words ("haproxy master 4711 exited (pidfd)")
    plan: Optional[UnitPlan] = None  # systemd's answer; None until it is in


@dataclass(frozen=True)
class Kept:
    """haproxy here cannot serve, yet keepalived is kept running because no peer can take this
    node's VIP over (``handover``): said once when it begins, mailed if it lasts."""

    since: float  # monotonic
    why: str  # the sentence: what haproxy lacks, and what each peer lacks
    mailed: bool = False
    cause: str = ""  # what haproxy lacks alone: not noted again beside the sentence


class Phase(str, enum.Enum):
    """Where a comeback episode stands."""

    WAITING = "waiting"  # asking, or systemd is restarting haproxy; within the grace
    BACK = "back"  # restarted, and the new master runs (and passes its probe, if there is one)
    LAPSED = "lapsed"  # not a restart, no answer, or the grace ran out: the exit stands


@dataclass(frozen=True)
class State:
    haproxy: ServiceState = ServiceState()
    keepalived: ServiceState = ServiceState()
    health: Health = Health.UNKNOWN
    probe_streak: int = 0  # > 0: successes in a row, < 0: failures in a row
    probe_detail: str = ""
    probe_fault: str = ""  # why the last probe could not run at all (said once)
    paused: bool = False
    # False until the first full scan is in: lbwatch never acts on half a picture.
    primed: bool = False
    # Actions held back by the pause, so each is noted once, not on every tick.
    held: frozenset[str] = field(default_factory=frozenset)
    # Config sync work waiting for haproxy's slot, at most one job of each kind, in order.
    sync_queue: tuple[SyncJob, ...] = ()
    issued: int = 0  # actions issued so far: the next one's ``seq`` is this plus one
    systemd: bool = False  # systemd runs this host (``Primed``): haproxy's unit can be asked about
    comeback: Optional[Comeback] = None
    # This node's VRRP instances, and its peers as the cluster watch last heard them (None: no
    # peers watched): what ``handover`` weighs before a VIP is let go.
    vrrp: tuple[InstanceFacts, ...] = ()
    group: Optional[Group] = None
    kept: Optional[Kept] = None
    # The operator's drain (None: none), and keepalived's track files as last read: the policy
    # writes them until they say what the drain asks (``trackfile``).
    drain: Optional[Drain] = None
    track: tuple[tuple[str, Optional[int]], ...] = ()
    # The last TRACK that failed (what it would have written) and when the same write may be
    # tried again: a write that cannot succeed is not retried in a loop.
    track_failed: tuple[tuple[str, int], ...] = ()
    track_retry_at: float = 0.0
    # The split brain's resolution (``cluster.standdown``): instances in FAULT here for now;
    # and the VIPs to announce, once each, after one ended with this node holding them.
    standdown: StandDown = field(default_factory=StandDown)
    announcing: tuple[Announce, ...] = ()

    def svc(self, service: Service) -> ServiceState:
        return self.haproxy if service is HAPROXY else self.keepalived

    def with_svc(self, service: Service, **changes: object) -> State:
        new = replace(self.svc(service), **changes)  # type: ignore[arg-type]
        return replace(self, haproxy=new) if service is HAPROXY else replace(self, keepalived=new)


@dataclass(frozen=True)
class Primed:
    """The first full scan has been folded in; from now on the policy acts. ``systemd``: systemd
    runs this host (``systemd.booted``)."""

    systemd: bool = False


@dataclass(frozen=True)
class Decision:
    state: State
    actions: tuple[Action, ...] = ()
    notes: tuple[Note, ...] = ()
    wake_at: Optional[float] = None
    # Actions that got no result by their deadline, failed here on the executor's behalf.
    expired: tuple[ActionResult, ...] = ()


def svc_cfg(cfg: Config, service: Service) -> ServiceCfg:
    return cfg.haproxy if service is HAPROXY else cfg.keepalived


def haproxy_serving(state: State) -> bool:
    """haproxy runs and is not known to be failing its probe: keepalived may keep running."""
    return state.haproxy.proc is not None and state.health is not Health.DOWN


def comeback_phase(state: State, now: float, cfg: Config) -> Optional[Phase]:
    """Where the comeback episode stands, None without one."""
    cb = state.comeback
    if cb is None:
        return None
    master = state.haproxy.proc
    new = master is not None and not master.same_process(cb.master)
    if cb.plan is UnitPlan.RESTART and new and haproxy_proved(state, cfg):
        return Phase.BACK
    if cb.plan in WAIT_FOR and now < cb.since + cfg.policy.restart_grace:
        return Phase.WAITING
    return Phase.LAPSED


def haproxy_proved(state: State, cfg: Config) -> bool:
    """haproxy runs and passes its probe, if there is one (the probe's ``rise``)."""
    return state.haproxy.proc is not None and (
        cfg.haproxy.health is None or state.health is Health.UP
    )


def haproxy_ready(state: State, now: float, cfg: Config) -> bool:
    """haproxy is up long enough (and healthy, if probed) for keepalived to be started."""
    proc = state.haproxy.proc
    if proc is None or now < proc.started + cfg.policy.keepalived_start_delay:
        return False
    return haproxy_proved(state, cfg)


def summary(state: State, cfg: Config) -> str:
    """One line for systemd's STATUS= and the top of ``lbwatch status``."""
    parts = []
    for service in (HAPROXY, KEEPALIVED):
        svc = state.svc(service)
        if svc.proc is not None:
            text = f"{service.value} up ({svc.proc.pid})"
        elif svc.given_up:
            text = f"{service.value} DOWN, given up"
        else:
            text = f"{service.value} down"
        if svc.inflight is not None:
            text += f", {svc.inflight.verb.value} in progress"
        if service is HAPROXY and state.comeback and state.comeback.plan is UnitPlan.RESTART:
            text += ", systemd restarting it"
        parts.append(text)
    if cfg.haproxy.health is not None:
        parts.append(f"health {state.health.value}")
    if state.kept is not None:
        parts.append("VIP KEPT: no peer can take it")
    if state.drain is not None:
        parts.append("DRAINED")
    if state.standdown.instances:
        parts.append(f"STANDING DOWN ({', '.join(sorted(state.standdown.names()))})")
    if state.paused:
        parts.append("PAUSED")
    return "; ".join(parts)


def health_line(state: State, cfg: Config) -> str:
    """What the probe says, in words that agree with the state: "unknown" while the rise or fall
    count is still being collected, with the count so far."""
    probe = cfg.haproxy.health
    if probe is None:
        return ""
    last = state.probe_detail
    if state.health is not Health.UNKNOWN:
        return last
    if state.haproxy.proc is None:
        return "haproxy is not running"
    if state.probe_streak > 0:
        return f"{state.probe_streak} of {probe.rise} passing probes so far; last: {last}"
    if state.probe_streak < 0:
        return f"{-state.probe_streak} of {probe.fall} failing probes so far; last: {last}"
    return "not probed yet"
