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

4. Config sync's installs and reloads run on haproxy's slot, one at a time, never beside a
   start of haproxy, and not at all while paused (they wait, and run on resume).

The rules are level-triggered (they look at the state, not at which event arrived), so start-up
reconciliation, a missed event and a restarted agent all converge the same way. The one
edge-triggered rule is ``on_haproxy_restart = "restart"``.

No action stays in flight for ever: one without a result by its deadline counts as failed.
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
    Change,
    Event,
    HaproxyReloaded,
    Health,
    Note,
    Observation,
    Outcome,
    PauseChanged,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    SyncJob,
    SyncWanted,
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
    # Config sync work waiting for haproxy's slot, at most one job of each kind, in order.
    sync_queue: tuple[SyncJob, ...] = ()

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
    # Actions that got no result by their deadline, failed here on the executor's behalf.
    expired: tuple[ActionResult, ...] = ()


def backoff_delay(attempt: int, cfg: Backoff) -> float:
    """Delay to wait after start attempt number ``attempt`` (1-based) before the next one."""
    return float(min(cfg.max, cfg.initial * cfg.factor ** (attempt - 1)))


def decide(state: State, event: Event | Primed, now: float, cfg: Config) -> Decision:
    """Fold ``event`` into ``state`` and reconcile."""
    notes: list[Note] = []
    state, expired = _expire(state, now, cfg, notes)
    state = _apply(state, event, now, cfg, notes)
    if not state.primed:
        return Decision(state, (), tuple(notes), _wake_at(state, now, cfg), expired)
    new_state, actions = _reconcile(state, now, cfg, notes)
    if state.paused:
        # Keep observing and say what would have happened; change nothing, count nothing.
        would = {f"{a.describe()}: {a.reason}" for a in actions}
        notes += [Note(logging.WARNING, f"paused: would {w}") for w in sorted(would - state.held)]
        state = replace(state, held=frozenset(would))
        return Decision(state, (), tuple(notes), _wake_at(state, now, cfg), expired)
    for service in (HAPROXY, KEEPALIVED):
        svc = new_state.svc(service)
        if svc.given_up and not svc.giveup_announced:
            b = svc_cfg(cfg, service).backoff
            notes.append(
                Note(
                    logging.ERROR,
                    f"giving up on {service.value}: {len(svc.attempts)} start attempts within "
                    f"{b.window:.0f} s did not keep it running"
                    f" (last: {svc.last_failure or svc.down_reason}); next attempt in "
                    f"{b.giveup_retry:.0f} s",
                    alert="giveup",
                )
            )
            new_state = new_state.with_svc(service, giveup_announced=True)
    # One line per cause: an observation that an action's reason already states is not noted
    # again on its own.
    causes = {a.cause for a in actions}
    notes = [n for n in notes if n.text not in causes or n.alert]
    return Decision(new_state, tuple(actions), tuple(notes), _wake_at(new_state, now, cfg), expired)


def _deadline(verb: Verb, service: Service, cfg: Config) -> float:
    """How long an action may take before it counts as failed: its command's own timeout (the
    command is killed then) plus room for the executor to report."""
    if verb is Verb.SYNC:
        # check, reload and its confirmation, and a roll-back reload with its confirmation
        return 3 * cfg.sync.timeout + 2 * cfg.sync.reload_confirm + 10.0
    return svc_cfg(cfg, service).command_timeout + 10.0


def _expire(
    state: State, now: float, cfg: Config, notes: list[Note]
) -> tuple[State, tuple[ActionResult, ...]]:
    """Fail the actions whose executor has not answered by their deadline (a hung thread, a
    lost result): the slot is freed and the policy moves on; a late answer is ignored."""
    expired = []
    for service in (HAPROXY, KEEPALIVED):
        action = state.svc(service).inflight
        if action is None or now < state.svc(service).inflight_since + action.deadline:
            continue
        res = ActionResult(
            action, Outcome.TIMEOUT, f"no result within {action.deadline:g} s", action.deadline
        )
        expired.append(res)
        state = _apply_result(state, res, now, cfg, notes)
    return state, tuple(expired)


def svc_cfg(cfg: Config, service: Service) -> ServiceCfg:
    return cfg.haproxy if service is HAPROXY else cfg.keepalived


# ---------------------------------------------------------------------------------------------
# Folding events into the state


def _apply(
    state: State, event: Event | Primed, now: float, cfg: Config, notes: list[Note]
) -> State:
    if isinstance(event, Primed):
        return replace(state, primed=True)
    if isinstance(event, Observation):
        for change in event.changes:
            state = _apply_change(state, change, cfg, notes)
        return state
    if isinstance(event, (ProcessUp, ProcessDown, HaproxyReloaded)):
        return _apply_change(state, event, cfg, notes)
    if isinstance(event, ProbeResult):
        return _apply_probe(state, event, cfg, notes)
    if isinstance(event, PauseChanged):
        if event.paused != state.paused:
            notes.append(
                Note(
                    logging.WARNING,
                    "maintenance pause on: observing only, taking no action"
                    if event.paused
                    else "maintenance pause off: acting again",
                )
            )
        return replace(state, paused=event.paused, held=frozenset())
    if isinstance(event, SyncWanted):
        return replace(state, sync_queue=_enqueue(state.sync_queue, event.job))
    if isinstance(event, ActionResult):
        return _apply_result(state, event, now, cfg, notes)
    assert isinstance(event, Tick)
    return state


def _enqueue(queue: tuple[SyncJob, ...], job: SyncJob) -> tuple[SyncJob, ...]:
    """One job of each kind waits at a time, in the place of the first; a later "local" job
    brings its later edit time (the content is read when the job runs)."""
    if any(j.kind == job.kind for j in queue):
        return tuple(job if j.kind == job.kind else j for j in queue)
    return (*queue, job)


def _apply_change(state: State, change: Change, cfg: Config, notes: list[Note]) -> State:
    if isinstance(change, ProcessUp):
        return _apply_up(state, change, cfg, notes)
    if isinstance(change, ProcessDown):
        return _apply_down(state, change, notes)
    old = ",".join(map(str, sorted(change.old_workers))) or "-"
    new = ",".join(map(str, sorted(change.new_workers))) or "-"
    notes.append(
        Note(
            logging.INFO,
            f"haproxy reloaded (master {change.master.pid} kept, workers {old} -> {new});"
            " keepalived untouched",
        )
    )
    return state


def _apply_up(state: State, event: ProcessUp, cfg: Config, notes: list[Note]) -> State:
    svc = state.svc(event.service)
    if event.proc.same_process(svc.proc):
        return state
    if state.primed:
        was = f" (was {event.previous.pid})" if event.previous is not None else ""
        notes.append(Note(logging.INFO, f"{event.service.value} is running: {event.proc}{was}"))
    # Up again: no longer "given up", but the attempts stay until it proves stable, so a
    # relapse gives up again at once instead of starting the burst anew.
    state = state.with_svc(
        event.service,
        proc=event.proc,
        confirming_since=None,
        given_up=False,
        silent_start_warned=False,
    )
    if event.service is HAPROXY:
        # A new master proves its health afresh.
        state = replace(state, health=Health.UNKNOWN, probe_streak=0, probe_detail="")
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
        state = replace(state, health=Health.UNKNOWN, probe_streak=0, probe_detail="")
    return state


def _apply_probe(state: State, event: ProbeResult, cfg: Config, notes: list[Note]) -> State:
    probe = cfg.haproxy.health
    if probe is None or state.haproxy.proc is None:
        return state
    if event.internal:
        # lbwatch could not probe: that says nothing about haproxy, so it counts neither way.
        notes.append(Note(logging.ERROR, f"haproxy health probe could not run: {event.detail}"))
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
    changes: dict[str, object] = {"inflight": None, "inflight_since": 0.0}
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
        if action.verb is not Verb.SYNC:
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


def _reconcile(
    state: State, now: float, cfg: Config, notes: list[Note]
) -> tuple[State, list[Action]]:
    actions: list[Action] = []
    for service in (HAPROXY, KEEPALIVED):
        state = _reset_if_stable(state, service, now, cfg)
    # keepalived first: stopping it is what moves the VIP, so its action is dispatched first.
    state = _reconcile_keepalived(state, now, cfg, actions, notes)
    state = _reconcile_haproxy(state, now, cfg, actions, notes)
    return state, actions


def _reset_if_stable(state: State, service: Service, now: float, cfg: Config) -> State:
    svc = state.svc(service)
    stable_after = svc_cfg(cfg, service).backoff.stable_after
    if svc.proc is not None and svc.attempts and now >= svc.proc.started + stable_after:
        # GIVEN UP / BACKOFF -> STABLE: the episode is over, a later give-up is news again.
        return state.with_svc(
            service, attempts=(), not_before=0.0, given_up=False, giveup_announced=False
        )
    return state


def _confirming(svc: ServiceState, now: float, cfg: Config) -> bool:
    """A start command succeeded a moment ago and its process may still show up."""
    return (
        svc.confirming_since is not None and now < svc.confirming_since + cfg.policy.start_confirm
    )


def _start(
    state: State, service: Service, cause: str, now: float, cfg: Config, notes: list[Note]
) -> tuple[State, Action | None]:
    """A start of ``service`` if backoff allows, with the attempt recorded in the state."""
    svc = state.svc(service)
    if svc.inflight is not None or _confirming(svc, now, cfg):
        return state, None
    if svc.confirming_since is not None and not svc.silent_start_warned:
        # STARTED -> DOWN without a process: the command said success, nothing came.
        notes.append(
            Note(
                logging.WARNING,
                f"start {service.value} exited 0 but no {service.value} process appeared within "
                f"{cfg.policy.start_confirm:g} s; check its start command and pidfile",
            )
        )
        state = state.with_svc(service, silent_start_warned=True)
        svc = state.svc(service)
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
    action = _action(service, Verb.START, cause, f"starting {service.value} ({detail})", cfg)
    state = state.with_svc(
        service, attempts=attempts, not_before=now + delay, confirming_since=None
    )
    return state, action


def _action(
    service: Service, verb: Verb, cause: str, doing: str, cfg: Config, **more: object
) -> Action:
    return Action(
        service,
        verb,
        cause,
        doing,
        deadline=_deadline(verb, service, cfg),
        **more,  # type: ignore[arg-type]
    )


def _reconcile_haproxy(
    state: State, now: float, cfg: Config, actions: list[Action], notes: list[Note]
) -> State:
    ha = state.haproxy
    if ha.inflight is not None:
        return state
    if ha.proc is None:
        # The reason an exit left names the service; the first start says what it is about.
        initial = ha.down_cause is DownCause.INITIAL
        cause = f"haproxy is down ({ha.down_reason})" if initial else ha.down_reason
        state, action = _start(state, HAPROXY, cause, now, cfg, notes)
        if action is not None:
            return _issue(state, action, now, actions)
        if _confirming(state.haproxy, now, cfg):
            return state  # a sync reload waits until the new haproxy has shown up
    if state.sync_queue:
        # Config sync's install and reload: on haproxy's slot, so never beside a start.
        job = state.sync_queue[0]
        cause, doing = job.sentence()
        action = _action(HAPROXY, Verb.SYNC, cause, doing, cfg, job=job)
        return _issue(replace(state, sync_queue=state.sync_queue[1:]), action, now, actions)
    return state


def _reconcile_keepalived(
    state: State, now: float, cfg: Config, actions: list[Action], notes: list[Note]
) -> State:
    ka = state.keepalived
    action: Action | None = None
    if ka.inflight is not None:
        return state
    if ka.proc is not None and not haproxy_serving(state):
        action = _keepalived_stop(state, now, cfg)
        if action is not None:
            state = state.with_svc(KEEPALIVED, stopped_while=state.haproxy.proc)
    elif ka.proc is not None and ka.restart_pending:
        action = _action(
            KEEPALIVED,
            Verb.RESTART,
            "haproxy was restarted and policy.on_haproxy_restart is 'restart'",
            "restarting keepalived",
            cfg,
        )
        state = state.with_svc(KEEPALIVED, restart_pending=False)
    elif ka.proc is None and state.haproxy.proc is not None and haproxy_ready(state, now, cfg):
        state, action = _start(state, KEEPALIVED, _why_start_keepalived(state), now, cfg, notes)
        if action is not None and ka.down_cause is DownCause.UNEXPECTED:
            action = replace(action, alert="keepalived_restarted")
    return state if action is None else _issue(state, action, now, actions)


def _why_start_keepalived(state: State) -> str:
    ka, master = state.keepalived, state.haproxy.proc
    assert master is not None
    if ka.down_cause is DownCause.INITIAL:
        return f"haproxy master {master.pid} is up and keepalived is not running"
    if ka.down_cause is DownCause.UNEXPECTED:
        return ka.down_reason
    if master.same_process(ka.stopped_while):
        # Stopped because the probe failed; the same master passes again (a hang that ended).
        return f"haproxy master {master.pid} is healthy again"
    return f"haproxy master {master.pid} is up again"


def _issue(state: State, action: Action, now: float, actions: list[Action]) -> State:
    actions.append(action)
    return state.with_svc(action.service, inflight=action, inflight_since=now)


def _keepalived_stop(state: State, now: float, cfg: Config) -> Action | None:
    """haproxy is not serving: stop keepalived, or SIGTERM it if the stop command failed."""
    ka = state.keepalived
    if state.haproxy.proc is None:
        why, alert = state.haproxy.down_reason, "haproxy_down"
    else:
        why, alert = f"haproxy health check failing ({state.probe_detail})", "haproxy_unhealthy"
    if ka.stop_failed_at is None:
        return _action(
            KEEPALIVED, Verb.STOP, why, "stopping keepalived so the VIP moves", cfg, alert=alert
        )
    if now >= ka.stop_failed_at + cfg.policy.stop_retry:
        return _action(
            KEEPALIVED,
            Verb.TERMINATE,
            why,
            f"the stop command failed ({ka.last_failure}), sending SIGTERM to {ka.proc}",
            cfg,
            target=ka.proc,
            alert="stop_failed",
        )
    return None


def _wake_at(state: State, now: float, cfg: Config) -> float | None:
    """The earliest future instant at which reconciling could give a different answer."""
    times: list[float] = []
    for service in (HAPROXY, KEEPALIVED):
        svc = state.svc(service)
        if svc.inflight is not None:
            times.append(svc.inflight_since + svc.inflight.deadline)
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
