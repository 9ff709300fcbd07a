"""``lbwatch status`` as text: the agent's published status document rendered for a terminal."""

from __future__ import annotations

import time

from lbwatch.notify.writer import FIX
from lbwatch.statusdoc import ClusterView, NotifyView, PauseInfo, ServiceView, StatusDoc
from lbwatch.sync.cli import sync_lines


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _service_line(svc: ServiceView, now_wall: float) -> str:
    if svc.running:
        text = f"running   pid {svc.pid}, up {_age(now_wall - (svc.started or now_wall))}"
        if svc.children:
            text += f", children {','.join(map(str, svc.children))}"
    else:
        text = f"DOWN      {svc.down_reason}"
    extras = [
        f"{svc.in_progress} in progress" if svc.in_progress else "",
        "GIVEN UP after repeated failures" if svc.given_up else "",
        f"next start attempt in {svc.next_attempt_in:.0f} s"
        if svc.next_attempt_in is not None
        else "",
        f"{svc.attempts} recent start attempt(s)" if svc.attempts else "",
        f"last failure: {svc.last_failure}" if svc.last_failure else "",
    ]
    return "; ".join([text, *(e for e in extras if e)])


def _notify_lines(notify: NotifyView | None) -> list[str]:
    if notify is None:
        return []
    lines = []
    if notify.fifo_error:
        lines.append(f"  {'notify':<11} FIFO UNUSABLE: {notify.fifo_error}")
    elif notify.fifo:
        bad = notify.malformed_lines
        lines.append(
            f"  {'notify':<11} reading {notify.fifo}"
            + (f"; {bad} malformed line(s) ignored" if bad else "")
        )
    if notify.fifo_unread:
        lines.append(f"  {'  fifo':<11} NOT WRITTEN: {notify.fifo_unread}; {FIX}")
    if notify.fifo_notice:
        lines.append(f"  {'  fifo':<11} FIXED: {notify.fifo_notice}")
    if notify.held_in_memory:
        lines.append(
            f"  {'  spool':<11} NO ROOM on disk: {notify.held_in_memory} message(s) held in "
            f"memory until {notify.spool} has room (lost if lbwatch stops meanwhile)"
        )
    for name, ch in notify.channels.items():
        text = f"{ch.delivered} sent, {ch.waiting} waiting"
        if ch.dropped:
            text += f", {ch.dropped} DROPPED (spool full)"
        if ch.rejected:
            text += f", {ch.rejected} REFUSED by the server (kept in spool/rejected)"
        if ch.failures_in_a_row:
            text += (
                f"; FAILING x{ch.failures_in_a_row}: {ch.last_error}; "
                f"retry in {ch.retry_in or 0:.0f} s"
            )
        lines.append(f"  {'  ' + name:<11} {text}")
    return lines


def _cluster_lines(cluster: ClusterView | None, now_wall: float) -> list[str]:
    """One line per watched peer and per split brain; ``status --cluster`` has the table."""
    if cluster is None:
        return []
    lines = []
    for name, peer in cluster.peers.items():
        why = f": {peer.reason}" if peer.state != "up" and peer.reason else ""
        since = _age(now_wall - peer.since)
        lines.append(f"  {'cluster':<11} {name} {peer.state} for {since}{why}")
    for sb in cluster.split_brain:
        what = "SPLIT BRAIN" if sb.declared else "overlap"
        lines.append(
            f"  {'cluster':<11} {what}: {sb.instance} claimed by {' and '.join(sb.nodes)} "
            f"for {_age(now_wall - sb.since)}"
        )
    return lines


def format_status(data: StatusDoc, now_wall: float) -> str:
    agent = data.agent
    lines = [
        f"lbwatch {agent.version} on {agent.node} (pid {agent.pid}, up "
        f"{_age(now_wall - agent.create_time)}): {data.summary}"
    ]
    for name, svc in data.services.items():
        lines.append(f"  {name:<11} {_service_line(svc, now_wall)}")
    health = data.health
    if health.url:
        lines.append(f"  {'health':<11} {health.state} ({health.detail or 'not probed yet'})")
    if data.paused:
        pause = data.pause or PauseInfo()
        since = time.strftime("%H:%M:%S", time.localtime(pause.since))
        why = f": {pause.reason}" if pause.reason else ""
        lines.append(f"  {'paused':<11} YES since {since}{why}")
    else:
        lines.append(f"  {'paused':<11} no")
    if data.drain is not None:
        d = data.drain
        since = time.strftime("%H:%M:%S", time.localtime(d.since))
        waiting = [n for n in d.covers if n not in d.applied and n not in d.no_lever]
        state = f"; not yet applied: {', '.join(waiting)}" if waiting else ""
        if d.no_lever:
            state += f"; NOT TRACKED by keepalived.conf: {', '.join(d.no_lever)} (lbwatch doctor)"
        why = f": {d.reason}" if d.reason else ""
        what = ", ".join(d.covers) or "no instance known yet"
        lines.append(f"  {'drained':<11} {what} since {since}{why}{state}")
    for name, why in sorted(data.standing_down.items()):
        lines.append(f"  {'standing down':<11} {name}: {why}")
    if data.kept is not None:
        since = time.strftime("%H:%M:%S", time.localtime(data.kept.since))
        lines.append(f"  {'VIP KEPT':<11} since {since}: {data.kept.why}")
    for inst, vips in data.vrrp.items():
        held = f", holds {', '.join(vips.held) or 'none'} of {', '.join(vips.vips)}"
        lines.append(f"  {'vrrp':<11} {inst}: {vips.state}{held if vips.vips else ''}")
    lines += _notify_lines(data.notify)
    lines += sync_lines(data.sync)
    lines += _cluster_lines(data.cluster, now_wall)
    if data.recent_actions:
        lines.append("recent actions:")
    for act in data.recent_actions[-10:]:
        when = time.strftime("%H:%M:%S", time.localtime(act.at))
        took = f" {act.duration:.2f}s" if act.duration is not None else ""
        lines.append(f"  {when} {act.action}: {act.outcome}{took} - {act.reason}")
        if act.outcome not in ("ok", "in progress"):
            lines.append(f"           {act.detail or ''}")
    return "\n".join(lines)
