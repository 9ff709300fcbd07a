"""Folding one event into the supervision state: what an observation, a probe, the pause flag,
a sync request or an action's result means for what the policy knows. No actions are decided
here (that is ``policy._reconcile``); only notes worth a log line come out.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from lbwatch import handover
from lbwatch.config import Config
from lbwatch.events import (
    ActionResult,
    Announce,
    Change,
    DrainChanged,
    Event,
    HaproxyReloaded,
    Health,
    LeftoversGone,
    Note,
    Observation,
    Outcome,
    PauseChanged,
    PeersSeen,
    ProbeResult,
    ProcessDown,
    ProcessUp,
    ProcId,
    Service,
    StandDown,
    SyncJob,
    SyncStopped,
    SyncWanted,
    Tick,
    TrackSeen,
    UnitPlan,
    Verb,
    VrrpSeen,
)
from lbwatch.supervision import Comeback, DownCause, Primed, State

# How long a start of keepalived waits for the children a killed keepalived left (they take
# about a second to shut down); then it is tried anyway.
LEFTOVER_WAIT = 5.0
# How long a TRACK that failed (the track directory read-only, full, a directory where a file
# should be) waits before the same write is tried again; a different write goes at once.
TRACK_RETRY = 30.0

HAPROXY, KEEPALIVED = Service.HAPROXY, Service.KEEPALIVED


def apply(state: State, event: Event | Primed, now: float, cfg: Config, notes: list[Note]) -> State:
    if isinstance(event, Primed):
        return replace(state, primed=True, systemd=event.systemd)
    if isinstance(event, Observation):
        for change in event.changes:
            state = _apply_change(state, change, now, cfg, notes)
        return state
    if isinstance(event, (ProcessUp, ProcessDown, HaproxyReloaded, LeftoversGone)):
        return _apply_change(state, event, now, cfg, notes)
    if isinstance(event, ProbeResult):
        return _apply_probe(state, event, now, cfg, notes)
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
    if isinstance(event, SyncStopped):
        return replace(state, sync_queue=())
    if isinstance(event, ActionResult):
        return apply_result(state, event, now, cfg, notes)
    if isinstance(event, (VrrpSeen, PeersSeen, DrainChanged, TrackSeen, StandDown, Announce)):
        return _apply_seen(state, event)
    assert isinstance(event, Tick)
    return state


def _apply_seen(
    state: State, event: VrrpSeen | PeersSeen | DrainChanged | TrackSeen | StandDown | Announce
) -> State:
    """This node's VRRP instances, its peers as the cluster watch heard them, the drain flag,
    keepalived's track files: kept as they are, for ``handover`` and the drain to weigh."""
    if isinstance(event, VrrpSeen):
        return replace(state, vrrp=event.instances)
    if isinstance(event, PeersSeen):
        return replace(state, group=event.group)
    if isinstance(event, TrackSeen):
        return replace(state, track=event.values)
    if isinstance(event, StandDown):
        return replace(state, standdown=event)
    if isinstance(event, Announce):
        return replace(state, announcing=(*state.announcing, event)[-8:])  # bounded
    return replace(state, drain=event.drain)


def _enqueue(queue: tuple[SyncJob, ...], job: SyncJob) -> tuple[SyncJob, ...]:
    """One job of each kind waits at a time, in the place of the first; a later "local" job
    brings its later edit time (the content is read when the job runs)."""
    if any(j.kind == job.kind for j in queue):
        return tuple(job if j.kind == job.kind else j for j in queue)
    return (*queue, job)


def _apply_change(
    state: State, change: Change, now: float, cfg: Config, notes: list[Note]
) -> State:
    if isinstance(change, ProcessUp):
        return _apply_up(state, change, cfg, notes)
    if isinstance(change, ProcessDown):
        return _apply_down(state, change, now, cfg, notes)
    if isinstance(change, LeftoversGone):
        svc = state.svc(change.service)
        if svc.leftovers_until is None or svc.proc is not None:
            return state
        # WAITING FOR CHILDREN -> DOWN: the start goes ahead now, and says why.
        return state.with_svc(
            change.service,
            leftovers_until=None,
            down_reason=f"{svc.down_reason}; the child processes it left have exited",
        )
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
        leftovers_until=None,
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


def _apply_down(
    state: State, event: ProcessDown, now: float, cfg: Config, notes: list[Note]
) -> State:
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
    waiting = event.service is KEEPALIVED and event.leftovers > 0
    if waiting:
        # keepalived refuses to start while a process its pidfiles name still runs (its VRRP
        # and checker children, which outlive a killed parent for about a second): "daemon is
        # already running", exit 0, nothing started. So the start waits for them, a while.
        notes.append(
            Note(
                logging.WARNING,
                f"{reason}; waiting up to {LEFTOVER_WAIT:g} s for the {event.leftovers} child "
                "process(es) it left to exit before starting keepalived again",
            )
        )
    elif not ours:
        notes.append(Note(logging.WARNING, reason))
    if event.service is HAPROXY:
        comeback = None if ours else _comeback(state, event.proc, reason, now, cfg)
        state = replace(state, comeback=comeback)
    state = state.with_svc(
        event.service,
        proc=None,
        down_reason=reason,
        down_cause=DownCause.OURS if ours else DownCause.UNEXPECTED,
        stop_failed_at=None,
        restart_pending=False,
        leftovers_until=now + LEFTOVER_WAIT if waiting else None,
    )
    if event.service is HAPROXY:
        state = replace(state, health=Health.UNKNOWN, probe_streak=0, probe_detail="")
    return state


def _comeback(state: State, master: ProcId, cause: str, now: float, cfg: Config) -> Comeback | None:
    """haproxy's master exited on its own or through someone else: where systemd can say
    whether it is restarting the unit (haproxy's commands are systemctl's, systemd runs, the
    slot is free to ask on), that is asked before keepalived is stopped. Not for a master that
    was failing its probe: keepalived is on its way down already. The grace counts from the
    first exit of an episode still open (a new master that died before it proved itself)."""
    asks = state.systemd and cfg.policy.restart_grace > 0 and cfg.haproxy.via_unit()
    if not asks or state.haproxy.inflight is not None or state.health is Health.DOWN:
        return None
    since = state.comeback.since if state.comeback is not None else now
    return Comeback(master, since, cause)


def _apply_probe(
    state: State, event: ProbeResult, now: float, cfg: Config, notes: list[Note]
) -> State:
    probe = cfg.haproxy.health
    if probe is None or state.haproxy.proc is None:
        return state
    if event.master is not None and not event.master.same_process(state.haproxy.proc):
        return state  # it probed the master before this one: a new master proves itself
    if event.internal:
        # lbwatch could not probe: that says nothing about haproxy, so it counts neither way;
        # the fault is said once, until it changes or a probe runs again.
        if event.detail != state.probe_fault:
            notes.append(Note(logging.ERROR, f"haproxy health probe could not run: {event.detail}"))
        return replace(state, probe_fault=event.detail)
    state = replace(state, probe_fault="")
    if event.ok:
        streak = max(state.probe_streak, 0) + 1
        # When the peer link proves that no node holds this node's instance, nobody serves:
        # one passing probe is enough (``handover.orphaned``), for a new master and a hang
        # that ended alike.
        rise = 1 if handover.orphaned(state.vrrp, state.group, now) else probe.rise
        if streak >= rise and state.health is not Health.UP:
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


def apply_result(
    state: State, event: ActionResult, now: float, cfg: Config, notes: list[Note]
) -> State:
    action = event.action
    svc = state.svc(action.service)
    if svc.inflight != action:
        return state
    if action.verb is Verb.ASK:
        state = state.with_svc(action.service, inflight=None, inflight_since=0.0)
        return _apply_answer(state, event, cfg, notes)
    changes: dict[str, object] = {"inflight": None, "inflight_since": 0.0}
    if event.outcome is Outcome.OK:
        if action.verb in (Verb.START, Verb.RESTART) and svc.proc is None:
            # Give the new process time to show up before another attempt is considered.
            changes["confirming_since"] = now
        if action.verb in (Verb.STOP, Verb.TERMINATE):
            changes["stop_failed_at"] = None
        if action.verb is Verb.TRACK:
            # Written: so the files read until the next look at them says otherwise (an
            # operator's edit is then written over once a scan, never in a loop).
            state = replace(
                state, track=_merged(state.track, action.track), track_failed=(), track_retry_at=0
            )
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
        if action.verb is Verb.TRACK:
            state = replace(state, track_failed=action.track, track_retry_at=now + TRACK_RETRY)
    return state.with_svc(action.service, **changes)


def _merged(
    seen: tuple[tuple[str, int | None], ...], written: tuple[tuple[str, int], ...]
) -> tuple[tuple[str, int | None], ...]:
    values = dict(seen)
    values.update(written)
    return tuple(sorted(values.items()))


def _apply_answer(state: State, event: ActionResult, cfg: Config, notes: list[Note]) -> State:
    """systemd's answer on haproxy's unit, for the master it was asked about."""
    cb, unit = state.comeback, cfg.haproxy.unit
    if cb is None or not cb.master.same_process(event.action.target):
        return state
    plan = event.plan if event.outcome is Outcome.OK else None
    if plan is None:
        notes.append(
            Note(
                logging.WARNING,
                f"could not ask systemd about {unit} ({event.detail}); acting on the exit of "
                f"haproxy master {cb.master.pid} as on a crash",
            )
        )
    elif plan is UnitPlan.RESTART:
        notes.append(
            Note(
                logging.INFO,
                f"systemd is restarting {unit}: keepalived keeps running for up to "
                f"{cfg.policy.restart_grace:g} s while the new haproxy comes up",
            )
        )
    return replace(state, comeback=replace(cb, plan=plan or UnitPlan.UNKNOWN))
