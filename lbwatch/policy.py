"""The supervision policy: pure decisions, no I/O, no clock reads.

``decide(state, event, now, cfg)`` folds one event into the frozen ``State`` and then reconciles:
it compares what is observed with what must hold and returns the actions (each with its reason),
notes worth a log line, and when it next wants to be woken (a backoff or delay expiring).

What must hold, in order of importance:

1. keepalived never runs while haproxy is down (or failing its health probe): that node would hold
   the VIP and black-hole traffic. haproxy down -> stop keepalived at once, so keepalived sends its
   priority-0 advertisement and the peer takes the VIP within VRRP's skew time.
2. haproxy runs: a dead haproxy is started again with exponential backoff, and after
   ``max_attempts`` attempts inside ``window`` lbwatch gives up loudly and retries only every
   ``giveup_retry`` seconds.
3. keepalived runs once haproxy is up (and healthy) for ``keepalived_start_delay`` seconds, with
   the same backoff and give-up rules, so that the node rejoins.

The rules are level-triggered (they look at the state, not at which event arrived), so start-up
reconciliation, a missed event and a restarted agent all converge the same way. The one
edge-triggered rule is ``on_haproxy_restart = "restart"``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field, replace
from typing import Optional

from lbwatch.config import Backoff, Config, ServiceCfg
from lbwatch.events import (
    Action,
    ActionResult,
    Event,
    HaproxyReloaded,
    Health,
    Note,
    Outcome,
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    Tick,
    Verb,
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
    # Start attempts (monotonic times) since the service was last stable; drives backoff.
    attempts: tuple[float, ...] = ()
    not_before: float = 0.0  # backoff: no start attempt before this instant
    # A start command succeeded at this instant and its process has not shown up yet; no new
    # attempt until policy.start_confirm has passed.
    confirming_since: Optional[float] = None
    given_up: bool = False
    down_reason: str = "not running when lbwatch started"
    down_cause: DownCause = DownCause.INITIAL
    restart_pending: bool = False  # keepalived: on_haproxy_restart = "restart" fired
    last_failure: str = ""
    stop_failed_at: Optional[float] = None  # keepalived: when a stop attempt failed


@dataclass(frozen=True)
class State:
    haproxy: ServiceState = ServiceState()
    keepalived: ServiceState = ServiceState()
    health: Health = Health.UNKNOWN
    probe_streak: int = 0  # > 0: successes in a row, < 0: failures in a row
    probe_detail: str = ""
    paused: bool = False
    # False until the first full scan is in: lbwatch never acts on half a picture.
    primed: bool = False
    # Actions held back by the pause, so each is noted once, not on every tick.
    held: frozenset[str] = field(default_factory=frozenset)

    def svc(self, service: Service) -> ServiceState:
        return self.haproxy if service is HAPROXY else self.keepalived

    def with_svc(self, service: Service, **changes: object) -> State:
        new = replace(self.svc(service), **changes)  # type: ignore[arg-type]
        return replace(self, haproxy=new) if service is HAPROXY else replace(self, keepalived=new)


@dataclass(frozen=True)
class Primed:
    """The first full scan has been folded in; from now on the policy acts."""


@dataclass(frozen=True)
class Decision:
    state: State
    actions: tuple[Action, ...] = ()
    notes: tuple[Note, ...] = ()
    wake_at: Optional[float] = None


def backoff_delay(attempt: int, cfg: Backoff) -> float:
    """Delay to wait after start attempt number ``attempt`` (1-based) before the next one."""
    return float(min(cfg.max, cfg.initial * cfg.factor ** (attempt - 1)))


def decide(state: State, event: Event | Primed, now: float, cfg: Config) -> Decision:
    """Fold ``event`` into ``state`` and reconcile."""
    state, notes = _apply(state, event, now, cfg)
    if not state.primed:
        return Decision(state, (), tuple(notes))
    new_state, actions = _reconcile(state, now, cfg)
    if state.paused:
        # Keep observing and say what would have happened; change nothing, count nothing.
        would = {f"{a.describe()}: {a.reason}" for a in actions}
        notes += [Note(logging.WARNING, f"paused: would {w}") for w in sorted(would - state.held)]
        state = replace(state, held=frozenset(would))
        return Decision(state, (), tuple(notes), _wake_at(state, now, cfg))
    for service in (HAPROXY, KEEPALIVED):
        old, new = state.svc(service), new_state.svc(service)
        if new.given_up and not old.given_up:
            notes.append(
                Note(
                    logging.ERROR,
                    f"giving up on {service.value}: {len(new.attempts)} start attempts within "
                    f"{svc_cfg(cfg, service).backoff.window:.0f} s did not keep it running"
                    f" (last: {new.last_failure or new.down_reason}); next attempt in "
                    f"{svc_cfg(cfg, service).backoff.giveup_retry:.0f} s",
                    alert="giveup",
                )
            )
    return Decision(new_state, tuple(actions), tuple(notes), _wake_at(new_state, now, cfg))


def svc_cfg(cfg: Config, service: Service) -> ServiceCfg:
    return cfg.haproxy if service is HAPROXY else cfg.keepalived


# ---------------------------------------------------------------------------------------------
# Folding events into the state


def _apply(
    state: State, event: Event | Primed, now: float, cfg: Config
) -> tuple[State, list[Note]]:
    notes: list[Note] = []
    if isinstance(event, Primed):
        state = replace(state, primed=True)
    elif isinstance(event, ProcessUp):
        state = _apply_up(state, event, cfg, notes)
    elif isinstance(event, ProcessDown):
        state = _apply_down(state, event, notes)
    elif isinstance(event, HaproxyReloaded):
        old = ",".join(map(str, sorted(event.old_workers))) or "-"
        new = ",".join(map(str, sorted(event.new_workers))) or "-"
        notes.append(
            Note(
                logging.INFO,
                f"haproxy reloaded (master {event.master.pid} kept, workers {old} -> {new});"
                " keepalived untouched",
            )
        )
    elif isinstance(event, ProbeResult):
        state = _apply_probe(state, event, cfg, notes)
    elif isinstance(event, PauseChanged):
        if event.paused != state.paused:
            notes.append(
                Note(
                    logging.WARNING,
                    "maintenance pause on: observing only, taking no action"
                    if event.paused
                    else "maintenance pause off: acting again",
                )
            )
        state = replace(state, paused=event.paused, held=frozenset())
    elif isinstance(event, ActionResult):
        state = _apply_result(state, event, now, cfg, notes)
    else:
        assert isinstance(event, Tick)
    return state, notes


def _apply_up(state: State, event: ProcessUp, cfg: Config, notes: list[Note]) -> State:
    svc = state.svc(event.service)
    if event.proc.same_process(svc.proc):
        return state
    if state.primed:
        was = f" (was {event.previous.pid})" if event.previous is not None else ""
        notes.append(Note(logging.INFO, f"{event.service.value} is running: {event.proc}{was}"))
    # Up again: no longer "given up", but the attempts stay until it proves stable, so a
    # relapse gives up again at once instead of starting the burst anew.
    state = state.with_svc(event.service, proc=event.proc, confirming_since=None, given_up=False)
    if event.service is HAPROXY:
        # A new master proves its health afresh.
        state = replace(state, health=Health.UNKNOWN, probe_streak=0)
        ka = state.keepalived
        if (
            cfg.policy.on_haproxy_restart == "restart"
            and event.previous is not None
            and state.primed
            and ka.proc is not None
        ):
            # Edge-triggered by design: the classic script restarted keepalived whenever haproxy
            # restarted. Marked here, carried out by _reconcile so it respects in-flight work.
            state = state.with_svc(KEEPALIVED, restart_pending=True)
    return state


def _apply_down(state: State, event: ProcessDown, notes: list[Note]) -> State:
    svc = state.svc(event.service)
    if not event.proc.same_process(svc.proc):
        return state
    ours = svc.inflight is not None and svc.inflight.verb in (
        Verb.STOP,
        Verb.TERMINATE,
        Verb.RESTART,
    )
    what = "master " if event.service is HAPROXY else ""
    if ours:
        reason = f"{event.service.value} {what}{event.proc.pid} stopped by lbwatch"
        notes.append(Note(logging.INFO, reason))
    else:
        reason = f"{event.service.value} {what}{event.proc.pid} exited ({event.how})"
        notes.append(Note(logging.WARNING, reason))
    state = state.with_svc(
        event.service,
        proc=None,
        down_reason=reason,
        down_cause=DownCause.OURS if ours else DownCause.UNEXPECTED,
        stop_failed_at=None,
        restart_pending=False,
    )
    if event.service is HAPROXY:
        state = replace(state, health=Health.UNKNOWN, probe_streak=0)
    return state


def _apply_probe(state: State, event: ProbeResult, cfg: Config, notes: list[Note]) -> State:
    probe = cfg.haproxy.health
    if probe is None or state.haproxy.proc is None:
        return state
    if event.ok:
        streak = max(state.probe_streak, 0) + 1
        if streak >= probe.rise and state.health is not Health.UP:
            notes.append(Note(logging.INFO, f"haproxy health check passing ({event.detail})"))
            return replace(state, health=Health.UP, probe_streak=streak, probe_detail=event.detail)
    else:
        streak = min(state.probe_streak, 0) - 1
        if -streak >= probe.fall and state.health is not Health.DOWN:
            notes.append(Note(logging.WARNING, f"haproxy health check failing ({event.detail})"))
            return replace(
                state, health=Health.DOWN, probe_streak=streak, probe_detail=event.detail
            )
    return replace(state, probe_streak=streak, probe_detail=event.detail)


def _apply_result(
    state: State, event: ActionResult, now: float, cfg: Config, notes: list[Note]
) -> State:
    action = event.action
    svc = state.svc(action.service)
    if svc.inflight != action:
        return state
    changes: dict[str, object] = {"inflight": None}
    if event.outcome is Outcome.OK:
        if action.verb in (Verb.START, Verb.RESTART) and svc.proc is None:
            # Give the new process time to show up before another attempt is considered.
            changes["confirming_since"] = now
        if action.verb in (Verb.STOP, Verb.TERMINATE):
            changes["stop_failed_at"] = None
    else:
        notes.append(
            Note(
                logging.ERROR,
                f"{action.describe()} {event.outcome.value}: {event.detail}",
                alert="action_failed",
            )
        )
        changes["last_failure"] = event.detail
        if action.verb in (Verb.STOP, Verb.TERMINATE):
            changes["stop_failed_at"] = now
    return state.with_svc(action.service, **changes)


# ---------------------------------------------------------------------------------------------
# Reconciling: what must hold, given the state


def haproxy_serving(state: State) -> bool:
    """haproxy runs and is not known to be failing its probe: keepalived may keep running."""
    return state.haproxy.proc is not None and state.health is not Health.DOWN


def haproxy_ready(state: State, now: float, cfg: Config) -> bool:
    """haproxy is up long enough (and healthy, if probed) for keepalived to be started."""
    proc = state.haproxy.proc
    if proc is None or now < proc.started + cfg.policy.keepalived_start_delay:
        return False
    return cfg.haproxy.health is None or state.health is Health.UP


def _reconcile(state: State, now: float, cfg: Config) -> tuple[State, list[Action]]:
    actions: list[Action] = []
    for service in (HAPROXY, KEEPALIVED):
        state = _reset_if_stable(state, service, now, cfg)
    # keepalived first: stopping it is what moves the VIP, so its action is dispatched first.
    state = _reconcile_keepalived(state, now, cfg, actions)
    state = _reconcile_haproxy(state, now, cfg, actions)
    return state, actions


def _reset_if_stable(state: State, service: Service, now: float, cfg: Config) -> State:
    svc = state.svc(service)
    stable_after = svc_cfg(cfg, service).backoff.stable_after
    if svc.proc is not None and svc.attempts and now >= svc.proc.started + stable_after:
        return state.with_svc(service, attempts=(), not_before=0.0, given_up=False)
    return state


def _start(
    state: State, service: Service, reason: str, now: float, cfg: Config
) -> tuple[State, Action | None]:
    """A start of ``service`` if backoff allows, with the attempt recorded in the state."""
    svc = state.svc(service)
    if svc.inflight is not None:
        return state, None
    if svc.confirming_since is not None and now < svc.confirming_since + cfg.policy.start_confirm:
        return state, None
    backoff = svc_cfg(cfg, service).backoff
    recent = tuple(t for t in svc.attempts if t > now - backoff.window)
    if len(recent) >= backoff.max_attempts and not svc.given_up:
        # DOWN -> GIVEN UP: N attempts in the window failed to keep it running. Said as soon as
        # the last one is known to have failed; the next attempt comes giveup_retry later.
        return state.with_svc(
            service,
            given_up=True,
            not_before=max(svc.not_before, now + backoff.giveup_retry),
            attempts=recent,
        ), None
    if now < svc.not_before:
        return state, None
    attempts = (*recent, now)
    if svc.given_up:
        delay = backoff.giveup_retry
        detail = f"attempt after giving up, next in {delay:.0f} s"
    else:
        delay = backoff_delay(len(attempts), backoff)
        detail = f"attempt {len(attempts)}"
    action = Action(service, Verb.START, f"{reason}; starting {service.value} ({detail})")
    return state.with_svc(service, attempts=attempts, not_before=now + delay), action


def _reconcile_haproxy(state: State, now: float, cfg: Config, actions: list[Action]) -> State:
    ha = state.haproxy
    if ha.proc is None:
        state, action = _start(state, HAPROXY, f"haproxy is down ({ha.down_reason})", now, cfg)
        if action is not None:
            return _issue(state, action, actions)
    return state


def _reconcile_keepalived(state: State, now: float, cfg: Config, actions: list[Action]) -> State:
    ka = state.keepalived
    action: Action | None = None
    if ka.inflight is not None:
        return state
    if ka.proc is not None and not haproxy_serving(state):
        action = _keepalived_stop(state, now, cfg)
    elif ka.proc is not None and ka.restart_pending:
        action = Action(
            KEEPALIVED,
            Verb.RESTART,
            "haproxy was restarted and policy.on_haproxy_restart is 'restart';"
            " restarting keepalived",
        )
        state = state.with_svc(KEEPALIVED, restart_pending=False)
    elif ka.proc is None and state.haproxy.proc is not None and haproxy_ready(state, now, cfg):
        master = state.haproxy.proc.pid
        if ka.down_cause is DownCause.INITIAL:
            why = f"haproxy master {master} is up and keepalived is not running"
        elif ka.down_cause is DownCause.OURS:
            why = f"haproxy master {master} is up again"
        else:
            why = ka.down_reason
        state, action = _start(state, KEEPALIVED, why, now, cfg)
        if action is not None and ka.down_cause is DownCause.UNEXPECTED:
            action = replace(action, alert="keepalived_restarted")
    return state if action is None else _issue(state, action, actions)


def _issue(state: State, action: Action, actions: list[Action]) -> State:
    actions.append(action)
    return state.with_svc(action.service, inflight=action)


def _keepalived_stop(state: State, now: float, cfg: Config) -> Action | None:
    """haproxy is not serving: stop keepalived, or SIGTERM it if the stop command failed."""
    ka = state.keepalived
    if state.haproxy.proc is None:
        why, alert = state.haproxy.down_reason, "haproxy_down"
    else:
        why, alert = f"haproxy health check failing ({state.probe_detail})", "haproxy_unhealthy"
    if ka.stop_failed_at is None:
        return Action(
            KEEPALIVED, Verb.STOP, f"{why}; stopping keepalived so the VIP moves", alert=alert
        )
    if now >= ka.stop_failed_at + cfg.policy.stop_retry:
        return Action(
            KEEPALIVED,
            Verb.TERMINATE,
            f"{why}; the stop command failed ({ka.last_failure}), sending SIGTERM to {ka.proc}",
            target=ka.proc,
            alert="stop_failed",
        )
    return None


def _wake_at(state: State, now: float, cfg: Config) -> float | None:
    """The earliest future instant at which reconciling could give a different answer."""
    times: list[float] = []
    for service in (HAPROXY, KEEPALIVED):
        svc = state.svc(service)
        if svc.proc is None and svc.inflight is None:
            times.append(svc.not_before)
            if svc.confirming_since is not None:
                times.append(svc.confirming_since + cfg.policy.start_confirm)
        if svc.proc is not None and svc.attempts:
            times.append(svc.proc.started + svc_cfg(cfg, service).backoff.stable_after)
    ka, ha = state.keepalived, state.haproxy.proc
    if ka.stop_failed_at is not None:
        times.append(ka.stop_failed_at + cfg.policy.stop_retry)
    if ka.proc is None and ha is not None:
        times.append(ha.started + cfg.policy.keepalived_start_delay)
    future = [t for t in times if t > now]
    return min(future) if future else None


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
        parts.append(text)
    if cfg.haproxy.health is not None:
        parts.append(f"health {state.health.value}")
    if state.paused:
        parts.append("PAUSED")
    return "; ".join(parts)
