"""lbwatch against the seed's scripts on one schedule (``bench/chaos.py --baseline seed``):
the figures of both soaks side by side, and the issue's goal (lbwatch's downtime at most a
tenth of the seed's scripts', and a longest outage shorter than theirs). Pure: from the two
``chaos_report.analyse`` results."""

from __future__ import annotations

from typing import Any

GOAL_RATIO = 0.1  # lbwatch's downtime at most this share of the seed's


def figures(r: dict[str, Any]) -> dict[str, Any]:
    """The compared figures of one soak."""
    av, unsafe, pair = r["availability"], r["keepalived_without_haproxy"], r["pair"]
    share, up = av["share_200"], av.get("share_time_up")
    return {
        "availability (% of client probes answered)": _percent(share),
        "client probes": av["probes"],
        "availability (% of the client's probing time answered)": _percent(up),
        "total downtime (s)": av["downtime_s"],
        "downtime while some haproxy could serve (s)": av.get("downtime_while_servable_s", "-"),
        "outages": av["outages"],
        "longest outage (s)": av["longest_outage_s"],
        f"VIP on no node > {pair['allowed_s']} s while a haproxy could serve": pair["over_allowed"],
        "VIP on no node while a haproxy could serve, worst (s)": pair["worst_s"],
        "VIP on no node while a haproxy could serve, total (s)": pair["total_s"],
        "keepalived up, haproxy master dead > 1 s": unsafe["haproxy_dead_over_1s"],
        "keepalived up, haproxy master stopped > 1 s": unsafe["haproxy_stopped_over_1s"],
        "VRRP instance FAULT on both nodes": pair["fault_on_both"],
        "drains applied / refused / failed": (
            f"{pair['drains_applied']} / {pair['drains_refused']} / {pair['drains_failed']}"
        ),
        "drains that left no holder": pair["drains_left_no_holder"],
        "VIP moves (holder changes)": r["vip"]["holder_changes"],
        "both nodes holding the VIP outside a VRRP cut": r["vip"]["both_held_outside_vrrp_cut"],
    }


def _percent(share: float | None) -> str:
    return f"{100 * share:.3f} %" if share is not None else "-"


def goal(lb: dict[str, Any], seed: dict[str, Any]) -> dict[str, Any]:
    """The ratio of downtimes (None when the seed's scripts had none) and whether the goal
    was met."""
    down_lb = lb["availability"]["downtime_s"]
    down_seed = seed["availability"]["downtime_s"]
    ratio = down_lb / down_seed if down_seed else None
    serv_lb = lb["availability"].get("downtime_while_servable_s")
    serv_seed = seed["availability"].get("downtime_while_servable_s")
    serv_ratio = serv_lb / serv_seed if serv_lb is not None and serv_seed else None
    longest_lb = lb["availability"]["longest_outage_s"]
    longest_seed = seed["availability"]["longest_outage_s"]
    return {
        "downtime_ratio": round(ratio, 4) if ratio is not None else None,
        "servable_downtime_ratio": round(serv_ratio, 4) if serv_ratio is not None else None,
        "downtime_goal_met": ratio is not None and ratio <= GOAL_RATIO,
        "longest_goal_met": longest_lb < longest_seed,
    }


def render(lb: dict[str, Any], seed: dict[str, Any]) -> str:
    a, b = figures(lb), figures(seed)
    g = goal(lb, seed)
    lines = [
        f"lbwatch against the seed's scripts: seed {lb['seed']}, {lb['minutes']} min, "
        f"{lb['profile']} profile, the same {len(lb['schedule'])} faults",
        "",
        "| figure | lbwatch | seed's scripts |",
        "|---|---|---|",
        *(f"| {k} | {a[k]} | {b[k]} |" for k in a),
    ]
    ratio = g["downtime_ratio"]
    said = f"{ratio:.3f}" if ratio is not None else "- (no downtime with the seed's scripts)"
    serv = g["servable_downtime_ratio"]
    lines += [
        f"| downtime ratio lbwatch / seed | {said} | |",
        f"| ratio of the downtime while some haproxy could serve | "
        f"{f'{serv:.3f}' if serv is not None else '-'} | |",
        "",
        f"goal: downtime at most {GOAL_RATIO:g} of the seed's: "
        f"{'met' if g['downtime_goal_met'] else 'NOT met'}; longest outage shorter than "
        f"theirs ({a['longest outage (s)']} s against {b['longest outage (s)']} s): "
        f"{'met' if g['longest_goal_met'] else 'NOT met'}",
    ]
    return "\n".join(lines)
