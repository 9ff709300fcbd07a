"""Which events become which messages on which channels: pure, no I/O, time passed in.

- Routing: ``notify.routes`` patterns (shell wildcards) on the event name pick the channels.
  Default: a VRRP instance or group entering MASTER or FAULT, and lbwatch's own failures.
- Two sources: keepalived writes its FIFO in order, while notify scripts (`lbwatch notify`)
  are forked and may arrive late and out of order. Once an instance has been heard on the FIFO,
  script reports about it are ignored; a script report that came first is matched by the
  FIFO's report of the same state, which is then a duplicate.
- Boot: keepalived often starts before lbwatch. Its notify script, finding no agent, spools the
  transition itself, and keepalived also left the same transition in the FIFO, read when the
  agent starts. The transitions scripts spooled are given to the router at start (``spooled``);
  the FIFO's first reading matches them in order, and each match is a duplicate.
- Duplicates: a state an instance is already in is not reported again; other repeats within
  ``dedupe_window`` are dropped.
- Flaps: after ``flap_max`` messages about one instance within ``flap_window`` seconds, its
  further transitions are held and sent as one digest when the window has passed. Only
  transitions that would be sent count, so an ordinary failover and heal (BACKUP, MASTER, STOP,
  BACKUP, MASTER: two MASTER messages by default) is not a flap.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Union

from lbwatch.config import Config, Notify
from lbwatch.notify import message
from lbwatch.notify.message import Notification
from lbwatch.notify.parse import LvsEvent, VrrpEvent

TRANSITIONS = frozenset({"MASTER", "BACKUP", "FAULT", "STOP", "DELETED"})


@dataclass(frozen=True)
class AgentAlert:
    """One of lbwatch's own events worth telling people about."""

    kind: str  # haproxy_down, keepalived_restarted, giveup, stop_failed, ...
    text: str


Item = Union[VrrpEvent, LvsEvent, AgentAlert]


@dataclass(frozen=True)
class Held:
    since: float  # monotonic: when holding began
    transitions: tuple[tuple[float, str], ...]  # (wall time, state)


@dataclass(frozen=True)
class Outgoing:
    notification: Notification
    channels: tuple[str, ...]


@dataclass(frozen=True)
class RouterState:
    """Copied, never mutated: each decision returns a new one."""

    last: dict[str, str] = field(default_factory=dict)  # instance key -> last state
    times: dict[str, tuple[float, ...]] = field(default_factory=dict)  # transitions, monotonic
    held: dict[str, Held] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # dedupe key -> when last sent
    fifo_keys: frozenset[str] = frozenset()  # instances heard on the FIFO
    # States notify scripts spooled per instance before the agent started, oldest first; used
    # by the FIFO's first reading only (``first_read_done``), whose lines date from then too.
    spooled: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Routed:
    state: RouterState
    out: tuple[Outgoing, ...] = ()
    dropped: tuple[str, ...] = ()  # why items produced nothing (for a debug line)
    wake_at: float | None = None


def channels_for(event: str, cfg: Notify) -> tuple[str, ...]:
    configured = cfg.channel_names()
    chosen: list[str] = []
    for route in cfg.routes:
        if any(fnmatch.fnmatchcase(event, pattern) for pattern in route.events):
            for channel in route.channels:
                names = configured if channel == "*" else [channel]
                chosen += [n for n in names if n in configured and n not in chosen]
    return tuple(chosen)


def _wake(state: RouterState, cfg: Notify) -> float | None:
    ends = [h.since + cfg.flap_window for h in state.held.values()]
    return min(ends) if ends else None


def _vips(cfg: Config, name: str) -> list[str]:
    return next((list(i.vips) for i in cfg.vrrp_instances if i.name == name), [])


def route(
    state: RouterState, item: Item, now: float, wall: float, node: str, cfg: Config
) -> Routed:
    """Fold one event in; what to send now."""
    if isinstance(item, VrrpEvent):
        return _route_vrrp(state, item, now, wall, node, cfg)
    if isinstance(item, LvsEvent):
        key = f"lvs:{item.kind}:{item.server}:{item.virtual_server}"
        new = "UP" if item.up else "DOWN"
        if state.last.get(key) == new:
            return Routed(
                state, dropped=(f"{key} already {new}",), wake_at=_wake(state, cfg.notify)
            )
        state = replace(state, last={**state.last, key: new})
        n = message.lvs(node, item.kind, item.server, item.virtual_server, item.up, wall)
        return _emit(state, [n], cfg)
    key = f"agent:{item.kind}:{item.text}"
    if now - state.seen.get(key, -1e18) < cfg.notify.dedupe_window:
        return Routed(state, dropped=(f"repeat of {item.kind}",), wake_at=_wake(state, cfg.notify))
    state = replace(state, seen={**_recent(state.seen, now, cfg.notify), key: now})
    return _emit(state, [message.agent(node, item.kind, item.text, wall)], cfg)


def _recent(seen: dict[str, float], now: float, cfg: Notify) -> dict[str, float]:
    return {k: t for k, t in seen.items() if now - t < cfg.dedupe_window}


def spooled(state: RouterState, reports: list[tuple[str, str]]) -> RouterState:
    """At start: the (instance key, state) transitions notify scripts spooled while no agent
    ran, oldest first. They are sent from the spool; the FIFO's copies are duplicates."""
    queued = dict(state.spooled)
    for key, st in reports:
        queued[key] = (*queued.get(key, ()), st)
    return replace(state, spooled=queued)


def first_read_done(state: RouterState) -> RouterState:
    """The FIFO's first reading is over: later lines are new transitions, never duplicates of
    what scripts spooled before the agent started."""
    return replace(state, spooled={}) if state.spooled else state


def _route_vrrp(
    state: RouterState, ev: VrrpEvent, now: float, wall: float, node: str, cfg: Config
) -> Routed:
    ncfg = cfg.notify
    key = f"{ev.kind}:{ev.name}"
    if ev.source == "script" and key in state.fifo_keys:
        return Routed(
            state,
            dropped=(f"{key} is reported on the FIFO; script report ignored",),
            wake_at=_wake(state, ncfg),
        )
    if ev.source == "fifo" and key not in state.fifo_keys:
        state = replace(state, fifo_keys=state.fifo_keys | {key})
    queued = state.spooled.get(key, ()) if ev.source == "fifo" else ()
    if ev.state in queued:
        # The script spooled this transition before the agent started; the spool sends it.
        # Earlier spooled states without a FIFO line are passed over: the FIFO keeps order.
        rest = queued[queued.index(ev.state) + 1 :]
        last = {**state.last, key: ev.state} if ev.state in TRANSITIONS else state.last
        state = replace(state, spooled={**state.spooled, key: rest}, last=last)
        return Routed(
            state,
            dropped=(f"{key} {ev.state} was spooled by the notify script before the agent ran",),
            wake_at=_wake(state, ncfg),
        )
    if ev.state not in TRANSITIONS:
        # MASTER_PRIORITY, BACKUP_PRIORITY, MASTER_RX_LOWER_PRI: events, not states.
        dkey = f"{key}:{ev.state}:{ev.priority}"
        if now - state.seen.get(dkey, -1e18) < ncfg.dedupe_window:
            return Routed(state, dropped=(f"repeat of {dkey}",), wake_at=_wake(state, ncfg))
        state = replace(state, seen={**_recent(state.seen, now, ncfg), dkey: now})
        n = message.vrrp(
            node,
            ev.kind,
            ev.name,
            None,
            ev.state,
            ev.priority,
            _vips(cfg, ev.name),
            wall,
            ev.source,
        )
        return _emit(state, [n], cfg)
    old = state.last.get(key)
    if old == ev.state:
        return Routed(state, dropped=(f"{key} already {old}",), wake_at=_wake(state, ncfg))
    state = replace(state, last={**state.last, key: ev.state})
    times = tuple(t for t in state.times.get(key, ()) if now - t < ncfg.flap_window)
    if channels_for(f"vrrp:{ev.state}", ncfg):
        times = (*times, now)
    state = replace(state, times={**state.times, key: times})
    held = state.held.get(key)
    if held is not None or len(times) > ncfg.flap_max:
        # Flapping: hold the transition for the digest sent when the window has passed.
        before = held.transitions if held else ()
        since = held.since if held else now
        new_held = Held(since, (*before, (wall, ev.state)))
        state = replace(state, held={**state.held, key: new_held})
        return Routed(
            state, dropped=(f"{key} flapping; held for the digest",), wake_at=_wake(state, ncfg)
        )
    n = message.vrrp(
        node, ev.kind, ev.name, old, ev.state, ev.priority, _vips(cfg, ev.name), wall, ev.source
    )
    return _emit(state, [n], cfg)


def flush(state: RouterState, now: float, wall: float, node: str, cfg: Config) -> Routed:
    """Send the digests whose flap window has passed."""
    ncfg = cfg.notify
    out: list[Outgoing] = []
    held = dict(state.held)
    for key, h in sorted(state.held.items()):
        if now < h.since + ncfg.flap_window:
            continue
        del held[key]
        n = message.digest(node, key, list(h.transitions), ncfg.flap_window, wall)
        channels: list[str] = []
        for _, s in h.transitions:
            channels += [c for c in channels_for(f"vrrp:{s}", ncfg) if c not in channels]
        if channels:
            out.append(Outgoing(n, tuple(channels)))
    state = replace(state, held=held)
    return Routed(state, tuple(out), wake_at=_wake(state, ncfg))


def _emit(state: RouterState, notes: list[Notification], cfg: Config) -> Routed:
    out = []
    dropped = []
    for n in notes:
        channels = channels_for(n.event, cfg.notify)
        if channels:
            out.append(Outgoing(n, channels))
        else:
            dropped.append(f"{n.event} not routed to any channel")
    return Routed(state, tuple(out), tuple(dropped), _wake(state, cfg.notify))
