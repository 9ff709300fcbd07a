"""The chaos soak's verdict: figures per invariant from what the observer recorded, the
violations of the hard ones with the timeline around each, and the markdown table.

Hard invariants (exit code 1): an invalid config on a node it was not written on; a MASTER or
FAULT transition not mailed or mailed twice; an agent wedged (no watchdog ping for the rig's
``wedge_after``, 2 s in the bare lab, while it ran); a valid edit not on every node within 5 s
while the peers were reachable; a VIP move no fault explains; and the pair's
(bench/chaos_pair.py): the VIP on no node for longer than the election time + 0.5 s while some
node's haproxy could serve, an instance in FAULT on both nodes, a drain that left no holder.
The others are figures to watch.

The seed's scripts (``RunData.supervisor`` "seed", ``bench/chaos.py --baseline seed``) are
judged by what does not depend on lbwatch: availability, keepalived without haproxy, two
masters, the VIP and the pair's invariants; their config (no sync), lbwatch's mail, watchdog and
log checks do not apply, and their violations are figures of the baseline, not failures.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.chaos_faults import INVALID_MARK
from bench.chaos_mail import check, read_mails
from bench.chaos_observer import Observations, Snap
from bench.chaos_pair import drain_outcome, intersect, pair_invariants, servable, union
from bench.chaos_plan import BOTH, Fault

EXPLAIN_AFTER = 5.0  # an outage within this long after a fault's heal is the fault's
MOVE_AFTER = 10.0  # a VIP move within this long after a fault is the fault's
CONVERGE = 5.0  # a valid edit is on every node within this long...
REACH_GRACE = 5.0 + 4.0  # ... or this long after a fault that cut the peers off healed
# (5 s, plus the lab's sync retry_max of 4 s: the retry that follows the heal)
UNSAFE = 0.1
UNSAFE_LONG = 1.0  # the comparison with the seed's scripts counts spans longer than this
# Faults during which a node cannot reach its peer over ssh, has no agent to push, or cannot
# take a push (its staging directory's disk is full).
CUTS_PEERS = ("sshd_down", "link_flap", "lbwatch_kill", "lbwatch_stop", "clock_step", "disk_full")
AGENT_RESTARTS = ("lbwatch_kill", "lbwatch_stop", "clock_step")
# Faults after which the VIP may move: haproxy or keepalived down, VRRP cut, a link down. Not
# lbwatch's own restart, a clock step, an edit, a reload, sshd, SMTP or a full disk: a move
# after those alone is needless.
MOVES_VIP = (
    "haproxy_master_kill",
    "haproxy_worker_kill",
    "haproxy_master_stop",
    "haproxy_restart",
    "keepalived_parent_kill",
    "keepalived_child_kill",
    "vrrp_cut",
    "link_flap",
    *BOTH,
    "drain",
    "vrrp_deaf",
)
CUTS_VRRP = ("vrrp_cut", "vrrp_deaf")  # both nodes may hold the VIP during these


@dataclass(frozen=True)
class Applied:
    fault: Fault
    injected: float  # wall time
    healed: float  # wall time; == injected when there is nothing to heal; 0 while active
    detail: str
    heal_detail: str
    second: float = 0.0  # a BOTH fault: when its second node got it (wall time)
    second_detail: str = ""

    def healed_at(self, t: float, detail: str) -> Applied:
        return replace(self, healed=t, heal_detail=detail)

    def second_at(self, t: float, detail: str) -> Applied:
        return replace(self, second=t, second_detail=detail)

    @property
    def end(self) -> float:
        return max(self.healed or self.injected, self.second)


@dataclass(frozen=True)
class RunData:
    seed: int
    minutes: float
    profile: str
    t0: float
    end: float
    faults: list[Applied]
    obs: Observations
    valid_edits: list[tuple[float, str, str]]
    invalid_edits: list[tuple[str, str]]
    transitions: dict[str, list[tuple[float, str, str]]]  # node -> (time, state, instance)
    maildir: Path
    logs: dict[str, str]
    wedge_after: float  # no watchdog ping for this long: the agent was wedged
    tier: str = "bare"
    mail_since: float = 0.0  # mail accepted before this wall time is not judged
    supervisor: str = "lbwatch"  # or "seed": the seed's scripts (``--baseline seed``)
    advert_int: float = 1.0  # keepalived's, for the election time
    priorities: tuple[int, ...] = (254, 253)
    observed_until: float = 0.0  # when the observer stopped (0: ``end``)


def _overlaps(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 <= b1 and b0 <= a1


# -- availability ---------------------------------------------------------------------------------


def availability(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    changes = [c for c in d.obs.client if "t" in c]
    ends = [c for c in d.obs.client if "end" in c]
    last = ends[-1] if ends else (changes[-1] if changes else {"n": 0, "ok": 0})
    outages: list[tuple[float, float]] = []
    start = None
    for c in changes:
        if c["status"] != 200 and start is None:
            start = c["t"]
        elif c["status"] == 200 and start is not None:
            outages.append((start, c["t"]))
            start = None
    if start is not None:
        outages.append((start, last.get("end", d.end)))
    downtime = sum(o1 - o0 for o0, o1 in outages)
    # The probes' share overweighs the good times (a probe answered takes ms, one unanswered
    # its 0.25 s timeout): the share of the probing time answered says it in seconds.
    probing = last.get("end", d.end) - changes[0]["t"] if changes else 0.0
    # What a supervisor could have saved: the downtime while some node's haproxy could serve
    # (both frozen, both dead: nobody can answer, whoever holds the VIP).
    anyone = union(
        s for spans in servable(d.obs.procs, _until(d), _link_down(d)).values() for s in spans
    )
    servable_down = sum(e - s for s, e in intersect(outages, anyone))
    longest = max(outages, key=lambda o: o[1] - o[0], default=(d.t0, d.t0))
    explained, unexplained = [], []
    for o0, o1 in outages:
        why = [a for a in d.faults if _overlaps(o0, o1, a.injected, a.end + EXPLAIN_AFTER)]
        (explained if why else unexplained).append(o1 - o0)
    out["availability"] = {
        "probes": last["n"],
        "answered_200": last["ok"],
        "share_200": round(last["ok"] / last["n"], 5) if last["n"] else None,
        "outages": len(outages),
        "probing_s": round(probing, 3),
        "downtime_s": round(downtime, 3),
        "share_time_up": round(1 - downtime / probing, 5) if probing > 0 else None,
        "downtime_while_servable_s": round(servable_down, 3),
        "longest_outage_s": round(longest[1] - longest[0], 3),
        "longest_outage_at_s": round(longest[0] - d.t0, 2),  # from the start, as the schedule
        "longest_explained_s": round(max(explained, default=0.0), 3),
        "unexplained_outages": len(unexplained),
        "longest_unexplained_s": round(max(unexplained, default=0.0), 3),
        # (start from t0, seconds) of each: in the JSON, where the timeline says why
        "outage_spans": [(round(o0 - d.t0, 2), round(o1 - o0, 3)) for o0, o1 in outages],
    }


# -- keepalived up while haproxy is not ------------------------------------------------------------


AGENT_DOWN = AGENT_RESTARTS  # faults that take a node's lbwatch away


def unsafe(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    fig: dict[str, Any] = {}
    for why in ("dead", "stopped"):
        spans = [(s, e, n) for s, e, n, w in d.obs.unsafe if w == why and e - s > UNSAFE]
        fig[f"haproxy_{why}_over_100ms"] = len(spans)
        fig[f"haproxy_{why}_over_1s"] = sum(e - s > UNSAFE_LONG for s, e, _ in spans)
        worst = max(spans, key=lambda x: x[1] - x[0], default=None)
        fig[f"haproxy_{why}_worst_s"] = round(worst[1] - worst[0], 3) if worst else 0.0
        fig[f"haproxy_{why}_worst_at_s"] = round(worst[0] - d.t0, 2) if worst else None
        # With the node's lbwatch away (killed, or restarting for a clock step) nothing stops
        # keepalived: those spans say nothing of lbwatch's reaction.
        agent_up = [
            (s, e, n)
            for s, e, n in spans
            if not any(
                a.fault.kind in AGENT_DOWN
                and a.fault.node == n
                and _overlaps(s, e, a.injected, a.end + 2.0)
                for a in d.faults
            )
        ]
        fig[f"haproxy_{why}_over_100ms_lbwatch_up"] = len(agent_up)
        fig[f"haproxy_{why}_worst_lbwatch_up_s"] = round(
            max((e - s for s, e, _ in agent_up), default=0.0), 3
        )
        # Where to look in the schedule and the agents' logs: (start, seconds, node).
        fig[f"haproxy_{why}_lbwatch_up_spans"] = [
            (round(s - d.t0, 2), round(e - s, 3), n) for s, e, n in agent_up
        ]
    out["keepalived_without_haproxy"] = fig


def masters(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    """Two live haproxy masters on one node: both serve the port (SO_REUSEPORT), and lbwatch
    watches one of them. A reload keeps the master's PID, so no fault explains it."""
    spans: list[float] = []
    for node, seq in d.obs.procs.items():
        for i, (t, snap) in enumerate(seq):
            if len(snap.masters) > 1:
                until = seq[i + 1][0] if i + 1 < len(seq) else d.end
                spans.append(until - t)
                bad.append(
                    {
                        "invariant": "two haproxy masters",
                        "at": t,
                        "text": f"{node}: haproxy masters {list(snap.masters)} for "
                        f"{until - t:.2f} s",
                    }
                )
    out["haproxy_masters"] = {
        "two_at_once": len(spans),
        "two_at_once_worst_s": round(max(spans, default=0.0), 3),
    }


# -- VIP ------------------------------------------------------------------------------------------


def _snap_at(d: RunData, node: str, t: float) -> Snap | None:
    found = None
    for at, snap in d.obs.procs.get(node, []):
        if at > t:
            break
        found = snap
    return found


def vip(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    moves = needless = heals = 0
    both: list[float] = []
    seq = d.obs.vip
    for i in range(1, len(seq)):
        t, holders = seq[i]
        prev = seq[i - 1][1]
        if t < d.t0:
            continue
        moves += 1
        if len(holders) == 2:
            until = seq[i + 1][0] if i + 1 < len(seq) else d.end
            cut = [
                a
                for a in d.faults
                if a.fault.kind in CUTS_VRRP and _overlaps(t, until, a.injected, a.end + 1.0)
            ]
            if not cut:
                both.append(until - t)
        if any(
            a.fault.kind in MOVES_VIP and _overlaps(t - MOVE_AFTER, t, a.injected, a.end)
            for a in d.faults
        ):
            continue
        snap = _snap_at(d, "lb1", t)
        healthy = snap is not None and snap.masters and snap.master_state != "T"
        if "lb1" in holders and "lb1" not in prev and healthy and snap and snap.kl_parents:
            heals += 1  # lb1, healthy again, takes its VIP back (preemption)
            continue
        needless += 1
        bad.append(
            {
                "invariant": "needless VIP move",
                "at": t,
                "text": f"VIP {list(prev) or 'nobody'} -> {list(holders) or 'nobody'}, "
                f"no fault that moves it within {MOVE_AFTER:.0f} s",
            }
        )
    out["vip"] = {
        "holder_changes": moves,
        "needless_moves": needless,
        "taken_back_by_lb1_after_heal": heals,
        "both_held_outside_vrrp_cut": len(both),
        "both_held_worst_s": round(max(both, default=0.0), 3),
    }


# -- config ---------------------------------------------------------------------------------------


def _deadline(d: RunData, t: float) -> tuple[float, bool]:
    """When an edit at ``t`` must be everywhere; and whether the peers were reachable all along."""
    deadline, reachable = t + CONVERGE, True
    changed = True
    while changed:
        changed = False
        for a in d.faults:
            if a.fault.kind in CUTS_PEERS and _overlaps(t, deadline, a.injected, a.end):
                late = a.end + REACH_GRACE
                if late > deadline:
                    deadline, reachable, changed = late, False, True
    return deadline, reachable


def config(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    sha = {c: hashlib.sha256(c.encode()).hexdigest() for _, _, c in d.valid_edits}
    # Each node's file over time, from the observer's polls.
    states: list[tuple[float, dict[str, str]]] = []
    cur: dict[str, str] = {}
    for t, node, h in d.obs.configs:
        cur = {**cur, node: h}
        states.append((t, cur))
    late, lags, lags_reach = 0, [], []
    for t, node, content in d.valid_edits:
        # This edit or any made with or after it (simultaneous edits: either may win).
        ok = {sha[content]} | {sha[c] for tt, _, c in d.valid_edits if tt >= t}
        deadline, reachable = _deadline(d, t)
        done = next(
            (
                st
                for st, files in states
                if st >= t
                and len(set(files.values())) == 1
                and len(files) == 2
                and next(iter(files.values())) in ok
            ),
            None,
        )
        lag = (done - t) if done is not None else float("inf")
        lags.append(lag)
        if reachable:
            lags_reach.append(lag)
        if done is None or done > deadline:
            late += 1
            why = "peers reachable" if reachable else "after a cut"
            bad.append(
                {
                    "invariant": "config not converged",
                    "at": t,
                    "text": f"valid edit on {node} at +{t - d.t0:.2f} s not on every node by "
                    f"+{deadline - d.t0:.2f} s ({why}); lag {lag:.2f} s",
                }
            )
    leaked = 0
    invalid = set(d.invalid_edits)
    for t, node, h in d.obs.configs:
        content = d.obs.contents.get(h, "")
        if INVALID_MARK in content and (node, content) not in invalid:
            leaked += 1
            bad.append({"invariant": "invalid config on a peer", "at": t, "text": f"on {node}"})
    finite = [x for x in lags if x != float("inf")]
    out["config"] = {
        "valid_edits": len(d.valid_edits),
        "invalid_edits": len(d.invalid_edits),
        "late": late,
        "worst_lag_s": round(max(lags), 3) if lags else 0.0,
        "worst_lag_reachable_s": round(max(lags_reach), 3) if lags_reach else 0.0,
        "median_lag_s": round(sorted(finite)[len(finite) // 2], 3) if finite else 0.0,
        "invalid_on_peer": leaked,
    }


# -- mail -----------------------------------------------------------------------------------------


def mail(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    mails = [m for m in read_mails(d.maildir) if m.accepted >= d.mail_since]
    mc = check(d.transitions, mails)
    for t, node, state in mc.not_mailed:
        bad.append({"invariant": "transition not mailed", "at": t, "text": f"{node} {state}"})
    for t, node, state in mc.mailed_twice:
        bad.append(
            {"invariant": "transition mailed twice", "at": t, "text": f"{node} {state} (mail date)"}
        )
    for t, subject in mc.fifo_unread:
        bad.append({"invariant": "FIFO said unread (false alarm)", "at": t, "text": subject})
    out["mail"] = {
        "keepalived_transitions": mc.transitions,
        "transition_mails": mc.mailed,
        "not_mailed": len(mc.not_mailed),
        "mailed_twice": len(mc.mailed_twice),
        "duplicate_deliveries_same_message_id": mc.duplicate_deliveries,
        "digests": mc.digests,
        "agent_alerts": mc.agent_alerts,
        "fifo_unread_alerts": len(mc.fifo_unread),
        "messages_received": len(mails),
    }
    out["_mails"] = mails


# -- wedge ----------------------------------------------------------------------------------------


def wedge(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    fig: dict[str, Any] = {}
    for node, pings in d.obs.pings.items():
        times = [t for t, m in pings if "WATCHDOG=1" in m and t >= d.t0]
        restarts = [
            x
            for a in d.faults
            if a.fault.node == node and a.fault.kind in AGENT_RESTARTS
            for x in (a.injected, a.end)
        ]
        worst = 0.0
        for t1, t2 in zip(times, times[1:]):
            if any(t1 - 0.5 <= r <= t2 for r in restarts):
                continue
            worst = max(worst, t2 - t1)
            if t2 - t1 > d.wedge_after:
                bad.append(
                    {
                        "invariant": "agent wedged",
                        "at": t1,
                        "text": f"{node}: no watchdog ping for {t2 - t1:.2f} s",
                    }
                )
        fig[node] = {"pings": len(times), "worst_gap_s": round(worst, 3)}
    out["watchdog"] = fig


# -- reactions: the run was not vacuous ------------------------------------------------------------

_PIDS = re.compile(r"\[([\d, ]*)\]")


def _killed(detail: str) -> set[int]:
    m = _PIDS.search(detail)
    return {int(x) for x in m.group(1).split(",") if x.strip()} if m else set()


def _killed_and_back(d: RunData, node: str, since: float, detail: str) -> bool:
    """The processes ``detail`` names killed on ``node`` were seen gone, then haproxy and
    keepalived whole again without them."""
    later = [s for t, s in d.obs.procs.get(node, []) if t >= since]
    killed = _killed(detail)
    gone = any(not (s.pids() & killed) for s in later)
    back = any(
        s.masters and s.kl_parents and s.kl_children and not s.pids() & killed for s in later
    )
    return bool(killed) and gone and back


def _reacted_pair(d: RunData, a: Applied) -> bool | None:
    """The pair's faults: each node's kill seen and healed; each node's freeze seen; a drain
    refused (its expected outcome when no peer can take over) or the drained node seen without
    the VIP; one node deaf to VRRP: both nodes held the VIP (None when the deaf one was the
    holder: nothing changes then)."""
    f = a.fault
    if f.kind in ("both_haproxy_kill", "both_keepalived_kill"):
        return _killed_and_back(d, f.node, a.injected, a.detail) and _killed_and_back(
            d, f.other, a.second, a.second_detail
        )
    if f.kind == "both_haproxy_stop":
        return all(
            any(s.master_state == "T" for t, s in d.obs.procs.get(n, []) if start <= t <= a.end)
            for n, start in ((f.node, a.injected), (f.other, a.second or a.injected))
        )
    if f.kind == "drain":
        outcome = drain_outcome(a.detail)
        if outcome != "drained":
            return outcome == "refused"
        return any(
            f.node not in h for t, h in d.obs.vip if a.injected <= t <= a.end
        ) or f.node not in next((h for t, h in reversed(d.obs.vip) if t <= a.injected), ())
    return any(len(h) == 2 for t, h in d.obs.vip if a.injected <= t <= a.end + 1) or None


def reacted(d: RunData, a: Applied, mails: list[Any]) -> bool | None:
    """Whether the observer saw the fault land and the lab answer it (None: nothing to see)."""
    f, node = a.fault, a.fault.node
    later = [s for t, s in d.obs.procs.get(node, []) if t >= a.injected]
    if f.kind in (
        "haproxy_master_kill",
        "haproxy_worker_kill",
        "haproxy_restart",
        "keepalived_parent_kill",
        "keepalived_child_kill",
    ):
        return _killed_and_back(d, node, a.injected, a.detail)
    if f.kind in (*BOTH, "drain", "vrrp_deaf"):
        return _reacted_pair(d, a)
    if f.kind == "haproxy_master_stop":
        return (
            any(
                s.master_state == "T"
                for t, s in d.obs.procs.get(node, [])
                if a.injected <= t <= a.end + 0.5
            )
            or _killed(a.detail) == set()
        )
    if f.kind == "haproxy_reload":
        # The master re-executes itself (same PID) and replaces every worker.
        before = _snap_at(d, node, a.injected)
        return bool(before and before.workers) and any(
            set(before.masters) <= set(s.masters)
            and s.workers
            and not set(s.workers) & set(before.workers)
            for s in later
        )
    if f.kind in AGENT_RESTARTS and d.supervisor == "lbwatch":
        # A READY=1 after the fault: under systemd, Restart= may bring lbwatch back before the
        # heal (which only waits for that); in the bare lab none comes before the heal starts
        # it. A clock step's first READY=1 is its own start with the offset: the heal's counts.
        since = a.end if f.kind == "clock_step" else a.injected
        return any("READY=1" in m and t >= since for t, m in d.obs.pings.get(node, []))
    if f.kind == "smtp_down":
        return any(m.accepted > a.end for m in mails) or None
    if f.kind == "edit_invalid":
        marks = [c for n, c in d.invalid_edits if n == node]
        return any(
            any(
                m.body.find(INVALID_MARK) >= 0 or INVALID_MARK in m.subject
                for m in mails
                if m.accepted >= a.injected
            )
            for _ in marks
        )
    if f.kind == "vrrp_cut":
        return any(len(h) == 2 for t, h in d.obs.vip if a.injected <= t <= a.end + 1)
    if f.kind == "link_flap":
        return any(
            s == "FAULT" and a.injected <= t <= a.end + 2 for t, s, _ in d.transitions.get(node, [])
        )
    return None  # sshd down, edits, a full disk: judged by the config and mail figures


def reactions(d: RunData, out: dict[str, Any], mails: list[Any]) -> None:
    kinds: dict[str, dict[str, int]] = {}
    for a in d.faults:
        k = kinds.setdefault(a.fault.kind, {"injected": 0, "reacted": 0, "not_seen": 0})
        k["injected"] += 1
        r = reacted(d, a, mails)
        if r:
            k["reacted"] += 1
        elif r is False:
            k["not_seen"] += 1
        if "HARNESS ERROR" in a.detail + a.heal_detail + a.second_detail:
            k["harness_errors"] = k.get("harness_errors", 0) + 1
    out["faults"] = kinds


# -- all ------------------------------------------------------------------------------------------


def pair(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    drains = [
        (a.injected, a.end, a.fault.node, a.detail) for a in d.faults if a.fault.kind == "drain"
    ]
    out["pair"] = pair_invariants(
        t0=d.t0,
        end=_until(d),
        vip=d.obs.vip,
        procs=d.obs.procs,
        transitions=d.transitions,
        drains=drains,
        advert_int=d.advert_int,
        priorities=d.priorities,
        bad=bad,
        drain_lowers=d.supervisor == "lbwatch",
        link_down=_link_down(d),
    )


def _until(d: RunData) -> float:
    return d.observed_until or d.end


def _link_down(d: RunData) -> dict[str, list[tuple[float, float]]]:
    """Per node, when the soak had its link down (link_flap)."""
    return {
        n: [
            (a.injected, a.end)
            for a in d.faults
            if a.fault.kind == "link_flap" and a.fault.node == n
        ]
        for n in d.obs.procs
    }


def seed_mail(d: RunData, out: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    """The seed's notify script mails each MASTER: counted, not judged."""
    mails = [m for m in read_mails(d.maildir) if m.accepted >= d.mail_since]
    masters = sum(s == "MASTER" for seq in d.transitions.values() for _, s, _ in seq)
    out["mail"] = {"master_transitions": masters, "messages_received": len(mails)}
    out["_mails"] = mails


LBWATCH_PARTS = (availability, unsafe, masters, vip, pair, config, mail, wedge)
SEED_PARTS = (availability, unsafe, masters, vip, pair, seed_mail)


def analyse(d: RunData) -> dict[str, Any]:
    out: dict[str, Any] = {
        "seed": d.seed,
        "minutes": d.minutes,
        "profile": d.profile,
        "tier": d.tier,
        "supervisor": d.supervisor,
    }
    bad: list[dict[str, Any]] = []
    lbwatch = d.supervisor == "lbwatch"
    for part in LBWATCH_PARTS if lbwatch else SEED_PARTS:
        part(d, out, bad)
    mails = out.pop("_mails")
    reactions(d, out, mails)
    out["observer"] = {"proc_polls": d.obs.polls, "slow_polls": d.obs.slow_polls}
    out["tracebacks"] = {n: log.count("Traceback") for n, log in d.logs.items()}
    for node, count in out["tracebacks"].items():
        if count and lbwatch:
            # An exception lbwatch did not expect: a bug, even when nothing else went wrong
            # (a full disk once made every start-up job raise, and the policy retry it).
            bad.append(
                {"invariant": "lbwatch traceback", "at": d.end, "text": f"{node}: {count} logged"}
            )
    bad.sort(key=lambda b: b["at"])
    # The seed's scripts are the baseline: what they break is a figure, never a failure.
    key = "hard_failures" if lbwatch else "baseline_violations"
    out[key] = [{**b, "t": round(b["at"] - d.t0, 2)} for b in bad]
    out.setdefault("hard_failures", [])
    tl = sorted(d.obs.timeline)
    # Each violation's timeline: 10 s before it to 5 s after its end (a span's "until").
    out["timelines"] = [
        [
            f"{t - d.t0:9.2f}  {src:8}  {text}"
            for t, src, text in tl
            if b["at"] - 10 <= t <= max(b["at"] + 10, b.get("until", 0.0) + 5)
        ]
        for b in bad[:10]
    ]
    # The whole timeline, for the JSON: what the report's tables summarize, line by line.
    out["timeline"] = [f"{t - d.t0:9.2f}  {src:8}  {text}" for t, src, text in tl]
    out["schedule"] = [
        f"{a.injected - d.t0:8.2f}  {a.fault.label()}: {a.detail}"
        + (f" | second +{a.second - d.t0:.2f}: {a.second_detail}" if a.second_detail else "")
        + (f" | healed +{a.end - d.t0:.2f}: {a.heal_detail}" if a.heal_detail else "")
        for a in d.faults
    ]
    return out


def render(r: dict[str, Any]) -> str:
    tier = r.get("tier", "bare")
    seed_scripts = r.get("supervisor") == "seed"
    who = "the seed's scripts" if seed_scripts else "lbwatch"
    lines = [
        f"chaos soak of {who}, seed {r['seed']}, {r['minutes']} min, {r['profile']} profile, "
        f"{tier} lab",
        "",
    ]
    for kind, why in r.get("skipped", {}).items():
        lines += [f"not injected: {kind}: {why}", ""]
    lines += ["| invariant | figure | value |", "|---|---|---|"]
    for section in (
        "availability",
        "keepalived_without_haproxy",
        "haproxy_masters",
        "vip",
        "pair",
        "config",
        "mail",
    ):
        for k, v in r.get(section, {}).items():
            if k.endswith("_spans"):
                continue  # in the JSON
            lines.append(f"| {section} | {k} | {v} |")
    for node, fig in r.get("watchdog", {}).items():
        for k, v in fig.items():
            lines.append(f"| agent liveness ({node}) | {k} | {v} |")
    lines += ["", "| fault | injected | reaction seen | not seen |", "|---|---|---|---|"]
    for kind, k in sorted(r["faults"].items()):
        errors = f" ({k['harness_errors']} harness errors)" if k.get("harness_errors") else ""
        lines.append(f"| {kind} | {k['injected']}{errors} | {k['reacted']} | {k['not_seen']} |")
    lines += ["", f"tracebacks: {r['tracebacks']}; observer: {r['observer']}", ""]
    bad = r.get("baseline_violations", []) if seed_scripts else r["hard_failures"]
    word = "BASELINE BROKE" if seed_scripts else "VIOLATION"
    if not bad:
        lines.append(f"hard invariants: all held (seed {r['seed']})")
    for b, tl in zip(bad, r["timelines"]):
        lines += [
            f"{word} (seed {r['seed']}) {b['invariant']} at +{b['t']} s: {b['text']}",
            *tl,
            "",
        ]
    if len(bad) > len(r["timelines"]):
        lines.append(f"... {len(bad) - len(r['timelines'])} more: {_count(bad)}")
    return "\n".join(lines)


def _count(bad: list[dict[str, Any]]) -> str:
    kinds: dict[str, int] = {}
    for b in bad:
        kinds[b["invariant"]] = kinds.get(b["invariant"], 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
