"""Keeping the VIP when no peer can take it, and coming back at once when nobody holds it:
the policy's side of ``handover``'s verdicts, with the notes they make. Pure.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from lbwatch import handover
from lbwatch.config import Config
from lbwatch.events import Note, UnitPlan
from lbwatch.supervision import Comeback, Kept, State, haproxy_proved


def orphans(state: State, now: float, cfg: Config) -> tuple[str, ...]:
    """The instances of this node no node holds, as the peer link proves (``handover``), when
    haproxy here runs and passes its probe: one passing probe is enough then (``fold``)."""
    if not haproxy_proved(state, cfg):
        return ()
    return handover.orphaned(state.vrrp, state.group, now)


def keep(state: State, why: str, now: float, cfg: Config, notes: list[Note]) -> State:
    """haproxy cannot serve, and no peer can take the VIP: keepalived keeps it here while
    lbwatch heals haproxy. Said once; mailed once it has lasted ``kept_alert_after``."""
    kept = state.kept
    if kept is None:
        down, _ = why_down(state, cfg)
        text = f"{down}; keeping keepalived running and the VIP here: {why}"
        notes.append(Note(logging.WARNING, text))
        return replace(state, kept=Kept(now, text, cause=down))
    if not kept.mailed and now >= kept.since + cfg.policy.kept_alert_after:
        text = (
            f"the VIP has stayed {now - kept.since:.0f} s on this node, whose haproxy cannot "
            f"serve, because no peer can take it: {kept.why}"
        )
        notes.append(Note(logging.WARNING, text, alert="vip_kept"))
        return replace(state, kept=replace(kept, mailed=True))
    return state


def unkeep(state: State, now: float, notes: list[Note], release: str | None = None) -> State:
    """The end of a ``_keep``: the VIP is let go (``release``: why that is right now), or no
    longer needs keeping (haproxy serves again, or keepalived has gone)."""
    kept = state.kept
    if kept is None:
        return state
    lasted = f"{now - kept.since:.1f} s"
    if release:
        text = f"{release}: letting the VIP go after keeping it {lasted}"
    elif release is not None:
        text = f"this node holds no VIP any more (kept {lasted}): keepalived is stopped"
    elif state.keepalived.proc is None:
        text = f"keepalived is not running: the VIP, kept here for {lasted}, is no longer held"
    else:
        text = f"haproxy is serving again; the VIP stayed on this node throughout ({lasted})"
    notes.append(Note(logging.INFO, text))
    return replace(state, kept=None)


def why_down(state: State, cfg: Config) -> tuple[str, str]:
    """Why haproxy cannot serve, and the alert a stop of keepalived for it carries."""
    cb = state.comeback
    if cb is not None:
        return why_lapsed(cb, cfg), "haproxy_down"
    if state.haproxy.proc is None:
        return state.haproxy.down_reason, "haproxy_down"
    return f"haproxy health check failing ({state.probe_detail})", "haproxy_unhealthy"


def why_lapsed(cb: Comeback, cfg: Config) -> str:
    """The exit, and if systemd was restarting haproxy, that the grace ran out."""
    if cb.plan is not UnitPlan.RESTART:
        return cb.cause  # as for a crash, in the same words
    what = "healthy haproxy" if cfg.haproxy.health is not None else "new haproxy master"
    return (
        f"{cb.cause} and systemd's restart of {cfg.haproxy.unit} brought no {what} within "
        f"restart_grace ({cfg.policy.restart_grace:g} s)"
    )
