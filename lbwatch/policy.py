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

The one wait in rule 1: when haproxy's master exits and haproxy is managed through its systemd
unit, systemd is asked first (``unitjob``); while it restarts the unit on request (`systemctl
restart haproxy`) keepalived keeps running and lbwatch does not start haproxy itself, for at
most ``restart_grace`` from the exit, until the new master runs and passes its probe. Any other
answer, or none, and the exit is acted on as before (``supervision.Comeback``).

The rules are level-triggered (they look at the state, not at which event arrived), so start-up
reconciliation, a missed event and a restarted agent all converge the same way. Two start on an
edge: ``on_haproxy_restart = "restart"``, and the wait above (an exit is an edge), which only
ever delays a stop by the grace and ends in the level-triggered rules.

No action stays in flight for ever: one without a result by its deadline counts as failed.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from lbwatch import backoff as backoff_lib
from lbwatch import fold, handover, keeping, levers, unitjob
from lbwatch.config import Config
from lbwatch.events import (
    Action,
    ActionResult,
    Event,
    Note,
    Outcome,
    Service,
    Verb,
)
from lbwatch.supervision import (
    Decision,
    DownCause,
    Phase,
    Primed,
    ServiceState,
    State,
    comeback_phase,
    haproxy_ready,
    haproxy_serving,
    health_line,
    summary,
    svc_cfg,
)

HAPROXY, KEEPALIVED = Service.HAPROXY, Service.KEEPALIVED

# The state and its views live in ``supervision``; callers take them from here as well.
__all__ = [
    "Decision",
    "DownCause",
    "Primed",
    "ServiceState",
    "State",
    "decide",
    "haproxy_ready",
    "haproxy_serving",
    "health_line",
    "summary",
]


def decide(state: State, event: Event | Primed, now: float, cfg: Config) -> Decision:
    """Fold ``event`` into ``state`` and reconcile."""
    notes: list[Note] = []
    state, expired = _expire(state, now, cfg, notes)
    state = fold.apply(state, event, now, cfg, notes)
    if not state.primed:
        return Decision(state, (), tuple(notes), _wake_at(state, now, cfg), expired)
    new_state, actions = _reconcile(state, now, cfg, notes)
    if state.paused:
        # Keep observing and say what would have happened; change nothing, count nothing. What
        # reconciling observed and said (a start that started nothing) is kept as said.
        for service in (HAPROXY, KEEPALIVED):
            warned = new_state.svc(service).silent_start_warned
            state = state.with_svc(service, silent_start_warned=warned)
        state = replace(state, kept=new_state.kept)  # said once, as above
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
    kept = new_state.kept
    if kept is not None and kept.since == now:
        causes.add(kept.cause)  # the keep's sentence starts with it
    notes = [n for n in notes if n.text not in causes or n.alert]
    return Decision(new_state, tuple(actions), tuple(notes), _wake_at(new_state, now, cfg), expired)


def _deadline(verb: Verb, service: Service, cfg: Config) -> float:
    """How long an action may take before it counts as failed: its command's own timeout (the
    command is killed then) plus room for the executor to report."""
    if verb is Verb.SYNC:
        # check, reload and its confirmation, and a roll-back reload with its confirmation;
        # each reload may ask twice (services.reload_haproxy)
        return 5 * cfg.sync.timeout + 2 * cfg.sync.reload_confirm + 10.0
    if verb is Verb.ASK:
        return unitjob.ASK_TIMEOUT + 1.0  # keepalived waits on it: little room
    if verb in (Verb.TRACK, Verb.ANNOUNCE):
        return 5.0  # a few small files written, a few packets sent
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
        state = fold.apply_result(state, res, now, cfg, notes)
    return state, tuple(expired)


# ---------------------------------------------------------------------------------------------
# Reconciling: what must hold, given the state


def _reconcile(
    state: State, now: float, cfg: Config, notes: list[Note]
) -> tuple[State, list[Action]]:
    actions: list[Action] = []
    for service in (HAPROXY, KEEPALIVED):
        state = _reset_if_stable(state, service, now, cfg)
    state = _settle_comeback(state, now, cfg, notes)
    # keepalived first: stopping it is what moves the VIP, so its action is dispatched first.
    state = _reconcile_keepalived(state, now, cfg, actions, notes)
    state = _reconcile_haproxy(state, now, cfg, actions, notes)
    state = _reconcile_track(state, now, cfg, actions)
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


def _settle_comeback(state: State, now: float, cfg: Config, notes: list[Note]) -> State:
    """End a comeback episode that is over: the new master is back, or it was there already
    when the exit was seen (one scan saw both; nothing was asked, nothing is held: as for any
    new master lbwatch did not start, ``on_haproxy_restart`` applies)."""
    cb, ha = state.comeback, state.haproxy
    if cb is None:
        return state
    if cb.plan is None and ha.inflight is None and ha.proc is not None:
        return replace(state, comeback=None)
    if comeback_phase(state, now, cfg) is Phase.BACK:
        assert ha.proc is not None
        kept = "; keepalived kept running" if state.keepalived.proc is not None else ""
        notes.append(
            Note(
                logging.INFO,
                f"haproxy is back: master {ha.proc.pid} {now - cb.since:.2f} s after master "
                f"{cb.master.pid} exited{kept}",
            )
        )
        return replace(state, comeback=None)
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
    if svc.leftovers_until is not None and now < svc.leftovers_until:
        return state, None  # the children the last one left are still shutting down
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
        delay = backoff_lib.delay(len(attempts), backoff.initial, backoff.max, backoff.factor)
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
    ha, cb = state.haproxy, state.comeback
    if ha.inflight is not None:
        return state
    if cb is not None and comeback_phase(state, now, cfg) is Phase.WAITING:
        if cb.plan is not None:
            return state  # systemd is bringing haproxy back; no start, no reload beside it
        doing = f"asking systemd whether it is restarting {cfg.haproxy.unit}"
        ask = _action(HAPROXY, Verb.ASK, cb.cause, doing, cfg, target=cb.master)
        return _issue(state, ask, now, actions)
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
    phase = comeback_phase(state, now, cfg)
    cannot_serve = phase is Phase.LAPSED or (phase is None and not haproxy_serving(state))
    if ka.inflight is not None and not (cannot_serve and ka.inflight.verb is Verb.TRACK):
        # A TRACK (a few small files written, on a worker of its own) never holds back the stop
        # that haproxy's death calls for: the stop takes the slot, the write's result is then
        # ignored, and the next scan reads what the files say.
        return state
    if phase is Phase.LAPSED and ka.proc is None:
        state = replace(state, comeback=None)  # nothing held: the exit needs no more
    if ka.proc is not None and cannot_serve:
        verdict = handover.release(state.vrrp, state.group, now)
        if not verdict.release:
            return keeping.keep(state, verdict.why, now, cfg, notes)
        state = keeping.unkeep(state, now, notes, verdict.why)
        action = _keepalived_stop(state, now, cfg)
        if action is not None:
            state = state.with_svc(KEEPALIVED, stopped_while=state.haproxy.proc)
            state = replace(state, comeback=None)
        return state if action is None else _issue(state, action, now, actions)
    if ka.proc is None or haproxy_serving(state):
        state = keeping.unkeep(state, now, notes)
    if ka.proc is not None and ka.restart_pending and phase is None:
        action = _action(
            KEEPALIVED,
            Verb.RESTART,
            "haproxy was restarted and policy.on_haproxy_restart is 'restart'",
            "restarting keepalived",
            cfg,
        )
        state = state.with_svc(KEEPALIVED, restart_pending=False)
    elif ka.proc is None and state.haproxy.proc is not None:
        orphans = keeping.orphans(state, now, cfg)
        if orphans or haproxy_ready(state, now, cfg):
            why = _why_start_keepalived(state)
            if orphans:
                why += (
                    f"; no node holds {', '.join(orphans)}, so one passing probe is enough and "
                    "keepalived_start_delay does not apply"
                )
            state, action = _start(state, KEEPALIVED, why, now, cfg, notes)
            if action is not None and ka.down_cause is DownCause.UNEXPECTED:
                action = replace(action, alert="keepalived_restarted")
    return state if action is None else _issue(state, action, now, actions)


def _reconcile_track(state: State, now: float, cfg: Config, actions: list[Action]) -> State:
    """keepalived's track files brought to what is asked of each instance (``levers``), one
    TRACK at a time on keepalived's slot; then the VIPs to announce after a split brain."""
    if state.keepalived.inflight is not None:
        return state
    write = levers.next_write(state.vrrp, state.track, state.standdown, state.drain)
    if write is not None:
        if write.track == state.track_failed and now < state.track_retry_at:
            return state  # the same write failed a moment ago (fold.TRACK_RETRY)
        action = _action(KEEPALIVED, Verb.TRACK, write.cause, write.doing, cfg,
                         track=write.track, alert=write.alert)  # fmt: skip
        return _issue(state, action, now, actions)
    if not state.announcing:
        return state
    first = state.announcing[0]
    cause = f"the split brain on {first.instance} ended with this node holding it alone"
    doing = (
        f"sending gratuitous ARP for {', '.join(first.vips)}, so that clients that learnt the "
        "other node's MAC come back"
    )
    action = _action(KEEPALIVED, Verb.ANNOUNCE, cause, doing, cfg, announce=first.vips)
    return _issue(replace(state, announcing=state.announcing[1:]), action, now, actions)


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
    action = replace(action, seq=state.issued + 1)
    actions.append(action)
    state = replace(state, issued=action.seq)
    return state.with_svc(action.service, inflight=action, inflight_since=now)


def _keepalived_stop(state: State, now: float, cfg: Config) -> Action | None:
    """haproxy is not serving: stop keepalived, or SIGTERM it if the stop command failed."""
    ka = state.keepalived
    why, alert = keeping.why_down(state, cfg)
    if ka.stop_failed_at is None:
        # The target is signalled at once, before the stop command runs (``Action.target``).
        doing = "stopping keepalived so the VIP moves"
        return _action(KEEPALIVED, Verb.STOP, why, doing, cfg, alert=alert, target=ka.proc)
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


def _svc_wakes(state: State, service: Service, cfg: Config) -> list[float]:
    """When one service's in-flight action, backoff, start confirmation or stability ends."""
    svc, times = state.svc(service), []
    if svc.inflight is not None:
        times.append(svc.inflight_since + svc.inflight.deadline)
    if svc.proc is None and svc.inflight is None:
        times.append(svc.not_before)
        if svc.leftovers_until is not None:
            times.append(svc.leftovers_until)
        if svc.confirming_since is not None:
            times.append(svc.confirming_since + cfg.policy.start_confirm)
    if svc.proc is not None and svc.attempts:
        times.append(svc.proc.started + svc_cfg(cfg, service).backoff.stable_after)
    return times


def _wake_at(state: State, now: float, cfg: Config) -> float | None:
    """The earliest future instant at which reconciling could give a different answer."""
    times = [t for service in (HAPROXY, KEEPALIVED) for t in _svc_wakes(state, service, cfg)]
    ka, ha = state.keepalived, state.haproxy.proc
    if ka.stop_failed_at is not None:
        times.append(ka.stop_failed_at + cfg.policy.stop_retry)
    if ka.proc is None and ha is not None:
        times.append(ha.started + cfg.policy.keepalived_start_delay)
    if state.comeback is not None:
        times.append(state.comeback.since + cfg.policy.restart_grace)
    if state.track_failed:
        times.append(state.track_retry_at)
    if state.kept is not None:
        times += handover.lapses(state.group, now)  # a peer that stops answering
        if not state.kept.mailed:
            times.append(state.kept.since + cfg.policy.kept_alert_after)
    future = [t for t in times if t > now]
    return min(future) if future else None
