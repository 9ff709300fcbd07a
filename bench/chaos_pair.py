"""The chaos soak's invariants of the pair, from what the observer recorded (pure):

- **VIP on no node**: no node holds the VIP for longer than VRRP's election time + 0.5 s while
  some node's haproxy could serve. A node's haproxy *could serve* while its master is alive and
  not stopped (SIGSTOP: only the soak stops one, ``haproxy_master_stop`` or a freeze) and its
  link is not down by the soak's hand (``link_flap``: a node off the network serves no one); the
  election time is the one keepalived waits before a BACKUP takes over, 3 x advert_int + skew
  (``election_time``), for the lowest priority in play: the configured ones, and 1 for a
  node drained by lbwatch (its track file makes it priority 1, whose skew is ~advert_int).
- **FAULT on both nodes**: the instance never in FAULT on both nodes at once, from keepalived's
  own notify_STATE hooks; a node's FAULT ends at its next transition, or when the observer sees
  no keepalived process left there (a kill -9 writes no transition).
- **A drain never leaves no holder**: no span of the first kind begins during an applied drain
  (from the drain to its undrain, and an election time after). A refused drain (``lbwatch drain``
  saying no peer can take over) is the expected outcome, counted, never judged.

Spans are (start, end) wall times; every function here is pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bench.chaos_observer import Snap

Span = tuple[float, float]
GRACE = 0.5  # seconds beyond the election time before "no holder" is a violation
FAULT_JITTER = 0.05  # keepalived runs each hook on its own: their timestamps jitter by ms
DRAINED_PRIORITY = 1  # lbwatch's track file value -253 on a configured priority of 254
# A drain's detail starts with its outcome (the rigs' ``drain``): "drained: ...",
# "refused: ..." or "failed: ...".
OUTCOMES = ("drained", "refused", "failed")


def election_time(advert_int: float, priorities: Iterable[int]) -> float:
    """keepalived's Master_Down_Interval for the lowest of ``priorities`` (RFC 3768 / 5798:
    3 x advert_int + skew, skew = (256 - priority) / 256 x advert_int)."""
    return 3 * advert_int + (256 - min(priorities)) / 256 * advert_int


def changes_to_spans(changes: Sequence[tuple[float, bool]], end: float) -> list[Span]:
    """The spans where a condition holds, from its values at the times it changed (in order);
    the last one runs until ``end``."""
    out: list[Span] = []
    since: float | None = None
    for t, on in changes:
        if on and since is None:
            since = t
        elif not on and since is not None:
            if t > since:
                out.append((since, t))
            since = None
    if since is not None and end > since:
        out.append((since, end))
    return out


def union(spans: Iterable[Span]) -> list[Span]:
    out: list[Span] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def intersect(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    a, b = union(a), union(b)
    out: list[Span] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def serves(snap: Snap) -> bool:
    """A node's haproxy could serve: its master alive and not stopped."""
    return bool(snap.masters) and snap.master_state != "T"


def subtract(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    """What of ``a`` no span of ``b`` covers."""
    out: list[Span] = []
    for s, e in union(a):
        cur = s
        for bs, be in union(b):
            if be <= cur or bs >= e:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
        if cur < e:
            out.append((cur, e))
    return out


def servable(
    procs: dict[str, list[tuple[float, Snap]]],
    end: float,
    link_down: dict[str, list[Span]] | None = None,
) -> dict[str, list[Span]]:
    """Per node, when its haproxy could serve (``link_down``: when the soak had its link down)."""
    down = link_down or {}
    return {
        node: subtract(changes_to_spans([(t, serves(s)) for t, s in seq], end), down.get(node, []))
        for node, seq in procs.items()
    }


def no_holder(vip: Sequence[tuple[float, tuple[str, ...]]], end: float) -> list[Span]:
    """When no node held the VIP (the observer's record of the holders at each change)."""
    return changes_to_spans([(t, not holders) for t, holders in vip], end)


def keepalived_gone(seq: Sequence[tuple[float, Snap]]) -> list[float]:
    """The times a node's last keepalived process was seen gone."""
    out, up = [], False
    for t, s in seq:
        now_up = bool(s.kl_parents or s.kl_children)
        if up and not now_up:
            out.append(t)
        up = now_up
    return out


def fault_spans(
    transitions: Sequence[tuple[float, str, str]], gone: Sequence[float], end: float
) -> dict[str, list[Span]]:
    """Per instance, when keepalived had it in FAULT on one node: from a FAULT transition to
    the next transition of that instance, or keepalived gone, whichever first."""
    out: dict[str, list[Span]] = {}
    seq = sorted(transitions)
    for i, (t, state, inst) in enumerate(seq):
        if state != "FAULT":
            continue
        nxt = next((tt for tt, _, ii in seq[i + 1 :] if ii == inst), end)
        stop = min([nxt, *(g for g in gone if g > t)])
        out.setdefault(inst, []).append((t, stop))
    return out


def drain_outcome(detail: str) -> str:
    """A drain's outcome from the rig's detail: "drained", "refused", or "failed"."""
    head = detail.split(":", 1)[0].strip()
    return head if head in OUTCOMES else "failed"


def episodes(
    holderless: Sequence[Span], servable_by_node: dict[str, list[Span]]
) -> list[tuple[Span, tuple[str, ...]]]:
    """The spans with no VIP holder while some node's haproxy could serve, with the nodes
    that could at the span's start."""
    anyone = union(s for spans in servable_by_node.values() for s in spans)
    out = []
    for s, e in intersect(holderless, anyone):
        who = tuple(
            sorted(n for n, spans in servable_by_node.items() if any(a <= s < b for a, b in spans))
        )
        out.append(((s, e), who))
    return out


def pair_invariants(
    *,
    t0: float,
    end: float,
    vip: Sequence[tuple[float, tuple[str, ...]]],
    procs: dict[str, list[tuple[float, Snap]]],
    transitions: dict[str, list[tuple[float, str, str]]],
    drains: Sequence[tuple[float, float, str, str]],
    advert_int: float,
    priorities: Sequence[int],
    bad: list[dict[str, Any]],
    drain_lowers: bool = True,
    link_down: dict[str, list[Span]] | None = None,
) -> dict[str, Any]:
    """The three invariants' figures; each violation appended to ``bad``. ``drains``:
    (applied, undone, node, detail) of each drain fault, wall times. ``drain_lowers``: a
    drained node runs on at priority 1 (lbwatch's drain; the seed's stops keepalived).
    ``link_down``: per node, when the soak had its link down."""
    election = election_time(advert_int, priorities)
    limit = election + GRACE
    drained_limit = election_time(advert_int, [DRAINED_PRIORITY]) + GRACE if drain_lowers else limit
    applied = [(a, u, n) for a, u, n, det in drains if drain_outcome(det) == "drained"]
    windows = [(a, u + drained_limit) for a, u, _ in applied]
    found = [
        (span, who)
        for span, who in episodes(no_holder(vip, end), servable(procs, end, link_down))
        if span[1] > t0
    ]
    over = []
    for (s, e), who in found:
        during = any(s < we and ws < e for ws, we in windows)
        allowed = drained_limit if during else limit
        if e - s > allowed:
            over.append((s, e, during))
            bad.append(
                {
                    "invariant": "VIP on no node",
                    "at": s,
                    "until": e,
                    "text": f"no node held the VIP for {e - s:.2f} s (> {allowed:.2f} s: election "
                    f"time + {GRACE} s{', during a drain' if during else ''}) "
                    f"while {', '.join(who)}'s haproxy could serve",
                }
            )
    figures: dict[str, Any] = {
        "election_time_s": round(election, 3),
        "allowed_s": round(limit, 3),
        "episodes": len(found),
        "over_allowed": len(over),
        "worst_s": round(max((e - s for (s, e), _ in found), default=0.0), 3),
        "worst_at_s": round(max(found, key=lambda x: x[0][1] - x[0][0])[0][0] - t0, 2)
        if found
        else None,
        "total_s": round(sum(e - s for (s, e), _ in found), 3),
    }
    figures.update(_fault_both(t0, end, procs, transitions, bad))
    figures.update(_drains(t0, drains, applied, windows, over, found, bad))
    return figures


def _fault_both(
    t0: float,
    end: float,
    procs: dict[str, list[tuple[float, Snap]]],
    transitions: dict[str, list[tuple[float, str, str]]],
    bad: list[dict[str, Any]],
) -> dict[str, Any]:
    per_node = {
        node: fault_spans(seq, keepalived_gone(procs.get(node, [])), end)
        for node, seq in transitions.items()
    }
    nodes = sorted(per_node)
    both: list[Span] = []
    for inst in sorted({i for spans in per_node.values() for i in spans}):
        common: list[Span] | None = None
        for node in nodes:
            spans = per_node[node].get(inst, [])
            common = spans if common is None else intersect(common, spans)
        for s, e in common or []:
            if e - s > FAULT_JITTER and e > t0:
                both.append((s, e))
                bad.append(
                    {
                        "invariant": "FAULT on both nodes",
                        "at": s,
                        "until": e,
                        "text": f"{inst} in FAULT on {', '.join(nodes)} for {e - s:.2f} s",
                    }
                )
    return {
        "fault_on_both": len(both),
        "fault_on_both_worst_s": round(max((e - s for s, e in both), default=0.0), 3),
    }


def _drains(
    t0: float,
    drains: Sequence[tuple[float, float, str, str]],
    applied: Sequence[tuple[float, float, str]],
    windows: Sequence[Span],
    over: Sequence[tuple[float, float, bool]],
    found: Sequence[tuple[Span, tuple[str, ...]]],
    bad: list[dict[str, Any]],
) -> dict[str, Any]:
    outcomes = [drain_outcome(det) for _, _, _, det in drains]
    left = 0
    for (ws, we), (a, _, node) in zip(windows, applied):
        # Only a span that began during the drain is the drain's: one already there when the
        # operator drained was not left by it.
        hit = [(s, e) for s, e, during in over if during and ws <= s < we]
        if hit:
            left += 1
            s, e = hit[0]
            bad.append(
                {
                    "invariant": "a drain left no holder",
                    "at": s,
                    "until": e,
                    "text": f"the drain of {node} at +{a - t0:.2f} s: no node held the VIP for "
                    f"{e - s:.2f} s",
                }
            )
    during = [e - s for (s, e), _ in found if any(ws <= s < we for ws, we in windows)]
    return {
        "drains": len(drains),
        "drains_applied": outcomes.count("drained"),
        "drains_refused": outcomes.count("refused"),
        "drains_failed": outcomes.count("failed"),
        "drains_left_no_holder": left,
        "drain_worst_no_holder_s": round(max(during, default=0.0), 3),
    }
